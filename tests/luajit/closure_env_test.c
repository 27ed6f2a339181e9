/*
 * closure_env_test.c - scripts/luajit-patches/uncaptured-env.patch on the
 * LuaJIT scripts/build-luajit.sh builds.
 *
 * A closure that needs no environment (its code and the closures it makes
 * use no globals), made by a function whose environment is marked (its
 * metatable's metatable is the table given to luaguard_closure_env), gets
 * that table instead of its maker's environment. Every other closure gets
 * its maker's, as in Lua: one using a global (read or write), one making a
 * closure that does, one made under an unmarked environment, one whose
 * prototype came from bytecode (not analysed), and any once the table is
 * unset. The checks run in Lua; `check` prints one PASS/FAIL line each.
 *
 * Exit status 0 iff all passed.
 */
#include <stdio.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "luajit.h"

static int g_failures;

static int check(lua_State *L)
{
  int ok = lua_toboolean(L, 2);
  printf("%s: %s\n", ok ? "PASS" : "FAIL", luaL_checkstring(L, 1));
  if (!ok)
    g_failures++;
  return 0;
}

/* unset(): luaguard_closure_env(L, nil). */
static int unset(lua_State *L)
{
  lua_pushnil(L);
  luaguard_closure_env(L, -1);
  return 0;
}

static const char kChecks[] =
  "local CE, check, unset = ...\n"
  "local E = setmetatable({}, setmetatable({}, CE))\n"
  "local function under(env, src)\n"
  "  local chunk = assert(loadstring(src))\n"
  "  return setfenv(chunk, env)()\n"
  "end\n"
  "check('no globals: the closure environment',\n"
  "  getfenv(under(E, 'return function(a) return a + 1 end')) == CE)\n"
  "check('upvalues only: the closure environment',\n"
  "  getfenv(under(E, 'local t = {} return function() return t end')) == CE)\n"
  "check('reads a global: its maker\\'s',\n"
  "  getfenv(under(E, 'return function() return x end')) == E)\n"
  "check('writes a global only: its maker\\'s',\n"
  "  getfenv(under(E, 'return function() x = 1 end')) == E)\n"
  "local outer = under(E, 'return function() return function() return x end end')\n"
  "check('makes a closure that reads a global: its maker\\'s',\n"
  "  getfenv(outer) == E and getfenv(outer()) == E)\n"
  "local deep = under(E, 'return function() return function() return 1 end end')\n"
  "check('makes closures without globals: the closure environment, and theirs',\n"
  "  getfenv(deep) == CE and getfenv(deep()) == CE)\n"
  "local T = {}\n"
  "check('an unmarked maker: its environment',\n"
  "  getfenv(under(T, 'return function() return 1 end')) == T)\n"
  "local maker = assert(loadstring('return function() return 1 end'))\n"
  "local loaded = assert(loadstring(string.dump(maker)))\n"
  "check('a prototype from bytecode: its maker\\'s',\n"
  "  getfenv(setfenv(loaded, E)()) == E)\n"
  "local f = under(E, 'return function(a) return a end')\n"
  "setfenv(f, T)\n"
  "check('setfenv still gives it another', getfenv(f) == T and f(3) == 3)\n"
  "collectgarbage()\n"
  "check('the table lives on (held by the registry)',\n"
  "  getfenv(under(E, 'return function() end')) == CE)\n"
  "unset()\n"
  "check('unset: its maker\\'s',\n"
  "  getfenv(under(E, 'return function() return 1 end')) == E)\n";

int main(void)
{
  lua_State *L = luaL_newstate();
  luaL_openlibs(L);
  /* The closure environment, held where the patch asks (the registry). */
  lua_newtable(L);
  lua_pushvalue(L, -1);
  lua_setfield(L, LUA_REGISTRYINDEX, "closure_env_test");
  luaguard_closure_env(L, -1);
  if (luaL_loadbuffer(L, kChecks, sizeof(kChecks) - 1, "=checks") != 0) {
    printf("FAIL: %s\n", lua_tostring(L, -1));
    return 1;
  }
  lua_insert(L, -2);
  lua_pushcfunction(L, check);
  lua_pushcfunction(L, unset);
  if (lua_pcall(L, 3, 0, 0) != 0) {
    printf("FAIL: %s\n", lua_tostring(L, -1));
    return 1;
  }
  lua_close(L);
  if (g_failures) {
    printf("closure_env_test: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  return 0;
}
