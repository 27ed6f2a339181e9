// The timer driver: ngx.timer.* callbacks armed as nginx timers and run in
// their own entry thread on a fake request (a connection slot with no
// socket and a pool of its own) carrying the configuration of the
// location that created the timer (socket timeouts, budgets, sandbox
// policy). The fake request lives exactly as long as the callback's
// threads and is destroyed with its pool, which releases everything the
// callback anchored. api/timer.cpp checks the arguments and calls addTimer.

//
// Every timer belongs to the location that created it (a timer created by
// a callback to the same location; init_worker_by_lua's to the http
// level). Per worker, a location's Account holds what its timers take
// together: pending slots (lua_max_pending_timers_per_location), bytes
// parked in their arguments (lua_timer_memory_per_location) and a bucket
// of callback Lua time refilled at lua_timer_cpu_per_location: once it is
// empty, ngx.timer.every firings are skipped and ngx.timer.at callbacks
// delayed until it holds time again, so one location's timers cannot
// take the worker from the others (docs/budgets.md "Timers").

#include <new>
#include <tuple>

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"
#include "security/timer_budget.hpp"

namespace luaguard::glue {

namespace {

// What one location's timers hold in this worker. Allocated on first use
// and kept for the worker's life (one per location configuration).
struct Account {
    ngx_uint_t          pending;
    size_t              bytes;       // estimated, of pending timers' args
    budget::TimeBucket  cpu;         // lua_timer_cpu_per_location
    bool                over_logged; // the empty bucket was logged
    // A refusal was logged; cleared by the next timer created, so that a
    // loop of refused creations logs one line, not one per call.
    bool                refusal_logged;
    ngx_queue_t         running;     // Running: not yet fully charged
};

// A callback in progress, in its fake request's pool: the Lua time it
// has used is charged to its account as it goes (settle), not only at
// the end, so a flood of long callbacks empties the bucket while they run.
struct Running {
    ngx_queue_t  link;
    RequestCtx  *ctx;
    uint64_t     charged_ns;
};

struct Timer {
    ngx_event_t  ev;
    ngx_queue_t  pending;     // in g_pending_list while armed
    // A coroutine of the VM's pool, not run: its stack holds the callback
    // and its arguments (n values), anchored by holder_ref. Cheaper than
    // a table in the registry, and an at timer's values move from it
    // straight onto the callback's thread.
    lua_State   *holder;
    int          holder_ref;
    int          n;
    ngx_msec_t   delay;
    bool         every;
    size_t       bytes;       // charged to account->bytes until freed
    Account     *account;
    Vm          *vm;          // where the callback and its arguments live
    void       **main_conf;
    void       **srv_conf;
    void       **loc_conf;
};

ngx_uint_t g_pending = 0;
ngx_uint_t g_running = 0;
ngx_queue_t g_pending_list;   // armed timers, fired early at worker exit

// Freed Timer structs kept for the next ones (linked through ev.data): a
// timer per request otherwise costs a malloc and a free (~190
// instructions). At most kSpareTimers are kept: a burst of timers gives
// its memory back. None under ASan, which then still sees a use of a
// freed timer.
#if defined(__SANITIZE_ADDRESS__)
constexpr ngx_uint_t kSpareTimers = 0;
#else
constexpr ngx_uint_t kSpareTimers = 64;
#endif
Timer *g_spare = nullptr;
ngx_uint_t g_nspare = 0;

Timer *newTimer()
{
    Timer *tm = g_spare;
    if (tm == nullptr) {
        return static_cast<Timer *>(ngx_calloc(sizeof(Timer),
                                               ngx_cycle->log));
    }
    g_spare = static_cast<Timer *>(tm->ev.data);
    g_nspare--;
    *tm = Timer{};
    return tm;
}

void releaseTimer(Timer *tm)
{
    if (g_nspare >= kSpareTimers) {
        ngx_free(tm);
        return;
    }
    tm->ev.data = g_spare;
    g_spare = tm;
    g_nspare++;
}

LocConf *locOf(void **loc_conf)
{
    return static_cast<LocConf *>(
        loc_conf[ngx_http_luaguard_module.ctx_index]);
}

void **httpLocConf()
{
    auto *hc = reinterpret_cast<ngx_http_conf_ctx_t *>(
        ngx_get_conf(ngx_cycle->conf_ctx, ngx_http_module));
    return hc->loc_conf;
}

Account *accountOf(LocConf *lcf)
{
    if (lcf->timer_account == nullptr) {
        void *p = ngx_alloc(sizeof(Account), ngx_cycle->log);
        if (p == nullptr) {
            return nullptr;
        }
        auto *a = new (p) Account();
        a->pending = 0;
        a->bytes = 0;
        a->over_logged = false;
        a->refusal_logged = false;
        a->cpu.start(lcf->timer_cpu * 1'000'000ull,
                     lcf->timer_cpu_interval * 1'000'000ull,
                     budget::nowNs());
        ngx_queue_init(&a->running);
        lcf->timer_account = a;
    }
    return static_cast<Account *>(lcf->timer_account);
}

// Charges the Lua time the running callbacks have used since the last
// look, and refills the bucket for the time elapsed.
void settle(Account *a)
{
    budget::Guard &guard = budget::Guard::instance();
    for (ngx_queue_t *q = ngx_queue_head(&a->running);
         q != ngx_queue_sentinel(&a->running); q = ngx_queue_next(q))
    {
        Running *run = ngx_queue_data(q, Running, link);
        uint64_t used = guard.usedNs(run->ctx->usage);
        a->cpu.spend(used - run->charged_ns);
        run->charged_ns = used;
    }
    a->cpu.refill(budget::nowNs());
}

void freeTimer(Timer *tm)
{
    if (tm->holder) {   // null once its callback's thread took it over
        tm->vm->giveThread(tm->holder, tm->holder_ref);
    }
    tm->account->bytes -= tm->bytes;
    releaseTimer(tm);
}

void runDone(RequestCtx *ctx)
{
    g_running--;
    if (Account *a = static_cast<Account *>(ctx->llcf->timer_account)) {
        for (ngx_queue_t *q = ngx_queue_head(&a->running);
             q != ngx_queue_sentinel(&a->running); q = ngx_queue_next(q))
        {
            Running *run = ngx_queue_data(q, Running, link);
            if (run->ctx == ctx) {
                settle(a);   // its last run is charged
                ngx_queue_remove(q);
                break;
            }
        }
    }
    destroyFake(ctx->r->connection);
}

RequestCtx *fakeRequest(Timer *tm)
{
    RequestCtx *ctx = glue::fakeRequest(tm->main_conf, tm->srv_conf,
                                        tm->loc_conf, tm->vm, ngx_cycle->log);
    if (ctx == nullptr) {
        return nullptr;
    }
    ctx->on_done = runDone;
    ctx->limits = &ctx->llcf->timer_limits;
    ctx->thread_phase = Phase::Timer;
    return ctx;
}

bool arm(Timer *tm, ngx_msec_t delay)
{
    MainConf *mcf = mainConf();
    if (g_pending >= mcf->max_pending_timers) {
        return false;
    }
    if (g_pending_list.next == nullptr) {
        ngx_queue_init(&g_pending_list);
    }
    ngx_add_timer(&tm->ev, delay);
    ngx_queue_insert_tail(&g_pending_list, &tm->pending);
    g_pending++;
    tm->account->pending++;
    return true;
}

// True when the location's callbacks have used up their Lua time: this
// firing does not run (an every timer waits for its next firing, an at
// timer is armed again for when the bucket holds time).
bool outOfCpu(Timer *tm, LocConf *lcf)
{
    Account *a = tm->account;
    settle(a);
    if (!a->cpu.empty()) {
        a->over_logged = false;
        return false;
    }
    if (!a->over_logged) {
        a->over_logged = true;
        auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
            tm->loc_conf[ngx_http_core_module.ctx_index]);
        static const ngx_str_t kHttp = ngx_string("(http)");
        ngx_str_t name = clcf->name.len ? clcf->name : kHttp;
        ngx_log_error(NGX_LOG_WARN, ngx_cycle->log, 0,
                      "lua timer: the timers of location \"%V\" used "
                      "their Lua time (lua_timer_cpu_per_location %Mms "
                      "per %Mms): firings are skipped or delayed until it "
                      "is refilled", &name, lcf->timer_cpu,
                      lcf->timer_cpu_interval);
    }
    metrics::countTimerStop(lcf, metrics::TimerStop::Cpu);
    return true;
}

void fired(ngx_event_t *ev)
{
    auto *tm = static_cast<Timer *>(ev->data);
    MainConf *mcf = mainConf();
    LocConf *lcf = locOf(tm->loc_conf);
    g_pending--;
    tm->account->pending--;
    ngx_queue_remove(&tm->pending);

    // Worker shutdown cancels pending timers by firing them: the callback
    // learns it from `premature`.
    bool premature = ngx_exiting || ngx_quit || ngx_terminate;
    bool keep = tm->every && !premature && arm(tm, tm->delay);

    // Premature firings always run: scripts flush their state in them.
    if (!premature && outOfCpu(tm, lcf)) {
        ngx_msec_t wait = tm->account->cpu.untilRefilled() / 1'000'000 + 1;
        if (!tm->every && arm(tm, wait)) {
            return;
        }
        if (!keep) {
            freeTimer(tm);
        }
        return;
    }

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
    std::string err;   // empty (no allocation) unless something fails
    // A timer that does not fire again lends its holder to the callback:
    // the values are already on it, in place.
    bool adopted = false;
    if (ctx && !keep) {
        t = threads::adopt(ctx, tm->holder, tm->holder_ref);
        adopted = t != nullptr;
    } else if (ctx) {
        entry::protect(ctx->vm->L(), [&] {
            t = threads::create(ctx, nullptr);
        }, &err);
    }
    if (t == nullptr) {
        ngx_log_error(NGX_LOG_ERR, ngx_cycle->log, 0, "lua timer: %s",
                      err.empty()
                          ? "no memory or no free connection for the callback"
                          : err.c_str());
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
    if (auto *run = static_cast<Running *>(ngx_pcalloc(ctx->r->pool,
                                                       sizeof(Running))))
    {
        run->ctx = ctx;
        ngx_queue_insert_tail(&tm->account->running, &run->link);
    }

    // The thread's stack: callback, premature, the arguments. An every
    // timer copies them, its holder keeps them for the next firing.
    lua_State *co = t->co;
    int n = tm->n;
    if (adopted) {
        tm->holder = nullptr;   // the thread's now, given back with it
    }
    bool ok = entry::protect(co, [&] {
        if (!adopted) {
            if (keep) {
                for (int i = 1; i <= n; i++) {
                    lua_pushvalue(tm->holder, i);
                }
            }
            lua_xmove(tm->holder, co, n);
        }
        lua_pushboolean(co, premature);
        lua_insert(co, 2);
    }, &err);
    if (!keep) {
        freeTimer(tm);
    } else if (!ok) {
        lua_settop(tm->holder, n);   // its own values, for the next firing
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

void destroyFake(ngx_connection_t *c)
{
    // Destroying the pool runs the ctx cleanup: threads killed, refs
    // released.
    ngx_destroy_pool(c->pool);
    ngx_free_connection(c);
}

RequestCtx *fakeRequest(void **main_conf, void **srv_conf, void **loc_conf,
                        Vm *vm, ngx_log_t *log)
{
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
    r->main_conf = main_conf;
    r->srv_conf = srv_conf;
    r->loc_conf = loc_conf;

    RequestCtx *ctx = createCtx(r, vm);
    if (ctx == nullptr) {
        destroyFake(c);
        return nullptr;
    }
    ctx->is_timer = true;
    return ctx;
}

size_t timerMemoryLeft(RequestCtx *creator)
{
    LocConf *lcf = locOf(creator ? creator->r->loc_conf : httpLocConf());
    Account *a = accountOf(lcf);
    if (lcf->timer_max_memory == 0) {
        return SIZE_MAX;
    }
    auto max = static_cast<size_t>(lcf->timer_max_memory);
    size_t held = a ? a->bytes : 0;
    return held < max ? max - held : 0;
}

TimerAdd addTimer(lua_State *L, int n, ngx_msec_t delay, bool every,
                  RequestCtx *creator, size_t bytes)
{
    MainConf *mcf = mainConf();
    void **loc_conf = creator ? creator->r->loc_conf : httpLocConf();
    LocConf *lcf = locOf(loc_conf);
    Account *a = accountOf(lcf);
    TimerAdd refused = TimerAdd::Ok;
    if (g_pending >= mcf->max_pending_timers) {
        refused = TimerAdd::TooMany;
    } else if (a == nullptr) {
        refused = TimerAdd::NoMemory;
    } else if (a->pending >= lcf->timer_max_pending) {
        // The location's share is taken; other locations still get slots.
        if (!a->refusal_logged) {
            ngx_log_error(NGX_LOG_WARN, currentLog(), 0,
                          "lua timer: too many pending timers: the "
                          "location holds %ui "
                          "(lua_max_pending_timers_per_location)",
                          a->pending);
        }
        a->refusal_logged = true;
        metrics::countTimerStop(lcf, metrics::TimerStop::Pending);
        refused = TimerAdd::TooMany;
    } else if (lcf->timer_max_memory
               && (bytes > static_cast<size_t>(lcf->timer_max_memory)
                   || a->bytes > static_cast<size_t>(lcf->timer_max_memory)
                                 - bytes))
    {
        if (!a->refusal_logged) {
            ngx_log_error(NGX_LOG_WARN, currentLog(), 0,
                          "lua timer: arguments of about %uz bytes "
                          "refused: the location's pending timers hold %uz "
                          "of %O (lua_timer_memory_per_location)", bytes,
                          a->bytes, lcf->timer_max_memory);
        }
        a->refusal_logged = true;
        metrics::countTimerStop(lcf, metrics::TimerStop::Memory);
        refused = TimerAdd::TooMuchMemory;
    }
    Timer *tm = nullptr;
    if (refused == TimerAdd::Ok) {
        tm = newTimer();
        if (tm == nullptr) {
            refused = TimerAdd::NoMemory;
        }
    }
    if (refused != TimerAdd::Ok) {
        return refused;
    }
    tm->vm = creator ? creator->vm : mcf->vm;
    std::string err;
    bool held = entry::protect(L, [&] {
        std::tie(tm->holder, tm->holder_ref) = tm->vm->takeThread();
        // Its last use may have left its LuaThread there; it never runs
        // as a holder.
        lua_setexdata(tm->holder, nullptr);
        lua_xmove(L, tm->holder, n);
    }, &err);
    if (!held) {
        if (tm->holder) {
            tm->vm->giveThread(tm->holder, tm->holder_ref);
        }
        releaseTimer(tm);
        return TimerAdd::NoMemory;
    }
    tm->n = n;
    tm->delay = delay;
    tm->every = every;
    tm->account = a;
    tm->bytes = bytes;
    a->bytes += bytes;
    a->refusal_logged = false;

    // The callback runs with the configuration of where it was created.
    if (creator) {
        tm->main_conf = creator->r->main_conf;
        tm->srv_conf = creator->r->srv_conf;
    } else {
        auto *hc = reinterpret_cast<ngx_http_conf_ctx_t *>(
            ngx_get_conf(ngx_cycle->conf_ctx, ngx_http_module));
        tm->main_conf = hc->main_conf;
        tm->srv_conf = hc->srv_conf;
    }
    tm->loc_conf = loc_conf;

    tm->ev.handler = entry::edge<fired>;
    tm->ev.data = tm;
    tm->ev.log = ngx_cycle->log;
    // Pending timers do not hold a worker's graceful exit: they are fired
    // early, with premature set.
    tm->ev.cancelable = 1;
    arm(tm, delay);
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
