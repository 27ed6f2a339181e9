#include "runtime/env.hpp"

namespace luaguard::env {

namespace {

char kEnvMeta;

}  // namespace

void init(lua_State *L)
{
    lua_pushlightuserdata(L, &kEnvMeta);
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_setfield(L, -2, "__index");
    lua_rawset(L, LUA_REGISTRYINDEX);
}

void pushRequestEnv(lua_State *L, int *ref)
{
    if (*ref != LUA_NOREF) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, *ref);
        return;
    }
    lua_createtable(L, 0, 4);
    lua_pushlightuserdata(L, &kEnvMeta);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_setmetatable(L, -2);
    // `_G` inside the request names the request's own table, so
    // rawset(_G, ...) and _G.x = ... stay private too.
    lua_pushvalue(L, -1);
    lua_setfield(L, -2, "_G");
    lua_pushvalue(L, -1);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

void applyEnv(lua_State *L, lua_State *co)
{
    lua_pushvalue(L, -1);
    lua_setfenv(L, -3);
    if (co) {
        // getfenv(0) answers with the thread's table: make it the
        // request's, not the worker's.
        lua_pushvalue(L, -1);
        lua_xmove(L, co, 1);
        lua_replace(co, LUA_GLOBALSINDEX);
    }
    lua_pop(L, 1);
}

}  // namespace luaguard::env
