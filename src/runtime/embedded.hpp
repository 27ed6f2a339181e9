// The files under lua/, compiled in by the build (CMakeLists.txt) as
// luaguard::kLua_NAME and kLua_NAME_len.
#pragma once

#include <cstddef>

#define LUAGUARD_EMBEDDED(name)                                              \
    extern const char kLua_##name[];                                         \
    extern const size_t kLua_##name##_len

namespace luaguard {
LUAGUARD_EMBEDDED(prelude);
LUAGUARD_EMBEDDED(resty_core);
LUAGUARD_EMBEDDED(regex_ffi);
LUAGUARD_EMBEDDED(shdict_ffi);
LUAGUARD_EMBEDDED(sandbox);
}  // namespace luaguard
