// Compiling handler code. Source is compiled as a factory that returns a
// fresh closure per call: each request runs its own closure, so giving it a
// private global environment never races with another request suspended in
// the same code.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/lua.hpp"

namespace luaguard {

bool isBytecode(const char *code, size_t len);

// A factory made from a binary chunk is a C function; one made from
// source is a Lua function.

// Pushes the factory on success. On failure pushes nothing and sets *err
// to Lua's message (chunk name and line included).
bool compileFactory(lua_State *L, const char *code, size_t len,
                    const char *chunkname, std::string *err);

// Pushes the handler closure made by the factory at `index`.
void instantiate(lua_State *L, int index);

}  // namespace luaguard
