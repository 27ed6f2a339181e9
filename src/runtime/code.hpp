// Compiling handler code. Source is compiled as a factory that returns a
// fresh closure per call: each run has a closure of its own (fresh or
// pooled), so giving it a private global environment never races with
// another request suspended in the same code.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

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

class Vm;

// The pooled handler closure one run (a thread, a synchronous call)
// holds: its cell in the VM (Vm::hold) and the pool it goes back to.
// All zero is "none" (it lives in zeroed memory too).
struct Lease {
    std::vector<int> *idle = nullptr;
    int               cell = 0;
};

// The idle closures of `factory`, a factory that lives as long as `vm`
// (inline code, a cached file); made empty on first use.
std::vector<int> *closurePool(Vm *vm, const void *factory);

// Like instantiate, for the factory at `index` whose pool is `idle`:
// pushes an idle closure of the pool, or a fresh one, held in *lease
// until giveClosure (the factory is read only for a fresh one: with an
// idle closure, `index` may name anything). A closure is never in the
// pool while a run holds it, so two runs never share one. When `env` is
// not 0, the closure gets the value of cell `env` as its environment.
void takeClosure(lua_State *L, Vm *vm, int index, std::vector<int> *idle,
                 Lease *lease, int env = 0);

// The run holding *lease is over (empties it; nothing to do when empty).
// `reusable`: the closure returned or unwound and runs nowhere else; it
// goes back to its pool with an empty environment, unless request code
// got it as a value (markEscaped). Otherwise (left suspended: someone may
// resume it) only the cell is freed. Never raises.
void giveClosure(lua_State *L, Vm *vm, Lease *lease, bool reusable);

struct EnvClosures;

// The closures bound to an environment that is not reused (it escaped,
// was written to, or the request moved away): each goes back to its pool
// as giveClosure gives a lease back. Leaves *b empty.
void unbindClosures(lua_State *L, Vm *vm, EnvClosures *b);

// The closures bound to an environment whose table is replaced by a new
// one: each stays bound, with the empty environment until the new table
// comes (rebindClosures); one request code got as a value is freed
// instead. Never raises.
void parkClosures(lua_State *L, Vm *vm, EnvClosures *b);

// Gives every closure of *b the table in cell `env` as its environment.
void rebindClosures(lua_State *L, Vm *vm, const EnvClosures &b, int env);

// Request code obtained the function at `index` as a value (debug.getinfo's
// func): a pooled closure is never handed to another run after that, which
// would switch its environment under whoever keeps it. May raise (memory).
void markEscaped(lua_State *L, int index);

}  // namespace luaguard
