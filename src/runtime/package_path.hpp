// lua_package_path / lua_package_cpath templates: ";;" stands for LuaJIT's
// default search path and $prefix (or ${prefix}) for nginx's prefix.
#pragma once

#include <string>
#include <string_view>

namespace luaguard {

std::string expandPackagePath(std::string_view configured,
                              std::string_view defaults,
                              std::string_view prefix);

}  // namespace luaguard
