/*
 * strtab_shrink_test.c - scripts/luajit-patches/string-table-shrink.patch
 * on the LuaJIT scripts/build-luajit.sh builds.
 *
 * A collection whose sweep ends with the string table much larger than
 * the strings left asks for a smaller table. With that allocation refused
 * the collection must finish without an error (the shrink is skipped:
 * from compiled code the error had no frame to unwind to), and the state
 * must work afterwards. Growing the table is not optional: with its
 * allocation refused, interning raises "not enough memory".
 *
 * Output: one PASS/FAIL line per check, exit status 0 iff all passed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lua.h"
#include "lauxlib.h"
#include "lualib.h"

static int g_failures;
/* While set, every new block of exactly this size is refused. */
static size_t g_refuse_size;
static int g_refused;

static void check(int ok, const char *name)
{
  printf("%s: %s\n", ok ? "PASS" : "FAIL", name);
  if (!ok)
    g_failures++;
}

static void *alloc(void *ud, void *p, size_t osize, size_t nsize)
{
  (void)ud;
  if (nsize == 0) {
    free(p);
    return NULL;
  }
  if (p == NULL && g_refuse_size && nsize == g_refuse_size) {
    g_refused++;
    return NULL;
  }
  (void)osize;
  return realloc(p, nsize);
}

static int collect(lua_State *L)
{
  lua_gc(L, LUA_GCCOLLECT, 0);
  return 0;
}

static int run(lua_State *L, const char *code)
{
  return luaL_dostring(L, code);
}

int main(void)
{
  lua_State *L = lua_newstate(alloc, NULL);
  int status;
  luaL_openlibs(L);
  /* 40,000 strings make the table grow to 64K slots (512 KB); once they
  ** are garbage, the sweep asks for half of it.
  */
  status = run(L, "local t = {} for i = 1, 40000 do t[i] = 'k' .. i end "
		  "t = nil");
  check(status == 0, "40,000 strings interned");
  g_refuse_size = 32768 * sizeof(void *);
  status = lua_cpcall(L, collect, NULL);
  check(status == 0, "a collection whose shrink is refused ends without "
	"an error");
  check(g_refused > 0, "the shrink was asked for (and refused)");
  g_refuse_size = 0;
  status = run(L, "local s = 0 for i = 1, 1000 do s = s + #('x' .. i) end "
		  "assert(s == 3893) assert(('ab'):rep(3) == 'ababab')");
  check(status == 0, "the state interns and finds strings afterwards");
  status = lua_cpcall(L, collect, NULL);
  check(status == 0, "the next collection shrinks it as usual");
  lua_close(L);
  if (g_failures) {
    printf("strtab_shrink_test: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  return 0;
}
