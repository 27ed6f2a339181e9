// ngx.timer.at / every / running_count / pending_count.
//
// A timer's callback runs in its own entry thread on a fake request: a
// connection slot with no socket and a pool of its own, carrying the
// configuration of the location that created the timer (socket timeouts,
// budgets). The fake request lives exactly as long as the callback's
// threads and is destroyed with its pool, which releases everything the
// callback anchored.

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"

namespace luaguard::api {

namespace {

struct Timer {
    ngx_event_t  ev;
    ngx_queue_t  pending;     // in g_pending_list while armed
    int          ref;         // {f, arg1, ..., n = N}
    ngx_msec_t   delay;
    bool         every;
    void       **main_conf;
    void       **srv_conf;
    void       **loc_conf;
};

ngx_uint_t g_pending = 0;
ngx_uint_t g_running = 0;
ngx_queue_t g_pending_list;   // armed timers, fired early at worker exit

void freeTimer(Timer *tm)
{
    if (MainConf *mcf = mainConf()) {
        luaL_unref(mcf->vm->L(), LUA_REGISTRYINDEX, tm->ref);
    }
    ngx_free(tm);
}

void runDone(RequestCtx *ctx)
{
    ngx_connection_t *c = ctx->r->connection;
    g_running--;
    // Destroying the pool runs the ctx cleanup: threads killed, refs
    // released.
    ngx_destroy_pool(c->pool);
    ngx_free_connection(c);
}

RequestCtx *fakeRequest(Timer *tm)
{
    ngx_log_t *log = ngx_cycle->log;
    ngx_connection_t *c = ngx_get_connection(static_cast<ngx_socket_t>(-1),
                                             log);
    if (c == nullptr) {
        return nullptr;
    }
    c->pool = ngx_create_pool(4096, log);
    if (c->pool == nullptr) {
        ngx_free_connection(c);
        return nullptr;
    }
    auto *clog = static_cast<ngx_log_t *>(ngx_palloc(c->pool,
                                                     sizeof(ngx_log_t)));
    auto *r = static_cast<ngx_http_request_t *>(
        ngx_pcalloc(c->pool, sizeof(ngx_http_request_t)));
    void **modctx = static_cast<void **>(
        ngx_pcalloc(c->pool, sizeof(void *) * ngx_http_max_module));
    if (clog == nullptr || r == nullptr || modctx == nullptr) {
        ngx_destroy_pool(c->pool);
        ngx_free_connection(c);
        return nullptr;
    }
    *clog = *log;
    clog->data = nullptr;
    clog->handler = nullptr;
    c->log = clog;
    c->read->log = clog;
    c->write->log = clog;
    c->number = ngx_atomic_fetch_add(ngx_connection_counter, 1);
    c->fd = static_cast<ngx_socket_t>(-1);
    c->data = r;

    r->pool = c->pool;
    r->connection = c;
    r->main = r;
    r->count = 1;
    r->ctx = modctx;
    r->signature = NGX_HTTP_MODULE;
    r->main_conf = tm->main_conf;
    r->srv_conf = tm->srv_conf;
    r->loc_conf = tm->loc_conf;

    RequestCtx *ctx = createCtx(r);
    if (ctx == nullptr) {
        ngx_destroy_pool(c->pool);
        ngx_free_connection(c);
        return nullptr;
    }
    ctx->is_timer = true;
    ctx->on_done = runDone;
    ctx->limits = &ctx->llcf->timer_limits;
    ctx->thread_phase = Phase::Timer;
    return ctx;
}

bool arm(Timer *tm)
{
    MainConf *mcf = mainConf();
    if (g_pending >= mcf->max_pending_timers) {
        return false;
    }
    if (g_pending_list.next == nullptr) {
        ngx_queue_init(&g_pending_list);
    }
    ngx_add_timer(&tm->ev, tm->delay);
    ngx_queue_insert_tail(&g_pending_list, &tm->pending);
    g_pending++;
    return true;
}

void fired(ngx_event_t *ev)
{
    auto *tm = static_cast<Timer *>(ev->data);
    MainConf *mcf = mainConf();
    g_pending--;
    ngx_queue_remove(&tm->pending);

    // Worker shutdown cancels pending timers by firing them: the callback
    // learns it from `premature`.
    bool premature = ngx_exiting || ngx_quit || ngx_terminate;
    bool keep = tm->every && !premature && arm(tm);

    if (g_running >= mcf->max_running_timers) {
        ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                      "%ui lua_max_running_timers are not enough",
                      mcf->max_running_timers);
        if (!keep) {
            freeTimer(tm);
        }
        return;
    }

    RequestCtx *ctx = fakeRequest(tm);
    if (ctx == nullptr) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0,
                      "lua timer: no memory or no free connection for the "
                      "callback");
        if (!keep) {
            freeTimer(tm);
        }
        return;
    }

    LuaThread *t = threads::create(ctx, nullptr);
    if (t == nullptr) {
        ngx_destroy_pool(ctx->r->pool);
        ngx_free_connection(ctx->r->connection);
        if (!keep) {
            freeTimer(tm);
        }
        return;
    }
    ctx->entry = t;
    g_running++;

    // The thread's stack: callback, premature, the arguments.
    lua_State *co = t->co;
    lua_rawgeti(co, LUA_REGISTRYINDEX, tm->ref);
    lua_getfield(co, 1, "n");
    int n = static_cast<int>(lua_tointeger(co, -1));
    lua_pop(co, 1);
    lua_rawgeti(co, 1, 1);
    lua_pushboolean(co, premature);
    for (int i = 2; i <= n; i++) {
        lua_rawgeti(co, 1, i);
    }
    lua_remove(co, 1);
    if (!keep) {
        freeTimer(tm);
    }

    if (threads::run(t, n)) {
        runDone(ctx);
    }
}

int create(lua_State *L, bool every)
{
    glue::checkPhase(L, mask(Phase::InitWorker, Phase::Set,
                             Phase::ServerRewrite, Phase::Rewrite,
                             Phase::Access, Phase::Content, Phase::Log,
                             Phase::HeaderFilter, Phase::BodyFilter,
                             Phase::Timer));
    sandbox::require(L, sandbox::Capability::Timer);
    lua_Number delay = luaL_checknumber(L, 1);
    if (every && delay <= 0) {
        return luaL_error(L, "delay cannot be zero");
    }
    if (delay < 0) {
        delay = 0;  // as lua-nginx-module: a past deadline fires at once
    }
    if (lua_type(L, 2) != LUA_TFUNCTION) {
        return luaL_argerror(L, 2, "Lua function expected");
    }
    if (ngx_exiting || ngx_quit || ngx_terminate) {
        lua_pushnil(L);
        lua_pushliteral(L, "process exiting");
        return 2;
    }
    MainConf *mcf = mainConf();
    if (g_pending >= mcf->max_pending_timers) {
        lua_pushnil(L);
        lua_pushliteral(L, "too many pending timers");
        return 2;
    }

    auto *tm = static_cast<Timer *>(ngx_calloc(sizeof(Timer),
                                               ngx_cycle->log));
    if (tm == nullptr) {
        return luaL_error(L, "no memory");
    }
    int n = lua_gettop(L) - 1;         // the callback and its arguments
    lua_createtable(L, n, 1);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, i + 1);
        lua_rawseti(L, -2, i);
    }
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "n");
    tm->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    tm->delay = static_cast<ngx_msec_t>(delay * 1000 + 0.5);
    tm->every = every;

    // The callback runs with the configuration of where it was created.
    RequestCtx *ctx = g_run ? g_run->ctx : nullptr;
    if (ctx) {
        tm->main_conf = ctx->r->main_conf;
        tm->srv_conf = ctx->r->srv_conf;
        tm->loc_conf = ctx->r->loc_conf;
    } else {
        auto *hc = reinterpret_cast<ngx_http_conf_ctx_t *>(
            ngx_get_conf(ngx_cycle->conf_ctx, ngx_http_module));
        tm->main_conf = hc->main_conf;
        tm->srv_conf = hc->srv_conf;
        tm->loc_conf = hc->loc_conf;
    }

    tm->ev.handler = fired;
    tm->ev.data = tm;
    tm->ev.log = ngx_cycle->log;
    // Pending timers do not hold a worker's graceful exit: they are fired
    // early, with premature set.
    tm->ev.cancelable = 1;
    arm(tm);
    lua_pushinteger(L, 1);
    return 1;
}

int at(lua_State *L)
{
    return create(L, false);
}

int every(lua_State *L)
{
    return create(L, true);
}

int runningCount(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(g_running));
    return 1;
}

int pendingCount(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(g_pending));
    return 1;
}

}  // namespace

ngx_uint_t timersPending()
{
    return g_pending;
}

ngx_uint_t timersRunning()
{
    return g_running;
}

void firePendingTimers()
{
    // nginx drops cancelable timers when a worker exits; lua-nginx-module
    // runs their callbacks with premature set, so scripts can flush state.
    if (g_pending_list.next == nullptr) {
        return;
    }
    while (!ngx_queue_empty(&g_pending_list)) {
        ngx_queue_t *q = ngx_queue_head(&g_pending_list);
        Timer *tm = ngx_queue_data(q, Timer, pending);
        if (tm->ev.timer_set) {
            ngx_del_timer(&tm->ev);
        }
        fired(&tm->ev);
    }
}

void openTimer(lua_State *L)
{
    subTable(L, "timer");
    const luaL_Reg fns[] = {{"at", at},
                            {"every", every},
                            {"running_count", runningCount},
                            {"pending_count", pendingCount},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
}

}  // namespace luaguard::api
