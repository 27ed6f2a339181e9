#include "security/budget.hpp"

#include <malloc.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "runtime/vm.hpp"

namespace luaguard::budget {

namespace {

// Compiled loops carry no hook test per iteration (LuaJIT patch
// scripts/luajit-patches/loop-hook-exit.patch): a hook set while a loop
// runs reaches it once the loop's back edge is pointed at its exit, which
// the hook takes back when it runs. Both on the worker's main thread.
void interruptCompiled(lua_State *L)
{
#ifdef LUAGUARD_CHECKHOOK
    luaguard_jit_interrupt(L);
#else
    (void) L;
#endif
}

void interruptCompiledEnd()
{
#ifdef LUAGUARD_CHECKHOOK
    luaguard_jit_interrupt_end();
#endif
}

// How often the timer looks at the stamps while a run with a deadline is
// in progress: the precision of every CPU budget.
constexpr long kTickNs = 5'000'000;

// A realtime signal, which nginx does not use (it has SIGHUP, SIGUSR1,
// SIGUSR2, SIGWINCH, SIGTERM, SIGQUIT, SIGINT, SIGIO, SIGCHLD, SIGSYS,
// SIGPIPE, and SIGALRM for timer_resolution); SIGRTMIN itself is left to
// libraries that pick the first free one. The timer delivers it to the
// worker's main thread only (SIGEV_THREAD_ID): thread pools never see it.
int budgetSignal()
{
    return SIGRTMIN + 2;
}

}  // namespace

const char *kindName(Kind k)
{
    switch (k) {
    case Kind::Slice: return "lua_budget_slice";
    case Kind::Total: return "lua_budget_request";
    case Kind::Memory: return "lua_budget_memory";
    case Kind::VmMemory: return "lua_vm_memory_limit";
    case Kind::None: break;
    }
    return "none";
}

uint64_t nowNs()
{
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1'000'000'000ull
           + static_cast<uint64_t>(ts.tv_nsec);
}

Guard Guard::instance_;

bool Guard::start(uint64_t grace_ms, void (*on_stuck)(const char *, uint64_t))
{
    started_ = true;
    grace_ns_ = grace_ms * 1'000'000ull;
    on_stuck_ = on_stuck;

    // No thread: a second thread would move glibc (malloc, stdio) onto
    // its locked paths for every request of the worker.
    struct sigaction sa {};
    sa.sa_handler = onSignal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(budgetSignal(), &sa, nullptr) != 0) {
        return false;
    }
    sigevent sev {};
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = budgetSignal();
    sev._sigev_un._tid = static_cast<pid_t>(syscall(SYS_gettid));
    if (timer_create(CLOCK_MONOTONIC, &sev, &timer_) != 0) {
        return false;
    }
    has_timer_ = true;
    return true;
}

void Guard::stop()
{
    if (has_timer_) {
        has_timer_ = false;
        ticking_.store(false, std::memory_order_relaxed);
        timer_delete(timer_);
    }
}

void Guard::startTicking()
{
    // Armed by the first run with a deadline after an idle tick disarmed
    // it: under load a system call per tick at most, never one per run.
    ticking_.store(true, std::memory_order_relaxed);
    std::atomic_signal_fence(std::memory_order_seq_cst);
    itimerspec its {};
    its.it_interval.tv_nsec = kTickNs;
    its.it_value.tv_nsec = kTickNs;
    timer_settime(timer_, 0, &its, nullptr);
}

void Guard::memoryOver(bool request_limit)
{
    instance().tripMemory(request_limit ? Kind::Memory : Kind::VmMemory);
}

void Guard::enter(Frame *f, const Limits &limits, Usage *usage, lua_State *L,
                  MemoryAccount *mem)
{
    uint64_t now = nowNs();
    f->L = L;
    f->mem = mem;
    f->usage = usage;
    f->limits = &limits;
    f->entered = now;
    f->prev = top_;

    uint64_t dl = 0;
    Kind kind = Kind::None;
    if (f->prev) {
        // Nested run: the worker has not yielded, the outer slice goes on.
        dl = f->prev->deadline;
        kind = f->prev->deadline_kind;
    } else if (limits.slice_ms) {
        dl = now + limits.slice_ms * 1'000'000ull;
        kind = Kind::Slice;
    }
    if (limits.total_ms) {
        uint64_t total = limits.total_ms * 1'000'000ull;
        uint64_t left = usage->lua_ns < total ? total - usage->lua_ns : 0;
        if (dl == 0 || now + left < dl) {
            dl = now + left;
            kind = Kind::Total;
        }
    }
    f->deadline = dl;
    f->deadline_kind = kind;

    if (mem) {
        f->prev_charge = mem->charge;
        f->prev_charge_limit = mem->charge_limit;
        f->prev_charge_hard = mem->charge_hard;
        f->prev_charge_trip = mem->charge_trip;
        // A tripped run is not told again: the hook ends it anyway.
        mem->setCharge(&usage->mem_net,
                       usage->tripped == Kind::None ? limits.memory : 0,
                       MemoryAccount::hardLimit(limits.memory));
        if (usage->mem_net < 0) {
            usage->mem_net = 0;  // frees of others' garbage earn no credit
        }
        if ((f->prev == nullptr || f->prev->mem != mem)
            && mem->over_ceiling)
        {
            // Every run that allocates while the VM is over its ceiling is
            // stopped, not only the one that crossed it.
            mem->setOverCeiling(false);
        }
    }

    L_ = started_ ? L : nullptr;
    std::atomic_signal_fence(std::memory_order_release);
    top_ = f;
    if (f->prev == nullptr) {
        // One thread: no locked increment.
        gen_.store(gen_.load(std::memory_order_relaxed) + 1,
                   std::memory_order_relaxed);
    }
    deadline_kind_.store(static_cast<uint8_t>(kind), std::memory_order_relaxed);
    deadline_.store(dl, std::memory_order_relaxed);
    // A tick that finds the deadline set leaves the timer running; one
    // that came before it may have stopped the timer: armed again here.
    std::atomic_signal_fence(std::memory_order_seq_cst);
    if (dl != 0 && has_timer_ && !ticking_.load(std::memory_order_relaxed)) {
        startTicking();
    }
    if (usage->refusal_pending) {
        // Refused while no run of it was in progress: this run is the one
        // that sees the refusal (a socket read's result), and ends there.
        usage->refusal_pending = false;
        tripMemory(Kind::Memory);
    }
}

void Guard::leave(Frame *f)
{
    uint64_t now = nowNs();
    f->usage->lua_ns += now - f->entered;
    top_ = f->prev;
    std::atomic_signal_fence(std::memory_order_release);
    L_ = f->prev && started_ ? f->prev->L : nullptr;

    if (f->mem) {
        // Put back as they were, trip included: nothing to work out.
        f->mem->charge = f->prev_charge;
        f->mem->charge_limit = f->prev_charge_limit;
        f->mem->charge_hard = f->prev_charge_hard;
        f->mem->charge_trip = f->prev_charge_trip;
    }

    if (f->prev) {
        deadline_kind_.store(static_cast<uint8_t>(f->prev->deadline_kind),
                             std::memory_order_relaxed);
        deadline_.store(f->prev->deadline, std::memory_order_release);
        if (f->prev->L != f->L && stopping()) {
            // The outer run, in another VM, is stopped too: its hook.
            arm();
        }
        return;
    }

    deadline_.store(0, std::memory_order_release);
    if (tripped_gen_.load(std::memory_order_acquire)
        == gen_.load(std::memory_order_relaxed))
    {
        // The run that tripped is over: disarm, and give memory back if
        // memory was what it took.
        lua_sethook(f->L, nullptr, 0, 0);
        interruptCompiledEnd();
        tripped_gen_.store(~0ull, std::memory_order_release);
    }
}

uint64_t Guard::usedNs(const Usage &usage) const
{
    uint64_t ns = usage.lua_ns;
    uint64_t now = 0;   // read once a frame of this usage is running
    for (const Frame *f = top_; f; f = f->prev) {
        if (f->usage == &usage) {
            if (now == 0) {
                now = nowNs();
            }
            ns += now - f->entered;
        }
    }
    return ns;
}

void Guard::reclaim(lua_State *L, MemoryAccount *mem, Usage *usage,
                    const Limits &limits)
{
    // Any stopped run: one stopped by its slice can leave as much garbage
    // as its memory budget allows, which the incremental collector would
    // give back to malloc only slowly, and malloc to the system never.
    if (usage->tripped == Kind::None) {
        return;
    }
    Guard &g = instance();
    Frame f;
    Limits slice;
    slice.slice_ms = limits.slice_ms;
    g.enter(&f, slice, usage, L, mem);
    lua_gc(L, LUA_GCCOLLECT, 0);
    g.leave(&f);
    // Hand the pages back, not just to the allocators.
    if (mem) {
        mem->trim();
    }
    malloc_trim(0);
}

void Guard::tripMemory(Kind k)
{
    if (top_ == nullptr || L_ == nullptr) {
        return;  // not a budgeted run: Lua's own "not enough memory" only
    }
    uint64_t gen = gen_.load(std::memory_order_relaxed);
    if (tripped_gen_.load() != gen) {
        tripped_kind_.store(static_cast<uint8_t>(k));
        tripped_at_.store(nowNs());
        tripped_gen_.store(gen, std::memory_order_release);
    }
    markTripped(k);
    arm();
}

bool Guard::stopping() const
{
    return top_ != nullptr
           && tripped_gen_.load(std::memory_order_acquire)
                  == gen_.load(std::memory_order_relaxed);
}

namespace {

// Left to Lua by a charge outside its allocator, so that the caller's
// error message can still be allocated.
constexpr int64_t kExternalHeadroom = 64 * 1024;

bool fits(const Usage &u, int64_t limit, size_t bytes)
{
    auto n = static_cast<int64_t>(bytes);
    return limit == 0
           || (n <= limit - kExternalHeadroom
               && u.mem_net <= limit - kExternalHeadroom - n);
}

}  // namespace

bool Guard::fitsExternal(size_t bytes) const
{
    return top_ == nullptr || fits(*top_->usage, top_->limits->memory, bytes);
}

bool Guard::chargeExternal(size_t bytes, const char *what)
{
    if (top_ == nullptr) {
        return true;
    }
    Usage *u = top_->usage;
    if (!fits(*u, top_->limits->memory, bytes)) {
        refuse(u, what);
        return false;
    }
    u->mem_net += static_cast<int64_t>(bytes);
    return true;
}

void Guard::releaseExternal(Usage *usage, size_t bytes)
{
    usage->mem_net -= static_cast<int64_t>(bytes);
}

void Guard::refuse(Usage *usage, const char *what)
{
    usage->refused_by = what;
    for (Frame *f = top_; f; f = f->prev) {
        if (f->usage == usage) {
            tripMemory(Kind::Memory);
            return;
        }
    }
    usage->refusal_pending = true;
}

bool Guard::overdue()
{
    uint64_t dl = deadline_.load(std::memory_order_acquire);
    if (dl == 0 || top_ == nullptr || L_ == nullptr) {
        return false;
    }
    uint64_t now = nowNs();
    if (now < dl) {
        return false;
    }
    // The timer may not have ticked yet (every 5 ms): trip
    // here, so the run cannot go on past its deadline meanwhile.
    uint64_t gen = gen_.load(std::memory_order_relaxed);
    if (tripped_gen_.load(std::memory_order_acquire) != gen) {
        tripped_kind_.store(deadline_kind_.load());
        tripped_at_.store(now);
        tripped_gen_.store(gen, std::memory_order_release);
    }
    arm();
    return true;
}

void Guard::markTripped(Kind k)
{
    for (Frame *f = top_; f; f = f->prev) {
        if (f->usage->tripped == Kind::None) {
            f->usage->tripped = k;
            if (f->prev == nullptr) {
                stops_[static_cast<int>(k)]++;
            }
        }
    }
}

void Guard::arm()
{
    if (L_) {
        lua_sethook(L_, hook, LUA_MASKCOUNT, 1);
        interruptCompiled(L_);
    }
}

void Guard::onSignal(int sig)
{
    int saved = errno;
    instance().tick(sig);
    errno = saved;
}

// The timer's tick, in the signal handler: async-signal-safe code only.
void Guard::tick(int sig)
{
    uint64_t dl = deadline_.load(std::memory_order_relaxed);
    if (dl == 0 || top_ == nullptr) {
        // Nothing with a deadline runs: stop ticking until something does
        // (an idle worker is not woken, and its epoll_wait not
        // interrupted, 200 times a second).
        if (ticking_.load(std::memory_order_relaxed)) {
            ticking_.store(false, std::memory_order_relaxed);
            itimerspec off {};
            timer_settime(timer_, 0, &off, nullptr);
        }
        return;
    }
    uint64_t now = nowNs();
    if (now < dl) {
        return;
    }
    uint64_t gen = gen_.load(std::memory_order_relaxed);
    if (tripped_gen_.load(std::memory_order_relaxed) != gen) {
        tripped_kind_.store(deadline_kind_.load(std::memory_order_relaxed));
        tripped_at_.store(now);
        tripped_gen_.store(gen, std::memory_order_relaxed);
    } else if (grace_ns_ && now - tripped_at_.load() > grace_ns_) {
        // The hook never got to run: the worker is inside one C call.
        // Nothing can unwind it; end this worker, the master starts a
        // fresh one. (nginx's own signal handlers log the same way.)
        if (on_stuck_) {
            on_stuck_(kindName(static_cast<Kind>(tripped_kind_.load())),
                      (now - tripped_at_.load()) / 1'000'000ull);
        }
        _exit(1);
    }
    if (L_) {
        // Again at every tick: the run may have been in a C function that
        // since returned to Lua. lua_sethook is safe in a signal handler.
        arm();
        if (on_trip_signal) {
            on_trip_signal(sig);
        }
    }
}

void Guard::hook(lua_State *L, lua_Debug *ar)
{
    interruptCompiledEnd();
    Guard &g = instance();
    uint64_t gen = g.gen_.load(std::memory_order_relaxed);
    if (g.top_ == nullptr
        || g.tripped_gen_.load(std::memory_order_acquire) != gen)
    {
        lua_sethook(L, nullptr, 0, 0);  // armed for a run that is over
        return;
    }
    auto k = static_cast<Kind>(g.tripped_kind_.load());
    g.markTripped(k);
    // Where the run was when it was stopped: the innermost frame of user
    // code (the prelude's coroutine wrappers are ours, not the culprit).
    const char *src = "?";
    int line = 0;
    lua_Debug frame;
    for (int level = 0; lua_getstack(L, level, &frame); level++) {
        if (lua_getinfo(L, "Sl", &frame) && frame.currentline > 0
            && std::strncmp(frame.source, "=luaguard.", 10) != 0)
        {
            src = frame.short_src;
            line = frame.currentline;
            break;
        }
    }
    (void) ar;
    const Limits &lim = *g.top_->limits;
    switch (k) {
    case Kind::Slice:
        luaL_error(L, "luaguard: %s exceeded: Lua ran %d ms without "
                   "yielding, stopped at %s:%d", kindName(k),
                   static_cast<int>(lim.slice_ms), src, line);
        break;
    case Kind::Total:
        luaL_error(L, "luaguard: %s exceeded: the request used %d ms of Lua "
                   "time, stopped at %s:%d", kindName(k),
                   static_cast<int>(lim.total_ms), src, line);
        break;
    default:
        if (k == Kind::Memory && g.top_->usage->refused_by) {
            luaL_error(L, "not enough memory (luaguard: %s exceeded by %s, "
                       "stopped at %s:%d)", kindName(k),
                       g.top_->usage->refused_by, src, line);
        }
        luaL_error(L, "not enough memory (luaguard: %s exceeded, stopped at "
                   "%s:%d)", kindName(k), src, line);
    }
}

}  // namespace luaguard::budget
