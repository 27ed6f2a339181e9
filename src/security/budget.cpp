#include "security/budget.hpp"

#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "runtime/vm.hpp"

namespace luaguard::budget {

namespace {

// How often the watchdog looks at the stamps: the precision of every CPU
// budget, at a cost of one wake-up per tick.
constexpr auto kTick = std::chrono::milliseconds(5);

// Re-signal a run that has not stopped yet: the signal may have landed
// while the worker was in a C function that then returned to Lua.
constexpr uint64_t kResignalNs = 50'000'000;

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

Guard &Guard::instance()
{
    static Guard g;
    return g;
}

bool Guard::start(uint64_t grace_ms, void (*on_stuck)(const char *, uint64_t))
{
    started_ = true;
    grace_ns_ = grace_ms * 1'000'000ull;
    on_stuck_ = on_stuck;
    worker_thread_ = pthread_self();

    struct sigaction sa {};
    sa.sa_handler = onSignal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    if (sigaction(budgetSignal(), &sa, nullptr) != 0) {
        return false;
    }

    // The watchdog takes no signal meant for the worker (nginx's master
    // signals the process, and any thread not blocking it may receive it).
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    running_ = true;
    try {
        thread_ = std::thread([this] { watch(); });
    } catch (...) {
        running_ = false;
    }
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return running_;
}

void Guard::stop()
{
    if (running_.exchange(false) && thread_.joinable()) {
        thread_.join();
    }
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
    f->limits = limits;
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
        mem->charge = &usage->mem_net;
        // A tripped run is not told again: the hook ends it anyway.
        mem->charge_limit = usage->tripped == Kind::None ? limits.memory : 0;
        mem->charge_hard = MemoryAccount::hardLimit(limits.memory);
        if (usage->mem_net < 0) {
            usage->mem_net = 0;  // frees of others' garbage earn no credit
        }
        if (f->prev == nullptr || f->prev->mem != mem) {
            // Every run that allocates while the VM is over its ceiling is
            // stopped, not only the one that crossed it.
            mem->over_ceiling = false;
        }
    }

    L_ = started_ ? L : nullptr;
    std::atomic_signal_fence(std::memory_order_release);
    top_ = f;
    if (f->prev == nullptr) {
        gen_.fetch_add(1, std::memory_order_acq_rel);
    }
    deadline_kind_.store(static_cast<uint8_t>(kind), std::memory_order_relaxed);
    deadline_.store(dl, std::memory_order_release);
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
        f->mem->charge = f->prev_charge;
        f->mem->charge_limit = f->prev_charge_limit;
        f->mem->charge_hard = f->prev_charge_hard;
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
        tripped_gen_.store(~0ull, std::memory_order_release);
    }
}

uint64_t Guard::usedNs(const Usage &usage) const
{
    uint64_t ns = usage.lua_ns;
    uint64_t now = nowNs();
    for (const Frame *f = top_; f; f = f->prev) {
        if (f->usage == &usage) {
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
    return top_ == nullptr || fits(*top_->usage, top_->limits.memory, bytes);
}

bool Guard::chargeExternal(size_t bytes, const char *what)
{
    if (top_ == nullptr) {
        return true;
    }
    Usage *u = top_->usage;
    if (!fits(*u, top_->limits.memory, bytes)) {
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
    // The watchdog may not have looked yet (it ticks every 5 ms): trip
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
    }
}

void Guard::onSignal(int sig)
{
    int saved = errno;
    Guard &g = instance();
    if (g.L_ && g.top_
        && g.tripped_gen_.load(std::memory_order_acquire)
               == g.gen_.load(std::memory_order_relaxed))
    {
        g.arm();  // lua_sethook is safe in a signal handler
        if (g.on_trip_signal) {
            g.on_trip_signal(sig);
        }
    }
    errno = saved;
}

void Guard::hook(lua_State *L, lua_Debug *ar)
{
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
    const Limits &lim = g.top_->limits;
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

void Guard::watch()
{
    uint64_t last_signal = 0;
    while (running_.load(std::memory_order_relaxed)) {
        std::this_thread::sleep_for(kTick);
        uint64_t dl = deadline_.load(std::memory_order_acquire);
        if (dl == 0) {
            continue;
        }
        uint64_t gen = gen_.load(std::memory_order_acquire);
        uint64_t now = nowNs();
        if (now < dl) {
            continue;
        }
        if (tripped_gen_.load(std::memory_order_acquire) != gen) {
            tripped_kind_.store(deadline_kind_.load());
            tripped_at_.store(now);
            tripped_gen_.store(gen, std::memory_order_release);
            pthread_kill(worker_thread_, budgetSignal());
            last_signal = now;
            continue;
        }
        uint64_t since = now - tripped_at_.load();
        if (grace_ns_ && since > grace_ns_
            && gen_.load(std::memory_order_acquire) == gen
            && deadline_.load(std::memory_order_acquire) != 0)
        {
            // The hook never got to run: the worker is inside one C call.
            // Nothing can unwind it; end this worker, the master starts a
            // fresh one.
            if (on_stuck_) {
                on_stuck_(kindName(static_cast<Kind>(tripped_kind_.load())),
                          since / 1'000'000ull);
            }
            _exit(1);
        }
        if (now - last_signal > kResignalNs) {
            pthread_kill(worker_thread_, budgetSignal());
            last_signal = now;
        }
    }
}

}  // namespace luaguard::budget
