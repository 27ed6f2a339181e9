/*
 * cstack_test.c - the C stack floor of scripts/luajit-patches/
 * unbounded-c-calls.patch, on the LuaJIT scripts/build-luajit.sh builds.
 *
 * A floor above the current stack pointer makes every call "too deep", so
 * each entry's refusal is seen at a known point; setting it back to NULL
 * must leave the state usable: the refused coroutine resumes and returns
 * what it would have. A real floor (this thread's stack end) must stop a
 * Lua recursion through string.gsub and through coroutine.wrap with the
 * error, where LuaJIT without the patch runs the stack out.
 *
 * Output: one PASS/FAIL line per check, exit status 0 iff all passed.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"
#include "luajit.h"

static int g_failures;

static void check(int ok, const char *name)
{
  printf("%s: %s\n", ok ? "PASS" : "FAIL", name);
  if (!ok)
    g_failures++;
}

static int is_cstack_error(lua_State *L, int idx)
{
  const char *s = lua_tostring(L, idx);
  return s != NULL && strstr(s, "C stack overflow") != NULL;
}

/* An address above every frame this test makes: all calls are refused. */
static void *floor_above(void)
{
  return (char *)__builtin_frame_address(0) + 65536;
}

static int call_lua(lua_State *L)
{
  lua_getglobal(L, "tostring");
  lua_pushinteger(L, 7);
  lua_call(L, 1, 1);
  return 1;
}

static int call_low(lua_State *L)
{
  luaguard_cstack_floor(L, floor_above());
  return call_lua(L);
}

/* Whether lua_pcall of `f` (the floor set first when `low`) fails with
** "C stack overflow"; the floor is gone afterwards.
*/
static int pcall_refused(lua_State *L, lua_CFunction f, int low)
{
  int top = lua_gettop(L), ok;
  if (low)
    luaguard_cstack_floor(L, floor_above());
  lua_pushcfunction(L, f);
  ok = lua_pcall(L, 0, 1, 0) == LUA_ERRRUN && is_cstack_error(L, -1);
  luaguard_cstack_floor(L, NULL);
  lua_settop(L, top);
  return ok;
}

/* Whether the chunk `code` runs and returns the C stack error. */
static int stops(lua_State *L, const char *code)
{
  int top = lua_gettop(L);
  int ok = luaL_dostring(L, code) == 0 && is_cstack_error(L, -1);
  lua_settop(L, top);
  return ok;
}

static void *stack_floor(void)
{
  pthread_attr_t attr;
  void *addr;
  size_t size;
  if (pthread_getattr_np(pthread_self(), &attr) != 0)
    return NULL;
  pthread_attr_getstack(&attr, &addr, &size);
  pthread_attr_destroy(&attr);
  if (size > 8u << 20) {
    addr = (char *)addr + size - (8u << 20);
  }
  return (char *)addr + (256u << 10);
}

int main(void)
{
  lua_State *L = luaL_newstate();
  lua_State *co;
  int top, status;
  luaL_openlibs(L);

  /* lua_pcall: the error instead of the call, function and args gone. */
  top = lua_gettop(L);
  luaguard_cstack_floor(L, floor_above());
  lua_getglobal(L, "tostring");
  lua_pushinteger(L, 1);
  lua_pushinteger(L, 2);
  status = lua_pcall(L, 2, 1, 0);
  luaguard_cstack_floor(L, NULL);
  check(status == LUA_ERRRUN && lua_gettop(L) == top + 1 &&
	is_cstack_error(L, -1), "lua_pcall returns C stack overflow");
  lua_settop(L, top);

  /* lua_pcall refuses before the function runs; lua_call raises, to the
  ** enclosing lua_pcall (made above the floor: call_low sets it).
  */
  check(pcall_refused(L, call_lua, 1),
	"lua_pcall refuses before a C function runs");
  check(pcall_refused(L, call_low, 0), "lua_call raises C stack overflow");
  lua_pushcfunction(L, call_lua);
  check(lua_pcall(L, 0, 1, 0) == 0 &&
	strcmp(lua_tostring(L, -1), "7") == 0,
	"the same call runs once the floor is gone");
  lua_settop(L, top);

  /* lua_resume of a new coroutine: the error, the coroutine not started. */
  co = lua_newthread(L);
  luaL_loadstring(co, "local a = ... local b = coroutine.yield(a + 1) "
		  "return a + b");
  lua_pushinteger(co, 10);
  luaguard_cstack_floor(L, floor_above());
  status = lua_resume(co, 1);
  luaguard_cstack_floor(L, NULL);
  check(status == LUA_ERRRUN && is_cstack_error(co, -1) &&
	lua_status(co) == LUA_OK, "lua_resume of a new coroutine refused");
  lua_settop(L, top);

  /* lua_resume of a yielded coroutine: refused, then resumable. */
  co = lua_newthread(L);
  luaL_loadstring(co, "local a = ... local b = coroutine.yield(a + 1) "
		  "return a + b");
  lua_pushinteger(co, 10);
  status = lua_resume(co, 1);
  check(status == LUA_YIELD && lua_tointeger(co, -1) == 11,
	"the coroutine yields");
  lua_pop(co, 1);
  lua_pushinteger(co, 5);
  luaguard_cstack_floor(L, floor_above());
  status = lua_resume(co, 1);
  luaguard_cstack_floor(L, NULL);
  check(status == LUA_ERRRUN && is_cstack_error(co, -1) &&
	lua_status(co) == LUA_YIELD,
	"lua_resume of a yielded coroutine refused, still suspended");
  lua_settop(co, 0);
  lua_pushinteger(co, 5);
  status = lua_resume(co, 1);
  check(status == 0 && lua_tointeger(co, -1) == 15,
	"the yielded coroutine resumes afterwards with its values");
  lua_settop(L, top);

  /* coroutine.resume and coroutine.wrap from Lua: the real floor, a
  ** recursion each; and string.gsub's callback.
  */
  luaguard_cstack_floor(L, stack_floor());
  check(stops(L, "local function f() return coroutine.wrap(f)() end "
	      "local ok, err = pcall(f) return err"),
	"coroutine.wrap recursion stops with C stack overflow");
  check(stops(L, "local function f() "
	      "  local ok, a = coroutine.resume(coroutine.create(f)) "
	      "  return a end "
	      "return (f())"),
	"coroutine.resume recursion returns false, C stack overflow");
  check(stops(L, "local function f(s) return (s:gsub('.', f)) end "
	      "local ok, err = pcall(f, 'abc') return err"),
	"string.gsub callback recursion stops with C stack overflow");
  status = luaL_dostring(L, "return (('abc'):gsub('.', string.upper))");
  check(status == 0 && strcmp(lua_tostring(L, -1), "ABC") == 0,
	"the state works after those");
  lua_settop(L, top);

  lua_close(L);
  if (g_failures) {
    printf("cstack_test: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  return 0;
}
