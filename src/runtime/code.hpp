// Compiling handler code. Source is compiled as a factory that returns a
// fresh closure per call: each run has a closure of its own (fresh or
// pooled), so giving it a private global environment never races with
// another request suspended in the same code.
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

// A pooled handler closure handed to one run (a thread or a synchronous
// call); empty (all zero: it lives in zeroed pool memory too) when the
// run got a fresh closure.
struct Lease {
    int pool = 0;   // pool number + 1
    int slot = 0;
};

// Like instantiate, but reuses a closure of the factory at `index` that
// no run holds (making one when all are held, a fresh unpooled one past
// the pool's size), and marks it held in *lease. The caller sets its
// environment before running it and gives it back with release() when
// the run has ended. Only for factories that live as long as the VM (the
// pool anchors them): inline code and cached files.
void instantiatePooled(lua_State *L, int index, Lease *lease);

// The run holding *lease has ended. `returned`: its closure returned (or
// unwound) and can run nowhere else: it serves the next run, unless
// request code got hold of it (escaped()). Otherwise (a thread killed or
// abandoned while suspended: someone may resume it) the pool drops it.
// `L`: any state of the closure's VM. Empties *lease.
void release(lua_State *L, Lease *lease, bool returned);

// Request code obtained function `f` as a value (debug.getinfo's func): a
// pooled closure it names is never handed to another run, whose
// environment it would otherwise switch under whoever keeps it.
void escaped(const void *f);

}  // namespace luaguard
