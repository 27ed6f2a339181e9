// Lua threads scheduled on nginx events: the entry thread of a phase, the
// light threads it spawns, and timer callbacks. Each is a coroutine
// anchored in the registry and owned by its request (a fake one for
// timers); whatever it waits on is undone by `cancel` when it is killed or
// its request ends early.
#pragma once

#include <string>

#include "ngx/module.hpp"
#include "runtime/code.hpp"

namespace luaguard {

// What a posted wake-up hands its thread. The values are pushed when the
// thread runs, under entry::resume's protection, never from the poster's
// call (a failed push there would unwind the poster's coroutine).
enum class WakeWith : uint8_t {
    Nothing,      // ngx.sleep, coroutine.yield
    TrueNil,      // a semaphore's post: true, nil
    NilClosed,    // a socket closed under a waiting operation: nil, "closed"
};

struct LuaThread {
    RequestCtx  *ctx;
    lua_State   *co;
    int          ref;            // registry anchor of co, LUA_NOREF when dead
    LuaThread   *parent;         // spawner; null for the entry thread
    LuaThread   *next;           // ctx's list of threads
    LuaThread  **waiting_on;     // threads this one waits for (wait())
    int          nwaiting;
    LuaThread   *waiter;         // the parent blocked in wait() on us
    bool         entry;
    bool         dead;
    bool         failed;         // died with an error (results: false, err)
    bool         reaped;         // results taken by wait(), or killed
    bool         running;        // inside lua_resume: must not be freed
    bool         returned;       // its function returned: reusable
    ngx_event_t  wake;           // ngx.sleep, coroutine.yield, posts
    WakeWith     wake_with;      // what the posted wake-up hands it
    void       (*cancel)(LuaThread *t);  // undoes a pending I/O wait
    void        *cancel_data;
    LuaThread   *spawned;        // its ngx.thread.spawn: the thread to start
    int          start_nargs;    // arguments of a thread not started yet
    LuaThread   *spawn_result;   // resumed from spawn: push this thread
    LuaThread   *runq_next;      // in ctx's run queue
    bool         queued;
    Lease        lease;          // the entry thread's handler closure
};

namespace threads {

// The thread running now (innermost), or null outside Lua.
LuaThread *current();

// Creates a thread of `ctx` with an empty stack: push the function and its
// arguments on `t->co`. `parent` null makes it the entry thread.
LuaThread *create(RequestCtx *ctx, LuaThread *parent);

// An entry thread of `ctx` whose stack is `co` (a coroutine of ctx's VM
// from Vm::takeThread, `ref` its reference), with what is already on it:
// a timer's holder runs its callback. On success the thread owns `co` and
// gives it back to the VM when released; null (out of memory) leaves it
// to the caller.
LuaThread *adopt(RequestCtx *ctx, lua_State *co, int ref);

// Resumes `t` with `nargs` values on its stack and settles the
// consequences: wakes a waiting parent, ends the phase when the rules say
// it is over. Returns true when the phase's threads are all finished.
bool run(LuaThread *t, int nargs);

// run() in its two halves, for a caller already inside the run's
// entry::Scope (a phase's start pushes its handler and resumes it in one
// budget frame): resume() resumes `t` and returns lua_resume's code;
// settle() does with that code what run() does after resuming.
int resume(LuaThread *t, int nargs);
bool settle(LuaThread *t, int rc);

// Ends a waiting thread that cannot be resumed (its results could not be
// pushed) as if it had raised `msg`: logged, wait() gets false and msg.
// Returns true when that ended the phase, as run() does.
bool fail(LuaThread *t, const std::string &msg);

// Undoes what `t` waits on: its wake-up, its pending I/O, a wait() on
// other threads.
void undoWait(LuaThread *t);

// Ends a thread that is not running: its pending wait is cancelled, its
// coroutine released.
void kill(LuaThread *t);

// Kills every thread of ctx but `except`.
void killAll(RequestCtx *ctx, LuaThread *except);

// True when the phase's work is over: the entry thread finished and no
// user thread is left, or a thread ended the request (ngx.exit & co), or
// the entry thread failed.
bool phaseDone(RequestCtx *ctx);

// Drops the thread's anchor on its coroutine (which goes back to the VM's
// cache when it ended normally).
void release(LuaThread *t);

// Kills what is left of the phase's threads and releases them all.
void endPhase(RequestCtx *ctx);

// ngx.thread.spawn of the running thread `self`: `t` (its function and
// arguments pushed) starts once `self` has yielded; `self` goes on after
// it, from the run queue, as lua-nginx-module schedules them.
int spawn(lua_State *L, LuaThread *self, LuaThread *t, int nargs);

// Wakes `t` on the next turn of the event loop with `with`'s values
// (coroutine.yield, ngx.sleep(0), semaphore posts, closed sockets).
void post(LuaThread *t, WakeWith with = WakeWith::Nothing);

// Wakes `t` after `ms` (ngx.sleep).
void wakeAfter(LuaThread *t, ngx_msec_t ms);

// Gives the wake event back its plain handler after a custom one (a
// semaphore's timeout) was used.
void resetWake(LuaThread *t);

}  // namespace threads
}  // namespace luaguard
