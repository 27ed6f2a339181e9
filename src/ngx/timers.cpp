// The timer driver: ngx.timer.* callbacks armed as nginx timers and run in
// their own entry thread on a fake request (a connection slot with no
// socket and a pool of its own) carrying the configuration of the
// location that created the timer (socket timeouts, budgets, sandbox
// policy). The fake request lives exactly as long as the callback's
// threads and is destroyed with its pool, which releases everything the
// callback anchored. api/timer.cpp checks the arguments and calls addTimer.

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"

namespace luaguard::glue {

namespace {

struct Timer {
    ngx_event_t  ev;
    ngx_queue_t  pending;     // in g_pending_list while armed
    int          ref;         // {f, arg1, ..., n = N}: owned
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

void destroyFake(ngx_connection_t *c)
{
    // Destroying the pool runs the ctx cleanup: threads killed, refs
    // released.
    ngx_destroy_pool(c->pool);
    ngx_free_connection(c);
}

void runDone(RequestCtx *ctx)
{
    g_running--;
    destroyFake(ctx->r->connection);
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
        destroyFake(c);
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
        destroyFake(c);
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
    LuaThread *t = nullptr;
    std::string err = "no memory or no free connection for the callback";
    if (ctx) {
        entry::protect(mcf->vm->L(), [&] {
            t = threads::create(ctx, nullptr);
        }, &err);
    }
    if (t == nullptr) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0, "lua timer: %s",
                      err.c_str());
        if (ctx) {
            destroyFake(ctx->r->connection);
        }
        if (!keep) {
            freeTimer(tm);
        }
        return;
    }
    ctx->entry = t;
    g_running++;

    // The thread's stack: callback, premature, the arguments.
    lua_State *co = t->co;
    int n = 0;
    bool ok = entry::protect(co, [&] {
        lua_rawgeti(co, LUA_REGISTRYINDEX, tm->ref);
        lua_getfield(co, 1, "n");
        n = static_cast<int>(lua_tointeger(co, -1));
        lua_pop(co, 1);
        lua_rawgeti(co, 1, 1);
        lua_pushboolean(co, premature);
        for (int i = 2; i <= n; i++) {
            lua_rawgeti(co, 1, i);
        }
        lua_remove(co, 1);
    }, &err);
    if (!keep) {
        freeTimer(tm);
    }
    if (!ok) {
        // As a callback that raised: logged, its fake request ended.
        if (threads::fail(t, err)) {
            runDone(ctx);
        }
        return;
    }
    if (threads::run(t, n)) {
        runDone(ctx);
    }
}

}  // namespace

TimerAdd addTimer(lua_State *L, int ref, ngx_msec_t delay, bool every,
                  RequestCtx *creator)
{
    MainConf *mcf = mainConf();
    if (g_pending >= mcf->max_pending_timers) {
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        return TimerAdd::TooMany;
    }
    auto *tm = static_cast<Timer *>(ngx_calloc(sizeof(Timer),
                                               ngx_cycle->log));
    if (tm == nullptr) {
        luaL_unref(L, LUA_REGISTRYINDEX, ref);
        return TimerAdd::NoMemory;
    }
    tm->ref = ref;
    tm->delay = delay;
    tm->every = every;

    // The callback runs with the configuration of where it was created.
    if (creator) {
        tm->main_conf = creator->r->main_conf;
        tm->srv_conf = creator->r->srv_conf;
        tm->loc_conf = creator->r->loc_conf;
    } else {
        auto *hc = reinterpret_cast<ngx_http_conf_ctx_t *>(
            ngx_get_conf(ngx_cycle->conf_ctx, ngx_http_module));
        tm->main_conf = hc->main_conf;
        tm->srv_conf = hc->srv_conf;
        tm->loc_conf = hc->loc_conf;
    }

    tm->ev.handler = entry::edge<fired>;
    tm->ev.data = tm;
    tm->ev.log = ngx_cycle->log;
    // Pending timers do not hold a worker's graceful exit: they are fired
    // early, with premature set.
    tm->ev.cancelable = 1;
    arm(tm);
    return TimerAdd::Ok;
}

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

}  // namespace luaguard::glue
