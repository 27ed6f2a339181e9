// The scheduler of Lua threads: entry threads, light threads, timers.

#include "ngx/thread.hpp"

#include <string>
#include <tuple>

#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"
#include "ngx/subrequest.hpp"
#include "runtime/vm.hpp"
#include "security/log_escape.hpp"

namespace luaguard {

namespace glue {

char kYieldSentinel;
char kExitSentinel;

std::string errorText(lua_State *L, int idx)
{
    if (lua_type(L, idx) == LUA_TSTRING || lua_type(L, idx) == LUA_TNUMBER) {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return std::string(s, len);
    }
    if (lua_isnil(L, idx)) {
        return "unknown reason";
    }
    return std::string("(error object is a ") + luaL_typename(L, idx)
           + " value)";
}

void logFailure(ngx_log_t *log, const char *what, const std::string &msg,
                const std::string &traceback)
{
    // The message may carry request data: escaped. The traceback keeps its
    // lines (escapedTraceback already escaped the names in them), and
    // safeTraceback makes sure each starts with a tab whatever produced
    // it, so none can pass for a log line of its own.
    std::string line;
    appendLogEscaped(line, msg.data(), msg.size());
    std::string tb = traceback.empty() ? "" : safeTraceback(traceback);
    ngx_log_error(NGX_LOG_ERR, log, 0, "%s: %s%s%s", what, line.c_str(),
                  tb.empty() ? "" : "\n", tb.c_str());
}

int yield(lua_State *L)
{
    if (g_run && g_run->ctx) {
        subreq::watchClientAbort(g_run->ctx);  // lua_check_client_abort
    }
    lua_pushlightuserdata(L, &kYieldSentinel);
    return lua_yield(L, 1);
}

int exitThread(lua_State *L, RequestCtx *ctx)
{
    ctx->exited = true;
    Phase p = g_run ? g_run->phase : Phase::None;
    if ((mask(p) & kYieldable) && g_run->thread) {
        return yield(L);
    }
    lua_pushlightuserdata(L, &kExitSentinel);
    return lua_error(L);
}

void resume(LuaThread *t, int nargs)
{
    RequestCtx *ctx = t->ctx;
    ngx_connection_t *c = ctx->r->connection;
    bool timer = ctx->is_timer;
    if (threads::run(t, nargs)) {
        phaseFinished(ctx);
    }
    if (!timer) {
        ngx_http_run_posted_requests(c);
    }
}

}  // namespace glue

namespace threads {

namespace {

void wakeHandler(ngx_event_t *ev)
{
    auto *t = static_cast<LuaThread *>(ev->data);
    int n = t->wake_nargs;
    t->wake_nargs = 0;
    glue::resume(t, n);
}


void stopWaiting(LuaThread *w)
{
    for (int i = 0; i < w->nwaiting; i++) {
        if (w->waiting_on[i]->waiter == w) {
            w->waiting_on[i]->waiter = nullptr;
        }
    }
    w->nwaiting = 0;
}

// The thread just ended: record it, hand its results to a parent blocked
// in wait(), apply the rules that end the phase.
bool finish(LuaThread *t, int rc)
{
    RequestCtx *ctx = t->ctx;
    lua_State *co = t->co;
    t->dead = true;
    // Only a coroutine whose function returned is reset and reused; one
    // left suspended (ngx.exit, killed) or in error is not.
    t->returned = rc == 0;

    if (rc != 0 && rc != LUA_YIELD) {
        t->failed = true;
        metrics::countError(ctx);
        std::string msg = glue::errorText(co, -1);
        std::string tb = escapedTraceback(co, 0);
        glue::logFailure(ctx->r->connection->log,
                         t->entry ? "lua entry thread aborted: runtime error"
                                  : "lua user thread aborted: runtime error",
                         msg, tb);
        // wait() returns false and the error object.
        lua_pushvalue(co, -1);
        lua_replace(co, 1);
        lua_settop(co, 1);
    } else if (rc == LUA_YIELD) {
        lua_settop(co, 0);  // ended by ngx.exit and friends
    }

    if (t->entry) {
        ctx->entry_done = true;
        ctx->entry_failed = t->failed;
        release(t);
    } else {
        ctx->live_user--;
    }

    if (ctx->exited || ctx->exec_uri.len || ctx->entry_failed) {
        killAll(ctx, nullptr);
        return true;
    }

    if (LuaThread *w = t->waiter) {
        stopWaiting(w);
        int n = lua_gettop(co);
        lua_pushboolean(w->co, !t->failed);
        lua_xmove(co, w->co, n);
        t->reaped = true;
        release(t);
        return run(w, n + 1);
    }
    return phaseDone(ctx);
}

}  // namespace

void release(LuaThread *t)
{
    if (t->ref == LUA_NOREF) {
        return;
    }
    if (t->returned && !t->running) {
        // Ended normally: its coroutine serves the next thread.
        t->ctx->vm->giveThread(t->co, t->ref);
    } else {
        luaL_unref(t->ctx->vm->L(), LUA_REGISTRYINDEX, t->ref);
    }
    t->ref = LUA_NOREF;
}

LuaThread *current()
{
    return g_run ? g_run->thread : nullptr;
}

LuaThread *create(RequestCtx *ctx, LuaThread *parent)
{
    auto *t = static_cast<LuaThread *>(
        ngx_pcalloc(ctx->r->pool, sizeof(LuaThread)));
    if (t == nullptr) {
        return nullptr;
    }
    t->ctx = ctx;
    std::tie(t->co, t->ref) = ctx->vm->takeThread();
    t->parent = parent;
    t->entry = parent == nullptr;
    t->wake.handler = wakeHandler;
    t->wake.data = t;
    t->wake.log = ctx->r->connection->log;
    lua_setexdata(t->co, t);
    t->next = ctx->threads;
    ctx->threads = t;
    if (parent) {
        ctx->live_user++;
    } else {
        metrics::countRun(ctx);   // an entry thread: a handler or a timer
    }
    return t;
}

bool run(LuaThread *t, int nargs)
{
    RequestCtx *ctx = t->ctx;
    lua_State *co = t->co;
    int rc;

    t->running = true;
    {
        RunScope scope(ctx, ctx->thread_phase, t);
        budget::Scope charge(*ctx->limits, &ctx->usage);
        rc = lua_resume(co, nargs);
    }
    t->running = false;

    if (rc == LUA_YIELD && !ctx->exited && !ctx->exec_uri.len) {
        if (lua_gettop(co) >= 1
            && lua_touserdata(co, -1) == &glue::kYieldSentinel)
        {
            lua_settop(co, 0);
            return false;  // waiting on an event
        }
        // coroutine.yield() in a thread: it goes on at the next turn of
        // the event loop, after what is ready to run.
        lua_settop(co, 0);
        post(t);
        return false;
    }

    bool done = finish(t, rc);
    if (rc != 0 && rc != LUA_YIELD) {
        budget::Guard::reclaim(ctx->vm->L(), ctx->usage);
    }
    return done;
}

void kill(LuaThread *t)
{
    if (t->dead || t->running) {
        return;  // a running thread unwinds by itself (ctx->exited)
    }
    if (t->wake.timer_set) {
        ngx_del_timer(&t->wake);
    }
    if (t->wake.posted) {
        ngx_delete_posted_event(&t->wake);
    }
    if (t->cancel) {
        t->cancel(t);
        t->cancel = nullptr;
    }
    stopWaiting(t);
    t->dead = true;
    t->reaped = true;
    if (!t->entry) {
        t->ctx->live_user--;
    }
    release(t);
}

void killAll(RequestCtx *ctx, LuaThread *except)
{
    for (LuaThread *t = ctx->threads; t; t = t->next) {
        if (t != except) {
            kill(t);
        }
    }
}

bool phaseDone(RequestCtx *ctx)
{
    return ctx->exited || ctx->exec_uri.len || ctx->entry_failed
           || (ctx->entry_done && ctx->live_user == 0);
}

void post(LuaThread *t)
{
    t->wake.handler = wakeHandler;
    if (!t->wake.posted && !t->wake.timer_set) {
        ngx_post_event(&t->wake, &ngx_posted_next_events);
    }
}

void wakeAfter(LuaThread *t, ngx_msec_t ms)
{
    t->wake.handler = wakeHandler;
    ngx_add_timer(&t->wake, ms);
}

void resetWake(LuaThread *t)
{
    t->wake.handler = wakeHandler;
}

void endPhase(RequestCtx *ctx)
{
    for (LuaThread *t = ctx->threads; t; t = t->next) {
        kill(t);
        release(t);  // dead threads nobody waited for
    }
    ctx->threads = nullptr;
    ctx->entry = nullptr;
}

}  // namespace threads
}  // namespace luaguard
