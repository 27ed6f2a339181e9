/*
 * run_lua.c - runs a Lua test file on the LuaJIT luaguard links
 * (scripts/build-luajit.sh's static library, with luaguard's patches),
 * where the luajit binary of the system would test another LuaJIT.
 *
 *   run_lua FILE.lua    exit status 0 iff the file ran without error
 */
#include <stdio.h>

#include "lauxlib.h"
#include "lua.h"
#include "lualib.h"

int main(int argc, char **argv)
{
  if (argc != 2) {
    fprintf(stderr, "usage: %s FILE.lua\n", argv[0]);
    return 2;
  }
  lua_State *L = luaL_newstate();
  if (L == NULL) {
    fprintf(stderr, "run_lua: cannot create a Lua state\n");
    return 1;
  }
  luaL_openlibs(L);
  int rc = luaL_loadfile(L, argv[1]);
  if (rc == 0) {
    lua_getglobal(L, "debug");
    lua_getfield(L, -1, "traceback");
    lua_remove(L, -2);
    lua_insert(L, -2);
    rc = lua_pcall(L, 0, 0, -2);
  }
  if (rc != 0) {
    fprintf(stderr, "%s\n", lua_tostring(L, -1));
  }
  lua_close(L);
  return rc == 0 ? 0 : 1;
}
