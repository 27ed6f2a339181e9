// ngx.thread.spawn / wait / kill: light threads of a request or timer.

#include "api/api.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"

namespace luaguard::api {

namespace {

constexpr PhaseMask kThreadPhases = kYieldable;

LuaThread *runningThread(lua_State *L)
{
    glue::checkPhase(L, kThreadPhases);
    LuaThread *self = threads::current();
    if (self == nullptr) {
        luaL_error(L, "no request found");
    }
    return self;
}

// The light thread behind argument `idx`, found among the threads of the
// caller's own request: a thread object kept from another request (or a
// plain coroutine) is never mistaken for one.
LuaThread *argThread(lua_State *L, int idx, RequestCtx *ctx)
{
    if (lua_type(L, idx) != LUA_TTHREAD) {
        luaL_argerror(L, idx, "lua thread expected");
    }
    // The newest thread on that coroutine (a cached coroutine serves
    // several in turn); not by its exdata, which a thread that died of an
    // error loses with its reset.
    lua_State *co = lua_tothread(L, idx);
    for (LuaThread *t = ctx->threads; t; t = t->next) {
        if (t->co == co) {
            return t->entry ? nullptr : t;
        }
    }
    return nullptr;
}

int spawn(lua_State *L)
{
    LuaThread *self = runningThread(L);
    sandbox::require(L, sandbox::Capability::Timer);
    RequestCtx *ctx = self->ctx;
    if (lua_type(L, 1) != LUA_TFUNCTION) {
        return luaL_argerror(L, 1, "Lua function expected");
    }
    // The spawner yields to let the new thread start (see threads::spawn).
    glue::checkYieldable(L);

    LuaThread *t = threads::create(ctx, self);
    if (t == nullptr) {
        return luaL_error(L, "no memory");
    }
    int n = lua_gettop(L);
    // Growing the new thread's stack may fail: caught here, not left to
    // unwind this coroutine with an error raised on another.
    std::string err;
    if (!entry::protect(t->co, [&] { lua_xmove(L, t->co, n); }, &err)) {
        threads::kill(t);
        return luaL_error(L, "no memory");
    }

    return threads::spawn(L, self, t, n - 1);
}

int wait(lua_State *L)
{
    LuaThread *self = runningThread(L);
    RequestCtx *ctx = self->ctx;
    int n = lua_gettop(L);
    if (n == 0) {
        return luaL_error(L, "at least one coroutine should be specified");
    }

    auto **list = static_cast<LuaThread **>(
        ngx_palloc(ctx->r->pool, n * sizeof(LuaThread *)));
    if (list == nullptr) {
        return luaL_error(L, "no memory");
    }
    for (int i = 1; i <= n; i++) {
        LuaThread *t = argThread(L, i, ctx);
        if (t == nullptr) {
            return luaL_error(L, "attempt to wait on a coroutine that is "
                              "not a user thread");
        }
        if (t->parent != self) {
            return luaL_error(L, "only the parent coroutine can wait on the "
                              "thread");
        }
        if (t->reaped) {
            lua_pushnil(L);
            lua_pushliteral(L, "already waited or killed");
            return 2;
        }
        list[i - 1] = t;
    }

    for (int i = 0; i < n; i++) {
        LuaThread *t = list[i];
        if (t->dead) {
            // Already over: its results, as coroutine.resume gives them.
            int nres = lua_gettop(t->co);
            lua_pushboolean(L, !t->failed);
            lua_xmove(t->co, L, nres);
            t->reaped = true;
            threads::release(t);
            return nres + 1;
        }
    }

    for (int i = 0; i < n; i++) {
        list[i]->waiter = self;
    }
    self->waiting_on = list;
    self->nwaiting = n;
    return glue::yield(L);
}

int kill(lua_State *L)
{
    LuaThread *self = runningThread(L);
    LuaThread *t = argThread(L, 1, self->ctx);
    if (t == nullptr) {
        lua_pushnil(L);
        lua_pushliteral(L, "not user thread");
        return 2;
    }
    if (t->parent != self) {
        lua_pushnil(L);
        lua_pushliteral(L, "killer not parent");
        return 2;
    }
    if (t->dead) {
        lua_pushnil(L);
        lua_pushstring(L, t->reaped ? "already waited or killed"
                                    : "already terminated");
        return 2;
    }
    threads::kill(t);
    lua_pushinteger(L, 1);
    return 1;
}

// coroutine.status as lua-nginx-module reports it for light threads: a
// thread suspended on nginx is "running" (scheduled by nginx, not by the
// caller), one that ended but was not waited for is a "zombie".
int coroutineStatus(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTHREAD);
    if (g_run && g_run->ctx) {
        lua_State *co = lua_tothread(L, 1);
        auto *want = static_cast<LuaThread *>(lua_getexdata(co));
        for (LuaThread *t = g_run->ctx->threads; t; t = t->next) {
            if (t == want && t->co == co && !t->running) {
                lua_pushstring(L, !t->dead ? "running"
                                  : t->reaped ? "dead" : "zombie");
                return 1;
            }
        }
    }
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    lua_call(L, 1, 1);
    return 1;
}

}  // namespace

void openThread(lua_State *L)
{
    lua_getglobal(L, "coroutine");
    lua_getfield(L, -1, "status");
    lua_pushcclosure(L, coroutineStatus, 1);
    lua_setfield(L, -2, "status");
    lua_pop(L, 1);

    subTable(L, "thread");
    const luaL_Reg fns[] = {{"spawn", spawn},
                            {"wait", wait},
                            {"kill", kill},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
}

}  // namespace luaguard::api
