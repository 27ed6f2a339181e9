// LuaJIT's C API. Either Debian's libluajit2 or the CHECKHOOK build from
// the same source package: see LUAGUARD_LUAJIT in CMakeLists.txt.
#pragma once

extern "C" {
#include <lauxlib.h>
#include <lua.h>
#include <luajit.h>
#include <lualib.h>
}
