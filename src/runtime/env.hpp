// Global environments for request code. Each request gets its own table:
// reads fall through to the worker's globals (what init_by_lua and modules
// set up), writes stay in the request and vanish with it.
#pragma once

#include "runtime/lua.hpp"

namespace luaguard::env {

// Prepares the shared metatable; call once per VM after the libraries and
// the ngx table exist.
void init(lua_State *L);

// Pushes the request environment whose registry reference is *ref,
// creating it on first use.
void pushRequestEnv(lua_State *L, int *ref);

// Gives the function on top of the stack and the thread `co` the
// environment on top of the stack (pops it).
void applyEnv(lua_State *L, lua_State *co);

}  // namespace luaguard::env
