// require "ngx.process": what kind of nginx process this Lua runs in.

#include "api/api.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {

namespace {

int processType(lua_State *L)
{
    switch (ngx_process) {
    case NGX_PROCESS_MASTER: lua_pushliteral(L, "master"); break;
    case NGX_PROCESS_SIGNALLER: lua_pushliteral(L, "signaller"); break;
    case NGX_PROCESS_WORKER: lua_pushliteral(L, "worker"); break;
    case NGX_PROCESS_HELPER: lua_pushliteral(L, "helper"); break;
    default: lua_pushliteral(L, "single"); break;
    }
    return 1;
}

int masterPid(lua_State *L)
{
    if (ngx_process == NGX_PROCESS_WORKER) {
        lua_pushinteger(L, static_cast<lua_Integer>(getppid()));
    } else if (ngx_process == NGX_PROCESS_MASTER
               || ngx_process == NGX_PROCESS_SINGLE)
    {
        lua_pushinteger(L, static_cast<lua_Integer>(ngx_pid));
    } else {
        lua_pushnil(L);
    }
    return 1;
}

int unsupported(lua_State *L)
{
    return luaL_error(L, "ngx.process.%s is not implemented in luaguard yet",
                      lua_tostring(L, lua_upvalueindex(1)));
}

int openModule(lua_State *L)
{
    const luaL_Reg fns[] = {{"type", processType},
                            {"get_master_pid", masterPid},
                            {nullptr, nullptr}};
    pushRestyModule(L, fns);
    for (const char *name : {"enable_privileged_agent",
                             "signal_graceful_exit"}) {
        lua_pushstring(L, name);
        lua_pushcclosure(L, unsupported, 1);
        lua_setfield(L, -2, name);
    }
    return 1;
}

}  // namespace

void openProcess(lua_State *L)
{
    preload(L, "ngx.process", openModule);
}

}  // namespace luaguard::api
