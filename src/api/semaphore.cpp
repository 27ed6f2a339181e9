// require "ngx.semaphore": counting semaphores between the Lua threads of
// one worker (requests, light threads, timers).

#include "api/api.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"

namespace luaguard::api {

namespace {

const char kSemaMeta[] = "luaguard.semaphore";

struct Waiter {
    LuaThread *thread;
    Waiter    *next;
    Waiter    *prev;
};

// Userdata. The waiting threads keep it alive: each has it on its stack
// (the `self` of wait()).
struct Semaphore {
    lua_Integer resources;
    Waiter     *head;
    Waiter     *tail;
    lua_Integer nwaiters;
};

Semaphore *check(lua_State *L)
{
    return static_cast<Semaphore *>(luaL_checkudata(L, 1, kSemaMeta));
}

void unlink(Semaphore *s, Waiter *w)
{
    (w->prev ? w->prev->next : s->head) = w->next;
    (w->next ? w->next->prev : s->tail) = w->prev;
    s->nwaiters--;
}

struct Wait {
    Waiter     link;
    Semaphore *sema;
};

void restore(LuaThread *t)
{
    t->cancel = nullptr;
    t->cancel_data = nullptr;
    threads::resetWake(t);
}

void cancelWait(LuaThread *t)
{
    auto *w = static_cast<Wait *>(t->cancel_data);
    unlink(w->sema, &w->link);
    restore(t);
}

void timedOut(ngx_event_t *ev)
{
    auto *t = static_cast<LuaThread *>(ev->data);
    auto *w = static_cast<Wait *>(t->cancel_data);
    unlink(w->sema, &w->link);
    restore(t);
    entry::resume(t, [](lua_State *co) {
        lua_pushboolean(co, 0);
        lua_pushliteral(co, "timeout");
        return 2;
    });
}

int semaNew(lua_State *L)
{
    // Called as semaphore.new(n) or semaphore:new(n)? lua-resty-core
    // documents semaphore.new(n).
    int idx = lua_istable(L, 1) ? 2 : 1;
    lua_Integer n = luaL_optinteger(L, idx, 0);
    if (n < 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "no memory");
        return 2;
    }
    auto *s = static_cast<Semaphore *>(lua_newuserdata(L, sizeof(Semaphore)));
    *s = Semaphore{n, nullptr, nullptr, 0};
    luaL_getmetatable(L, kSemaMeta);
    lua_setmetatable(L, -2);
    return 1;
}

void wakeOne(Semaphore *s)
{
    Waiter *w = s->head;
    unlink(s, w);
    s->resources--;
    LuaThread *t = w->thread;
    restore(t);
    if (t->wake.timer_set) {
        ngx_del_timer(&t->wake);
    }
    // Resumed on a later turn of the event loop, never from inside the
    // poster's call.
    threads::post(t, WakeWith::TrueNil);
}

int semaPost(lua_State *L)
{
    Semaphore *s = check(L);
    lua_Integer n = luaL_optinteger(L, 2, 1);
    if (n < 1) {
        return luaL_error(L, "bad argument #2 to 'post' (positive number "
                          "expected)");
    }
    s->resources += n;
    while (s->resources > 0 && s->head) {
        wakeOne(s);
    }
    lua_pushboolean(L, 1);
    return 1;
}

int semaWait(lua_State *L)
{
    Semaphore *s = check(L);
    lua_Number timeout = luaL_optnumber(L, 2, 0);
    if (timeout < 0) {
        return luaL_error(L, "bad argument #2 to 'wait' (non-negative "
                          "number expected)");
    }
    if (s->resources > 0 && s->head == nullptr) {
        s->resources--;
        lua_pushboolean(L, 1);
        return 1;
    }
    if (timeout == 0) {
        lua_pushnil(L);
        lua_pushliteral(L, "timeout");
        return 2;
    }
    Phase p = g_run ? g_run->phase : Phase::None;
    if (!(mask(p) & kYieldable)) {
        // A wait that would have to yield: an error value, as in
        // lua-nginx-module, not a raised error.
        lua_pushnil(L);
        glue::pushDisabled(L, p);
        return 2;
    }
    LuaThread *t = threads::current();
    if (t == nullptr) {
        return luaL_error(L, "no request found");
    }
    RequestCtx *ctx = t->ctx;
    auto *w = static_cast<Wait *>(ngx_pcalloc(ctx->r->pool, sizeof(Wait)));
    if (w == nullptr) {
        return luaL_error(L, "no memory");
    }
    w->sema = s;
    w->link.thread = t;
    w->link.prev = s->tail;
    (s->tail ? s->tail->next : s->head) = &w->link;
    s->tail = &w->link;
    s->nwaiters++;

    t->cancel = cancelWait;
    t->cancel_data = w;
    t->wake.handler = entry::edge<timedOut>;
    ngx_add_timer(&t->wake, static_cast<ngx_msec_t>(timeout * 1000 + 0.5));
    return glue::yield(L);
}

int semaCount(lua_State *L)
{
    Semaphore *s = check(L);
    lua_pushinteger(L, s->resources - s->nwaiters);
    return 1;
}

int openModule(lua_State *L)
{
    // The methods too, as lua-resty-core's module table is the objects'
    // __index (semaphore.wait(sema, 1) works).
    const luaL_Reg fns[] = {{"new", semaNew},
                            {"post", semaPost},
                            {"wait", semaWait},
                            {"count", semaCount},
                            {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

void openSemaphore(lua_State *L)
{
    luaL_newmetatable(L, kSemaMeta);
    lua_createtable(L, 0, 3);
    const luaL_Reg methods[] = {{"post", semaPost},
                                {"wait", semaWait},
                                {"count", semaCount},
                                {nullptr, nullptr}};
    setFuncs(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    preload(L, "ngx.semaphore", openModule);
}

}  // namespace luaguard::api
