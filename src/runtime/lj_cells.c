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

void luaguard_cells_setfenv_of(lua_State *L, const void *cells, int fn,
                               int env)
{
    GCtab *t = (GCtab *)cells;
    GCfunc *f = funcV(arrayslot(t, fn));
    GCtab *e = tabV(arrayslot(t, env));
    if (iswhite(obj2gco(e)) && isblack(obj2gco(f))) {
        luaguard_cells_push(L, cells, fn);
        luaguard_cells_setfenv(L, cells, env);   /* with its barrier */
        L->top--;
        return;
    }
    setgcref(f->c.env, obj2gco(e));
}

int luaguard_cells_push_if_fenv(lua_State *L, const void *cells, int fn,
                                int env)
{
    GCtab *t = (GCtab *)cells;
    cTValue *e = arrayslot(t, env), *f = arrayslot(t, fn);
    TValue fenv;
    /* One compare for "a table, and that one". */
    settabV(L, &fenv, tabref(funcV(f)->c.env));
    if (e->u64 != fenv.u64) {
        return 0;
    }
    if (L->top + 1 >= tvref(L->maxstack)) {
        luaL_checkstack(L, 1, "too many values");
    }
    copyTV(L, L->top, f);
    L->top++;
    return 1;
}

int luaguard_func_closures_keep_env(lua_State *L)
{
    GCfunc *fn = funcV(L->top - 1);
    GCproto *pt;
    if (!isluafunc(fn)) {
        return 1;
    }
    pt = funcproto(fn);
    /* Without a closure environment every closure takes its maker's. */
    if (gcref(G(L)->closure_env) == NULL) {
        return (pt->flags & PROTO_CHILD) != 0;
    }
    return (proto_envuse(pt) & PROTO_ENV_KIDS) != 0;
}

/* A request environment's metatable names its one field at [2] and holds
 * its value at [1], in its array part (lua/sandbox.lua); NULL when it does
 * not. The value is at the returned slot - 1. */
static inline cTValue *env_field(GCtab *mt)
{
    cTValue *name;
    if (mt->asize <= 2) {
        return NULL;
    }
    name = arrayslot(mt, 2);
    return tvisstr(name) ? name : NULL;
}

int luaguard_cells_env_reset(lua_State *L, const void *cells, int i)
{
    cTValue *o = arrayslot((GCtab *)cells, i);
    GCtab *t, *mt;
    cTValue *name;
    Node *node, *field = NULL;
    GCstr *key;
    uint32_t j;
    if (!tvistab(o)) {
        return 0;
    }
    t = tabV(o);
    mt = tabref(t->metatable);
    /* pushNewEnv's table: no array part, a hash part of one or two nodes
     * (a write of another name, even one set back to nil, rehashes it or
     * takes the other node). */
    if (mt == NULL || t->asize != 0 || t->hmask > 1
        || (name = env_field(mt)) == NULL) {
        return 0;
    }
    key = strV(name);
    node = noderef(t->node);
    for (j = 0; j <= t->hmask; j++) {
        if (tvisstr(&node[j].key) && strV(&node[j].key) == key) {
            field = &node[j];
        } else if (!tvisnil(&node[j].key)) {
            return 0;  /* another name, even one set back to nil */
        }
    }
    if (field == NULL) {
        return 0;
    }
    /* Unchanged, the usual case: no store, hence no barrier (which would
     * have the collector traverse the table again). */
    if (field->val.u64 != (name - 1)->u64) {
        copyTV(L, &field->val, name - 1);
        lj_gc_anybarriert(L, t);
    }
    return 1;
}

int luaguard_env_new(lua_State *L)
{
    GCtab *mt = tabV(L->top - 1), *t;
    cTValue *name = env_field(mt);
    TValue key;
    if (name == NULL) {
        return 0;
    }
    lua_createtable(L, 0, 1);   /* the collector's step and the checks */
    t = tabV(L->top - 1);
    /* t is new, hence white: storing into it needs no barrier. */
    setgcref(t->metatable, obj2gco(mt));
    copyTV(L, &key, name);
    copyTV(L, lj_tab_newkey(L, t, &key), name - 1);
    copyTV(L, L->top - 2, L->top - 1);
    L->top--;
    return 1;
}
