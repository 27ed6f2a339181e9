// Metrics of Lua execution (docs/metrics.md): counters kept in one shared
// memory zone so that every worker adds to the same numbers and a reload
// keeps them; the `lua_metrics` content handler serving them in the
// Prometheus text format; `require "luaguard.metrics"` for Lua.
//
// Hot path: the counters of a location live in a fixed slot of the zone,
// found at configuration time (LocConf::metrics), so counting an event is
// one atomic add on a pointer the request already has: no lookup, lock,
// allocation or string work.
#pragma once

#include <string>

#include "ngx/module.hpp"
#include "security/sandbox.hpp"

namespace luaguard::metrics {

// Buckets of luaguard_lua_cpu_seconds, in nanoseconds (upper bounds).
constexpr int kBuckets = 16;
extern const uint64_t kBucketNs[kBuckets];

// The budget kinds counted (budget::Kind minus None), by index kind - 1.
constexpr int kStopKinds = 4;

// Timer creations and firings stopped by a location's timer shares
// (ngx/timers.cpp): pending slots, argument memory, callback Lua time.
enum class TimerStop { Pending, Memory, Cpu };
constexpr int kTimerStopKinds = 3;

// What a request was refused by a budget: memory the API would have
// allocated outside Lua (ngx.var, ngx.header, output, bodies, socket
// receives; the request is stopped, a lua_budget_memory stop too) and
// cosockets past lua_socket_max_per_request (the script sees the error).
enum class BudgetRefusal { Memory, Connections };
constexpr int kBudgetRefusalKinds = 2;

// One location's counters, in shared memory. Written with atomic adds by
// every worker; the name is written by the master at configuration time.
struct LocSlot {
    ngx_atomic_t  runs;
    ngx_atomic_t  errors;
    ngx_atomic_t  stops[kStopKinds];
    ngx_atomic_t  timer_stops[kTimerStopKinds];
    ngx_atomic_t  budget_refusals[kBudgetRefusalKinds];
    ngx_atomic_t  refusals[sandbox::kCapabilityCount];
    ngx_atomic_t  egress;
    ngx_atomic_t  connects;
    ngx_atomic_t  pool_hits;
    ngx_atomic_t  cpu[kBuckets + 1];    // per bucket, not cumulative; +Inf
    ngx_atomic_t  cpu_sum_ns;
    ngx_atomic_t  gen;                  // configuration that uses it
    uint32_t      name_len;
    char          name[132];
};

// Per-location configuration state (cycle pool): every LocConf of the same
// location name points at the same Loc.
struct Loc {
    ngx_str_t     name;
    LocSlot      *slot;                 // set when the zone is initialised
};

// ---- configuration (src/ngx/module.cpp) ----

// The `lua_metrics` directive: the location serves the exposition text.
char *directive(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

// mergeLocConf: gives the location its slot (by location name).
void mergeLoc(ngx_conf_t *cf, LocConf *conf);

// postconfiguration: adds the shared memory zone.
ngx_int_t postconfiguration(ngx_conf_t *cf);

// init process: the worker's gauge slot and its periodic refresh.
void initWorker(ngx_cycle_t *cycle);

// ---- events (one call per hook point) ----

LocSlot *slotOf(const RequestCtx *ctx);
LocSlot *slotOf(const LocConf *lcf);

inline void add(ngx_atomic_t *counter, ngx_atomic_int_t n = 1)
{
    ngx_atomic_fetch_add(counter, n);
}

// A Lua handler (entry thread, timer callback, or a run on the main state)
// started for `ctx` (null: code outside any request).
inline void countRun(const RequestCtx *ctx)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->runs);
    }
}

// A Lua run ended with an error (budget stops included).
inline void countError(const RequestCtx *ctx)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->errors);
    }
}

inline void countEgressRefusal(const RequestCtx *ctx)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->egress);
    }
}

inline void countConnect(const RequestCtx *ctx)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->connects);
    }
}

inline void countPoolHit(const RequestCtx *ctx)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->pool_hits);
    }
}

inline void countBudgetRefusal(const RequestCtx *ctx, BudgetRefusal k)
{
    if (LocSlot *s = slotOf(ctx)) {
        add(&s->budget_refusals[static_cast<int>(k)]);
    }
}

inline void countTimerStop(const LocConf *lcf, TimerStop k)
{
    if (LocSlot *s = slotOf(lcf)) {
        add(&s->timer_stops[static_cast<int>(k)]);
    }
}

// The request (or timer) context is going away: its Lua time goes into the
// histogram, a budget stop into its counter, the worker's gauges are
// refreshed.
void requestDone(const RequestCtx *ctx);

// ---- reading ----

// The Prometheus text exposition (version 0.0.4) of everything.
std::string render(MainConf *mcf);

// Pushes the nested table `require "luaguard.metrics".get()` returns.
void pushTable(lua_State *L, MainConf *mcf);

}  // namespace luaguard::metrics
