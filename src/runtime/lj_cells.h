/* The VM's cells (runtime/vm.hpp) read and written in the table's array
 * part directly, with LuaJIT's internal headers, for the LuaJIT we build
 * (LUAGUARD_LJ_INTERNALS). Through the C API each access is two
 * lua_rawgeti (the registry, then the cell): about 65 instructions, and a
 * request makes a dozen or more of them. `cells` is the table's address
 * (lua_topointer); `i` lies inside its array part (Vm keeps it so). */
#ifndef LUAGUARD_LJ_CELLS_H
#define LUAGUARD_LJ_CELLS_H

#ifdef __cplusplus
extern "C" {
#endif

struct lua_State;

/* Pushes cells[i]. */
void luaguard_cells_push(struct lua_State *L, const void *cells, int i);
/* cells[i] = the value on top (popped). Never allocates. */
void luaguard_cells_set(struct lua_State *L, const void *cells, int i);
/* Sets the environment of the Lua function on top to the table in
 * cells[i]. */
void luaguard_cells_setfenv(struct lua_State *L, const void *cells, int i);
/* Sets the environment of the Lua function in cells[fn] to the table in
 * cells[env], without a stack slot. */
void luaguard_cells_setfenv_of(struct lua_State *L, const void *cells, int fn,
                               int env);

/* Pushes the Lua function in cells[fn] if its environment is the table in
 * cells[env] and returns 1; returns 0 and pushes nothing if not. */
int luaguard_cells_push_if_fenv(struct lua_State *L, const void *cells,
                                int fn, int env);

/* Whether running the Lua function on top of L can make closures that take
 * its environment: it has functions inside it, and (once the state has a
 * closure environment, luaguard_closure_env) one of them uses globals or
 * makes a closure that does. */
int luaguard_func_closures_keep_env(struct lua_State *L);
/* Whether the table in cells[i] is a request environment holding nothing
 * but the field its metatable names at [2] (`ngx`, lua/sandbox.lua): if
 * so, that field's value is set back to the metatable's [1]. */
int luaguard_cells_env_reset(struct lua_State *L, const void *cells, int i);

/* Replaces the metatable on top of L with a new request environment: a
 * table with that metatable and one field, named by the metatable's [2],
 * holding its [1]. Returns 0 (nothing changed) when the metatable is not
 * of that shape. May raise (memory). */
int luaguard_env_new(struct lua_State *L);

#ifdef __cplusplus
}
#endif

#endif
