// The pure parts of the timer budgets of a location (docs/budgets.md
// "Timers"; the driver is ngx/timers.cpp): the bucket of callback Lua time
// behind lua_timer_cpu_per_location, and the size estimate of what a
// pending timer keeps alive behind lua_timer_memory_per_location.
#pragma once

#include <cstddef>
#include <cstdint>

#include "runtime/lua.hpp"

namespace luaguard::budget {

// Holds at most `cap` of Lua time and earns `cap` per `interval`
// (nanoseconds). Spending may overdraw it: the debt is paid back at the
// refill rate, so the average stays at cap per interval whatever one
// callback took. A cap of 0 is "off": never empty.
class TimeBucket {
 public:
    void start(uint64_t cap_ns, uint64_t interval_ns, uint64_t now_ns);
    void refill(uint64_t now_ns);
    void spend(uint64_t ns) { balance_ -= static_cast<int64_t>(ns); }
    bool empty() const { return cap_ != 0 && balance_ <= 0; }
    // Nanoseconds until a refill makes it non-empty (0: not empty).
    uint64_t untilRefilled() const;
    int64_t balance() const { return balance_; }

 private:
    uint64_t cap_ = 0;
    uint64_t interval_ = 1;
    uint64_t refilled_ = 0;
    int64_t  balance_ = 0;
};

// The estimate of the memory the values at stack slots [from, to] keep
// alive: each string at its length plus the string header; each table at
// a header plus one hash node per entry, with what its keys and values
// keep alive; each function at a closure header plus one slot per
// upvalue, with what its upvalues keep alive (a callback's captured
// request body, table or closure). Each table and function with
// upvalues is counted once, a function without upvalues at its header
// wherever it appears; the values of package.loaded and the globals table
// (module state every timer shares, alive anyway) are not counted. Stops
// once the estimate passes `limit` (the caller refuses then), and when
// `overdue` (checked every 1024 entries; may be null) says the run is past
// its CPU budget. Uses a few stack slots, and two tables when a table or
// a function with upvalues is among the values; raises only on out of
// memory.
size_t parkedSize(lua_State *L, int from, int to, size_t limit,
                  bool (*overdue)());

constexpr size_t kParkedStringHeader = 24;   // LuaJIT's GCstr, 64-bit
constexpr size_t kParkedTableHeader = 64;    // GCtab
constexpr size_t kParkedEntry = 24;          // Node: key, value, next
constexpr size_t kParkedClosureHeader = 40;  // GCfuncL
constexpr size_t kParkedUpvalue = 8;         // its upvalue slot
// A pending timer's coroutine (lua_State and its first stack), one slot
// of that stack per value it holds.
constexpr size_t kParkedThread = 480;
constexpr size_t kParkedSlot = 8;

}  // namespace luaguard::budget
