// ngx.run_worker_thread (the Lua side: arguments, the answer's shape) and
// the API of the VMs it runs module functions in (ngx/worker_thread.*).

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"
#include "ngx/worker_thread.hpp"
#include "security/ngx_sandbox.hpp"
#include "security/sandbox.hpp"

namespace luaguard::api {

namespace {

// lua-nginx-module answers every failure to run the function, misuse
// included, with false and a message rather than an error.
int pushFalse(lua_State *L, const std::string &err)
{
    lua_pushboolean(L, 0);
    lua_pushlstring(L, err.data(), err.size());
    return 2;
}

// A thread VM runs no phase of a request: lua-nginx-module says "init".
int threadPhase(lua_State *L)
{
    lua_pushliteral(L, "init");
    return 1;
}

int runWorkerThread(lua_State *L)
{
    Run *run = glue::checkPhase(
        L, mask(Phase::Rewrite, Phase::Access, Phase::Content));
    RequestCtx *ctx = run ? run->ctx : nullptr;
    LuaThread *t = threads::current();
    if (ctx == nullptr || t == nullptr) {
        return luaL_error(L, "no request found");
    }
    // The thread VMs enforce lua_sandbox's dynamic checks (io, os,
    // loadlib, shared dictionaries) but have no per-request view: code of
    // a location that may not use ffi, debug or C modules (strict) does
    // not get a VM where nothing would stop it.
    sandbox::require(L, sandbox::Capability::Ffi);
    sandbox::require(L, sandbox::Capability::Debug);
    sandbox::require(L, sandbox::Capability::Cmodule);

    int n = lua_gettop(L);
    if (n < 3) {
        return pushFalse(L, "expecting at least 3 arguments");
    }
    if (!lua_isstring(L, 1)) {
        return pushFalse(L, "threadpool should be a string");
    }
    if (!lua_isstring(L, 2)) {
        return pushFalse(L, "module name should be a string");
    }
    size_t plen, mlen, flen = 0;
    const char *pool = lua_tolstring(L, 1, &plen);
    const char *module = lua_tolstring(L, 2, &mlen);
    // A name that is not a string names no function of the module.
    const char *func = lua_isstring(L, 3) ? lua_tolstring(L, 3, &flen) : "";

    std::vector<wthread::Value> args;
    std::string err;
    if (!wthread::copyValues(L, 4, n, "argument", &args, &err)) {
        return pushFalse(L, err);
    }
    glue::checkYieldable(L);   // before the task is posted
    ngx_str_t name = {plen, reinterpret_cast<u_char *>(
                                const_cast<char *>(pool))};
    if (!wthread::post(ctx, t, name, std::string(module, mlen),
                       std::string(func, flen), std::move(args), &err))
    {
        return pushFalse(L, err);
    }
    return glue::yield(L);
}

}  // namespace

void openWorkerThread(lua_State *L)
{
    lua_pushcfunction(L, runWorkerThread);
    lua_setfield(L, -2, "run_worker_thread");
}

bool openThreadVm(lua_State *L, lua_State *caller, std::string *err)
{
    // What lua-nginx-module's thread VMs have (docs/api.md): the pure
    // helpers, time, ngx.config (copied from the caller's, whose
    // functions take no upvalues) and the shared dictionaries.
    lua_createtable(L, 0, 32);
    openUtil(L);
    openTime(L);
    lua_pushnil(L);
    lua_setfield(L, -2, "req");   // ngx.req.start_time needs a request
    lua_pushcfunction(L, threadPhase);
    lua_setfield(L, -2, "get_phase");

    subTable(L, "config");
    lua_getglobal(caller, "ngx");
    lua_getfield(caller, -1, "config");
    if (lua_istable(caller, -1)) {
        lua_pushnil(caller);
        while (lua_next(caller, -2) != 0) {
            bool copied = true;
            switch (lua_type(caller, -1)) {
            case LUA_TBOOLEAN:
                lua_pushboolean(L, lua_toboolean(caller, -1));
                break;
            case LUA_TNUMBER:
                lua_pushnumber(L, lua_tonumber(caller, -1));
                break;
            case LUA_TSTRING:
                lua_pushstring(L, lua_tostring(caller, -1));
                break;
            case LUA_TFUNCTION:
                if (lua_tocfunction(caller, -1)) {
                    if (lua_getupvalue(caller, -1, 1) != nullptr) {
                        lua_pop(caller, 1);
                        copied = false;
                        break;
                    }
                    lua_pushcfunction(L, lua_tocfunction(caller, -1));
                    break;
                }
                copied = false;
                break;
            default:
                copied = false;
            }
            if (copied && lua_type(caller, -2) == LUA_TSTRING) {
                lua_setfield(L, -2, lua_tostring(caller, -2));
            } else if (copied) {
                lua_pop(L, 1);
            }
            lua_pop(caller, 1);
        }
    }
    lua_pop(caller, 2);
    lua_pop(L, 1);

    if (!openShared(L, err)) {
        return false;
    }
    lua_setglobal(L, "ngx");
    bindSharedDicts(L, mainConf());

    // The caller's module paths: a lua_vm tenant's modules only.
    for (const char *field : {"path", "cpath"}) {
        lua_getglobal(caller, "package");
        lua_getfield(caller, -1, field);
        size_t len = 0;
        const char *s = lua_tolstring(caller, -1, &len);
        if (s != nullptr) {
            lua_getglobal(L, "package");
            lua_pushlstring(L, s, len);
            lua_setfield(L, -2, field);
            lua_pop(L, 1);
        }
        lua_pop(caller, 2);
    }
    return sandbox::install(L, err);
}

}  // namespace luaguard::api
