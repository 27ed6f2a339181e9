// Execution budgets: how long Lua may run without yielding (the slice that
// blocks every other connection of the worker), how much Lua time one
// request may use in all, and how much memory it may hold.
//
// The worker thread only stamps the clock (read from the vDSO, no system
// call) when it enters and leaves Lua. A POSIX interval timer of
// the worker, running only while a run with a deadline is in progress or
// just was, signals the worker thread every tick; the handler compares the
// stamps with the deadline and, past it, arms a count hook. With
// LUAJIT_ENABLE_CHECKHOOK the hook also fires inside compiled traces. The
// hook raises an error naming the budget on every instruction until the run
// is torn down, so pcall cannot swallow it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <ctime>

#include "runtime/lua.hpp"

namespace luaguard {

struct MemoryAccount;

namespace budget {

enum class Kind : uint8_t { None, Slice, Total, Memory, VmMemory };

constexpr int kKinds = 5;

// The directive that sets each budget, for messages and metrics.
const char *kindName(Kind k);

// Limits of one run; 0 means off.
struct Limits {
    uint64_t slice_ms = 0;
    uint64_t total_ms = 0;
    int64_t  memory = 0;
};

// What one request (or timer) has used, across all its runs.
struct Usage {
    uint64_t lua_ns = 0;
    int64_t  mem_net = 0;
    Kind     tripped = Kind::None;
    // What memory outside the Lua allocator was refused for (a static
    // string: "ngx.var"), named by the stop's message; `refusal_pending`
    // while the stop waits for the next run (refused in an event handler).
    const char *refused_by = nullptr;
    bool     refusal_pending = false;
};

uint64_t nowNs();

class Guard {
 public:
    // Inline and constant-initialized: every run enters and leaves it, and
    // a function-local static would test its guard at each call.
    static Guard &instance() { return instance_; }
    ~Guard() { stop(); }

    // Per worker: creates the watchdog's timer (armed by the first run
    // with a deadline). `grace_ms` is how long code
    // stuck in a C function may go on after its budget ran out before the
    // worker is ended; `on_stuck` logs why, then the process exits so the
    // master starts a new worker.
    bool start(uint64_t grace_ms,
               void (*on_stuck)(const char *where, uint64_t ms));
    void stop();

    // Worker thread only. Runs nest (Lua -> nginx -> Lua): see Scope. A
    // run belongs to one VM (lua_vm): its state, hooked when the run is
    // stopped, and its memory account, charged while it runs.
    struct Frame {
        lua_State     *L;
        MemoryAccount *mem;
        Usage       *usage;
        const Limits *limits;   // outlives the frame (configuration)
        uint64_t     entered;
        uint64_t     deadline;
        Kind         deadline_kind;
        int64_t     *prev_charge;
        int64_t      prev_charge_limit;
        int64_t      prev_charge_hard;
        int64_t      prev_charge_trip;
        Frame       *prev;
    };
    void enter(Frame *f, const Limits &limits, Usage *usage, lua_State *L,
               MemoryAccount *mem);
    void leave(Frame *f);

    // Called by the allocator's owner when an allocation took the running
    // request past its memory budget or the VM past its ceiling: the run
    // is ended like a CPU budget trip, by the hook at its next instruction.
    void tripMemory(Kind k);
    // The MemoryAccount::on_over of every VM.
    static void memoryOver(bool request_limit);

    // For C code that loops on the worker thread without running Lua (a
    // regex scan): true once the run is past its CPU deadline, which it
    // then trips as the watchdog would, so the hook ends the run as soon
    // as the caller returns to Lua. The caller stops its work.
    bool overdue();

    // True while the running run is being stopped by a budget (its hook
    // raises at every instruction): the xpcall wrapper of the prelude
    // skips the script's message handler then.
    bool stopping() const;

    // Called by the budget's signal handler, on the worker thread, once
    // the run is tripped and its hook armed: C code stuck in a long call
    // that can never reach the hook (a regex match) may jump out of it
    // here (`sig` stays blocked after a jump). Async-signal-safe code only.
    void (*on_trip_signal)(int sig) = nullptr;

    // Memory allocated outside the Lua allocator on behalf of the running
    // request (nginx pool copies made by the API, socket buffers, pending
    // output), charged to its net allocation and so to lua_budget_memory.
    // When it would go over, nothing is charged, the run is stopped as by
    // the Lua allocator (refuse()) and false is returned: the caller fails
    // without allocating; a pcall that catches its error meets the hook at
    // its next instruction. Outside a budgeted run: true, nothing charged.
    // `what` names the API call in the stop's message (a static string).
    bool chargeExternal(size_t bytes, const char *what);
    // Whether `bytes` more fit the running request's budget, keeping the
    // headroom chargeExternal keeps; nothing is charged or stopped.
    bool fitsExternal(size_t bytes) const;
    // Gives back what chargeExternal charged to `usage` once nginx freed
    // it (a sent output buffer); callable outside any run.
    static void releaseExternal(Usage *usage, size_t bytes);
    // Memory outside the Lua allocator was refused for `usage` (`what`, a
    // static string): a lua_budget_memory stop, like the Lua allocator's.
    // The run of `usage` in progress is stopped by the hook at its next
    // instruction; outside one (an event handler refused a socket read),
    // its next run is, as soon as it is entered.
    void refuse(Usage *usage, const char *what);

    // Lua time of `usage` including the runs still in progress.
    uint64_t usedNs(const Usage &usage) const;

    // After a stopped run has released what it anchored: a full
    // collection and malloc_trim, so the worker's memory falls back.
    // The collection runs under `limits`' slice: a finalizer runs with
    // hooks off, and one that never returns must meet the watchdog's last
    // resort instead of spinning with no deadline armed. What it frees is
    // credited to `usage`: the request's later runs (the filters of its
    // error page, its log handler) are not refused for memory it no
    // longer holds.
    static void reclaim(lua_State *L, MemoryAccount *mem, Usage *usage,
                        const Limits &limits);

    uint64_t stops(Kind k) const { return stops_[static_cast<int>(k)]; }

 private:
    Guard() = default;
    static Guard instance_;
    static void hook(lua_State *L, lua_Debug *ar);
    static void onSignal(int sig);
    void tick(int sig);
    void startTicking();
    void arm();
    void markTripped(Kind k);

    // The innermost run's VM (the signal handler arms its hook); null
    // outside Lua and until start(): init_by_lua in the master is not
    // stopped by the VM's ceiling.
    lua_State *L_ = nullptr;
    Frame *top_ = nullptr;
    bool started_ = false;
    uint64_t grace_ns_ = 0;
    void (*on_stuck_)(const char *, uint64_t) = nullptr;
    uint64_t stops_[kKinds] = {};

    // Shared with the signal handler (same thread: plain loads and stores,
    // ordered by signal fences).
    std::atomic<uint64_t> gen_{0};          // changes at every outer entry
    std::atomic<uint64_t> deadline_{0};     // 0: not in Lua / no budget
    std::atomic<uint8_t> deadline_kind_{0};
    std::atomic<uint64_t> tripped_gen_{~0ull};
    std::atomic<uint8_t> tripped_kind_{0};
    std::atomic<uint64_t> tripped_at_{0};
    std::atomic<bool> ticking_{false};      // the timer is armed
    timer_t timer_{};
    bool has_timer_ = false;
};

// RAII: charges the enclosed Lua run to `usage` under `limits`.
class Scope {
 public:
    Scope(const Limits &limits, Usage *usage, lua_State *L,
          MemoryAccount *mem)
    {
        Guard::instance().enter(&frame_, limits, usage, L, mem);
    }
    ~Scope() { Guard::instance().leave(&frame_); }
    Scope(const Scope &) = delete;
    Scope &operator=(const Scope &) = delete;

 private:
    Guard::Frame frame_;
};

}  // namespace budget
}  // namespace luaguard
