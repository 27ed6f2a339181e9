// The files under lua/, compiled in by the build (CMakeLists.txt) as
// luaguard::kLua_NAME and kLua_NAME_len.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/lua.hpp"

#define LUAGUARD_EMBEDDED(name)                                              \
    extern const char kLua_##name[];                                         \
    extern const size_t kLua_##name##_len

namespace luaguard {
LUAGUARD_EMBEDDED(prelude);
LUAGUARD_EMBEDDED(resty_core);
LUAGUARD_EMBEDDED(regex_ffi);
LUAGUARD_EMBEDDED(shdict_ffi);
LUAGUARD_EMBEDDED(req_ffi);
LUAGUARD_EMBEDDED(index_ffi);
LUAGUARD_EMBEDDED(sandbox);

// Runs an embedded Lua file (kLua_NAME) with the `nargs` values at the top
// of the stack as its arguments `...`, popping them and leaving
// `nresults` results. False with *err (the error, which names the chunk)
// and nothing left on the stack on failure.
bool runEmbedded(lua_State *L, const char *code, size_t len,
                 const char *name, int nargs, int nresults, std::string *err);
}  // namespace luaguard
