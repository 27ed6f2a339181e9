/* See lj_cells.h. Compiled only against the source of the LuaJIT we link.
 * Its amalgamated build keeps internal functions static: only inline code
 * from the headers is used here, and the rare cases that need one of
 * those functions (a full stack, a write barrier) go through the C API. */
#include "runtime/lj_cells.h"

#include "lauxlib.h"
#include "lj_obj.h"
#include "lj_gc.h"
#include "lj_tab.h"

void luaguard_cells_push(lua_State *L, const void *cells, int i)
{
    GCtab *t = (GCtab *)cells;
    if (L->top + 1 >= tvref(L->maxstack)) {
        luaL_checkstack(L, 1, "too many values");
    }
    copyTV(L, L->top, arrayslot(t, i));
    L->top++;
}

void luaguard_cells_set(lua_State *L, const void *cells, int i)
{
    GCtab *t = (GCtab *)cells;
    copyTV(L, arrayslot(t, i), L->top - 1);
    lj_gc_anybarriert(L, t);
    L->top--;
}

void luaguard_cells_setfenv(lua_State *L, const void *cells, int i)
{
    GCtab *t = (GCtab *)cells;
    GCfunc *fn = funcV(L->top - 1);
    GCtab *env = tabV(arrayslot(t, i));
    if (iswhite(obj2gco(env)) && isblack(obj2gco(fn))) {
        luaguard_cells_push(L, cells, i);  /* lua_setfenv has the barrier */
        lua_setfenv(L, -2);
        return;
    }
    setgcref(fn->c.env, obj2gco(env));
}
