// The scheduler of Lua threads: entry threads, light threads, timers.

#include "ngx/thread.hpp"

#include <cstdio>
#include <string>
#include <tuple>

#include "ngx/entry.hpp"
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
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        return std::string(s, len);
    }
    if (lua_type(L, idx) == LUA_TNUMBER) {
        // Not lua_tolstring: converting in place allocates, and this runs
        // where an allocation failure has nowhere to go.
        char buf[32];
        std::snprintf(buf, sizeof(buf), "%.14g", lua_tonumber(L, idx));
        return buf;
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

namespace {

// The sentinel travels up through user coroutines (the prelude's
// wrappers) to the thread's coroutine: every one must be able to yield,
// the thread's too (a coroutine.wrap called in an xpcall handler).
bool canYield(lua_State *L)
{
    LuaThread *t = threads::current();
    return lua_isyieldable(L)
           && (t == nullptr || t->co == L || lua_isyieldable(t->co));
}

}  // namespace

void checkYieldable(lua_State *L)
{
    if (!canYield(L)) {
        // No position prefix, as LuaJIT's own message.
        lua_pushliteral(L, "attempt to yield across C-call boundary");
        lua_error(L);
    }
}

int yield(lua_State *L)
{
    if (!canYield(L)) {
        // Inside an xpcall message handler, a metamethod called from C,
        // ...: lua_yield would fail after the caller armed its event, and
        // that event would later resume a thread that is not waiting
        // (or a finished request). Undo the wait, then raise the error
        // the script can catch, as lua-nginx-module does.
        if (LuaThread *t = threads::current()) {
            threads::undoWait(t);
        }
        checkYieldable(L);
    }
    if (g_run && g_run->ctx) {
        subreq::watchClientAbort(g_run->ctx);  // lua_check_client_abort
    }
    lua_pushlightuserdata(L, &kYieldSentinel);
    return lua_yield(L, 1);
}

int exitThread(lua_State *L, RequestCtx *ctx, ngx_int_t code)
{
    ctx->exit_code = code;
    ctx->exited = true;
    Phase p = g_run ? g_run->phase : Phase::None;
    if ((mask(p) & kYieldable) && g_run->thread) {
        return yield(L);
    }
    if (p == Phase::HeaderFilter) {
        // Documented: ngx.exit returns at once there, and the filter's
        // code goes on; the filter acts on the code when it returns.
        return 0;
    }
    lua_pushlightuserdata(L, &kExitSentinel);
    return lua_error(L);
}

}  // namespace glue

namespace threads {

namespace {

void wakeHandler(ngx_event_t *ev)
{
    auto *t = static_cast<LuaThread *>(ev->data);
    WakeWith with = t->wake_with;
    t->wake_with = WakeWith::Nothing;
    entry::resume(t, [with](lua_State *co) {
        switch (with) {
        case WakeWith::Nothing:
            return 0;
        case WakeWith::TrueNil:
            lua_pushboolean(co, 1);
            lua_pushnil(co);
            return 2;
        case WakeWith::NilClosed:
            lua_pushnil(co);
            lua_pushliteral(co, "closed");
            return 2;
        }
        return 0;
    });
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

}  // namespace

void undoWait(LuaThread *t)
{
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
}

namespace {

// The thread just ended: record it, hand its results to a parent blocked
// in wait(), apply the rules that end the phase. `raised` is the error of
// a thread that failed outside its coroutine (see fail()); otherwise rc
// and the coroutine's stack tell how it ended.
bool finish(LuaThread *t, int rc, const std::string *raised = nullptr)
{
    RequestCtx *ctx = t->ctx;
    lua_State *co = t->co;
    t->dead = true;
    // Only a coroutine whose function returned is reset and reused; one
    // left suspended (ngx.exit, killed) or in error is not.
    t->returned = rc == 0 && raised == nullptr;

    if (raised || (rc != 0 && rc != LUA_YIELD)) {
        t->failed = true;
        metrics::countError(ctx);
        std::string msg = raised ? *raised : glue::errorText(co, -1);
        // Not after a memory error: it can be raised while a frame is
        // half built (a stack that could not grow), and walking the frames
        // then reads garbage.
        std::string tb = raised || rc == LUA_ERRMEM
                             ? std::string() : escapedTraceback(co, 0);
        glue::logFailure(ctx->r->connection->log,
                         t->entry ? "lua entry thread aborted: runtime error"
                                  : "lua user thread aborted: runtime error",
                         msg, tb);
        // wait() returns false and the error object (the message, for an
        // error raised outside the coroutine). The coroutine itself is
        // reset: LuaJIT leaves the frames of a coroutine that died of an
        // error as they were, for tracebacks, and after a memory error in
        // a fast function (tostring) they are not in a state its collector
        // can walk (it crashed in gc_traverse_frames).
        lua_State *L = ctx->vm->L();
        int top = lua_gettop(L);
        std::string err;
        bool kept = !raised && lua_gettop(co) > 0
                    && entry::protect(L, [&] { lua_xmove(co, L, 1); }, &err);
        lua_resetthread(L, co);
        if (kept) {
            lua_xmove(L, co, 1);  // a reset stack has room: no allocation
        } else {
            const std::string &text = raised ? *raised : msg;
            entry::protect(co, [&] {
                lua_pushlstring(co, text.data(), text.size());
            }, &err);
        }
        lua_settop(L, top);
    } else if (rc == LUA_YIELD) {
        lua_settop(co, 0);  // ended by ngx.exit and friends
    }

    if (t->entry) {
        ctx->entry_done = true;
        ctx->entry_failed = t->failed;
        release(t);
    } else {
        ctx->live_user--;
        // A budget stop ends the request, not only the thread it met (one
        // resumed by an event, outside the entry thread's run): the
        // others would go on with the budget spent.
        if (t->failed && ctx->usage.tripped != budget::Kind::None) {
            ctx->entry_failed = true;
        }
    }

    if (ctx->exited || ctx->exec_uri.len || ctx->entry_failed) {
        killAll(ctx, nullptr);
        return true;
    }

    if (LuaThread *w = t->waiter) {
        stopWaiting(w);
        int n = lua_gettop(co);
        std::string err;
        bool ok = entry::protect(w->co, [&] {
            lua_pushboolean(w->co, !t->failed);
            lua_xmove(co, w->co, n);
        }, &err);
        t->reaped = true;
        release(t);
        return ok ? run(w, n + 1) : fail(w, err);
    }
    return phaseDone(ctx);
}

}  // namespace

void release(LuaThread *t)
{
    // Its closure ran nowhere else; one left suspended may yet be resumed
    // by whoever holds the coroutine, so it is not reused.
    giveClosure(t->ctx->vm->L(), t->ctx->vm, &t->lease,
                t->returned && !t->running);
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

namespace {

LuaThread *make(RequestCtx *ctx, LuaThread *parent, lua_State *co, int ref)
{
    auto *t = static_cast<LuaThread *>(
        ngx_pcalloc(ctx->r->pool, sizeof(LuaThread)));
    if (t == nullptr) {
        return nullptr;
    }
    t->ctx = ctx;
    if (co != nullptr) {
        t->co = co;
        t->ref = ref;
    } else {
        std::tie(t->co, t->ref) = ctx->vm->takeThread();
    }
    t->parent = parent;
    t->entry = parent == nullptr;
    t->wake.handler = entry::edge<wakeHandler>;
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

}  // namespace

LuaThread *create(RequestCtx *ctx, LuaThread *parent)
{
    return make(ctx, parent, nullptr, 0);
}

LuaThread *adopt(RequestCtx *ctx, lua_State *co, int ref)
{
    return make(ctx, nullptr, co, ref);
}

namespace {

void enqueue(LuaThread *t)
{
    RequestCtx *ctx = t->ctx;
    t->queued = true;
    t->runq_next = nullptr;
    if (ctx->runq_tail) {
        ctx->runq_tail->runq_next = t;
    } else {
        ctx->runq_head = t;
    }
    ctx->runq_tail = t;
}

LuaThread *dequeue(RequestCtx *ctx)
{
    while (LuaThread *t = ctx->runq_head) {
        ctx->runq_head = t->runq_next;
        if (ctx->runq_head == nullptr) {
            ctx->runq_tail = nullptr;
        }
        t->queued = false;
        if (!t->dead) {
            return t;  // killed while it waited its turn: skipped
        }
    }
    return nullptr;
}

// Runs the queued threads in order until none is left or the phase is
// over. The outermost call does the work: a thread that queues itself
// from inside it is taken by the same loop.
bool drain(RequestCtx *ctx)
{
    if (ctx->draining) {
        return false;
    }
    ctx->draining = true;
    bool done = false;
    while (!done) {
        LuaThread *t = dequeue(ctx);
        if (t == nullptr) {
            break;
        }
        int n = 0;
        if (LuaThread *c = t->spawn_result) {
            // spawn() returns the new thread's coroutine.
            t->spawn_result = nullptr;
            std::string err;
            if (!entry::protect(t->co, [&] { lua_pushthread(c->co);
                                             lua_xmove(c->co, t->co, 1); },
                                &err))
            {
                done = fail(t, err);
                continue;
            }
            n = 1;
        }
        done = run(t, n);
    }
    ctx->draining = false;
    return done;
}

}  // namespace

int spawn(lua_State *L, LuaThread *self, LuaThread *t, int nargs)
{
    t->start_nargs = nargs;
    self->spawned = t;
    return glue::yield(L);
}

int resume(LuaThread *t, int nargs)
{
    t->running = true;
    int rc = lua_resume(t->co, nargs);
    t->running = false;
    return rc;
}

bool run(LuaThread *t, int nargs)
{
    int rc;
    {
        entry::Scope scope(t->ctx, t->ctx->thread_phase, t);
        rc = resume(t, nargs);
    }
    return settle(t, rc);
}

namespace {

bool settleThread(LuaThread *t, int rc)
{
    RequestCtx *ctx = t->ctx;
    lua_State *co = t->co;

    if (rc == LUA_YIELD && !ctx->exited && !ctx->exec_uri.len) {
        if (lua_gettop(co) >= 1
            && lua_touserdata(co, -1) == &glue::kYieldSentinel)
        {
            lua_settop(co, 0);
            if (LuaThread *child = t->spawned) {
                // ngx.thread.spawn: the new thread runs first, then the
                // spawner goes on in its turn, after threads queued
                // before it (lua-nginx-module's order).
                t->spawned = nullptr;
                t->spawn_result = child;
                enqueue(t);
                if (run(child, child->start_nargs)) {
                    return true;
                }
                return drain(ctx);
            }
            return false;  // waiting on an event
        }
        // coroutine.yield() in a thread: it goes on after the threads
        // ready before it; alone, at the next turn of the event loop.
        lua_settop(co, 0);
        if (ctx->runq_head == nullptr) {
            post(t);
            return false;
        }
        enqueue(t);
        return drain(ctx);
    }

    if (rc == LUA_YIELD) {
        // Ended by ngx.exit/ngx.exec; when that call could not yield (an
        // xpcall message handler) the exit is carried out at the thread's
        // next yield, which may be a wait that armed an event: undone, it
        // would fire on a finished request.
        undoWait(t);
    }
    bool done = finish(t, rc);
    if (rc != 0 && rc != LUA_YIELD) {
        budget::Guard::reclaim(ctx->vm->L(), &ctx->vm->memory(),
                               &ctx->usage, *ctx->limits);
    }
    return done;
}

}  // namespace

bool settle(LuaThread *t, int rc)
{
    RequestCtx *ctx = t->ctx;
    bool done = settleThread(t, rc);
    if (!done) {
        // The request waits: what its output holds goes on now, as it
        // would have with each ngx.say.
        glue::passHeld(ctx);
    }
    return done;
}

bool fail(LuaThread *t, const std::string &msg)
{
    // Whatever it waited on is undone first, as when it is killed.
    undoWait(t);
    bool done = finish(t, LUA_ERRRUN, &msg);
    budget::Guard::reclaim(t->ctx->vm->L(), &t->ctx->vm->memory(),
                           &t->ctx->usage, *t->ctx->limits);
    return done;
}

void kill(LuaThread *t)
{
    if (t->dead || t->running) {
        return;  // a running thread unwinds by itself (ctx->exited)
    }
    undoWait(t);
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

void post(LuaThread *t, WakeWith with)
{
    t->wake_with = with;
    t->wake.handler = entry::edge<wakeHandler>;
    if (!t->wake.posted && !t->wake.timer_set) {
        ngx_post_event(&t->wake, &ngx_posted_next_events);
    }
}

void wakeAfter(LuaThread *t, ngx_msec_t ms)
{
    t->wake.handler = entry::edge<wakeHandler>;
    ngx_add_timer(&t->wake, ms);
}

void resetWake(LuaThread *t)
{
    t->wake.handler = entry::edge<wakeHandler>;
}

void endPhase(RequestCtx *ctx)
{
    for (LuaThread *t = ctx->threads; t; t = t->next) {
        kill(t);
        release(t);  // dead threads nobody waited for
    }
    ctx->threads = nullptr;
    ctx->entry = nullptr;
    ctx->runq_head = ctx->runq_tail = nullptr;
}

}  // namespace threads
}  // namespace luaguard
