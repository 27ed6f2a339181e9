// The Lua VM of one nginx worker. Created while the configuration is
// parsed, in the master, so init_by_lua state is inherited by every worker
// through fork; closed with the cycle that created it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "runtime/lj_cells.h"
#include "runtime/lua.hpp"

namespace luaguard {

// Counts every byte the VM holds.
//
// Budgets are soft: an allocation that takes the running request past
// `charge_limit`, or the VM past `ceiling`, goes through and `on_over` is
// told, which stops the run at its next instruction (a hook). Refusing it
// instead would raise "not enough memory" from wherever the allocation
// happened, and LuaJIT 2.1-20230119 mishandles that inside compiled traces
// that call C (the worker dies with SIGSEGV). Allocations are refused only
// at the hard limits (hardLimit(), hardCeiling()), far enough above that
// only one enormous allocation in a single C call (string.rep of a
// gigabyte) reaches them.
struct MemoryAccount {
    size_t   in_use = 0;
    size_t   peak = 0;
    size_t   ceiling = 0;          // lua_vm_memory_limit; 0: none
    // The running request's net bytes; no_charge when no budget runs.
    int64_t *charge = &no_charge;
    int64_t  charge_limit = 0;     // its budget; 0: none (or already over)
    int64_t  charge_hard = 0;      // refused past this; 0: none
    int64_t  no_charge = 0;
    // Vm::allocate's only two tests for a growing block: crossing either
    // takes its slow path, which tells on_over, refuses, or neither.
    // Derived from the fields above by setCharge (charge_trip) and
    // setCeiling / setOverCeiling (in_use_trip), called by whatever
    // changes them.
    size_t   in_use_trip = SIZE_MAX;
    int64_t  charge_trip = INT64_MAX;
    bool     refused = false;      // an allocation was refused since reset
    bool     over_ceiling = false; // on_over told of the ceiling in this run
    uint64_t refusals = 0;
    uint64_t freed = 0;            // bytes given back, for the metrics
    // Test builds only (LUAGUARD_FAULT_INJECTION, ngx/phases.cpp sets
    // it): refuse the Nth growing allocation from now (1: the next); 0: off.
    uint64_t fail_countdown = 0;
    // Told when an allocation took the request past its budget (true) or
    // the VM past its ceiling (false). Budgets end the run that asked.
    void   (*on_over)(bool request_limit) = nullptr;
    // The allocator that does the work: LuaJIT's own (its dlmalloc-derived
    // mspace, set by Vm::open), which this account wraps.
    lua_Alloc base = nullptr;
    void     *base_ud = nullptr;
    bool      base_is_luajit = false;

    // Hands the pages of the free space inside LuaJIT's heap back to the
    // system (after a collection that freed a stopped request's garbage):
    // its allocator unmaps only the top of its heap and wholly empty
    // segments, so one live object above a bomb's debris would keep all of
    // it resident. No-op under any other allocator.
    void trim();

    MemoryAccount() = default;
    // `charge` may point at this account's own no_charge: a copy would
    // charge the original.
    MemoryAccount(const MemoryAccount &) = delete;
    MemoryAccount &operator=(const MemoryAccount &) = delete;

    // Where allocations are charged (null: nowhere) and their limits.
    void setCharge(int64_t *to, int64_t limit, int64_t hard)
    {
        charge = to ? to : &no_charge;
        charge_limit = limit;
        charge_hard = hard;
        // The soft limit comes first, then the hard one (hardLimit >
        // limit).
        charge_trip = limit ? limit : hard ? hard : INT64_MAX;
    }
    void setCeiling(size_t bytes)
    {
        ceiling = bytes;
        retrip();
    }
    // Whether on_over was told of the ceiling, and the trip that follows
    // from it.
    void setOverCeiling(bool over)
    {
        over_ceiling = over;
        retrip();
    }
    void retrip()
    {
        // Under the ceiling the soft limit comes first; over it, only the
        // hard one is left (hardCeiling > ceiling).
        in_use_trip = ceiling == 0 ? SIZE_MAX
                      : over_ceiling ? hardCeiling(ceiling) : ceiling;
    }
    // Memory went down: back under the ceiling, the next crossing counts
    // (and tells on_over) again.
    void noteFreed()
    {
        if (over_ceiling && in_use < ceiling) {
            setOverCeiling(false);
        }
    }

    // The per-request hard limit for a budget of `limit` bytes: twice the
    // budget plus room for the stop's own error message.
    static int64_t hardLimit(int64_t limit)
    {
        return limit ? 2 * limit + (16 << 20) : 0;
    }
    // The VM's hard ceiling for a lua_vm_memory_limit of `limit`.
    static size_t hardCeiling(size_t limit)
    {
        return limit ? limit + limit / 4 + (16u << 20) : 0;
    }
};

// Registry references of one object (a sandbox view, a compiled handler)
// in up to kSlots VMs, each named by its registry's address. Cheaper than
// a registry table keyed by the object's address: a light userdata key
// costs an intern at every lookup in LuaJIT's GC64 mode. Zero-initialised
// memory is an empty cache.
struct VmRefs {
    static constexpr int kSlots = 8;
    const void *vm[kSlots];
    int         ref[kSlots];

    // Pushes the value kept for L's VM; false (nothing pushed) if none.
    bool push(lua_State *L) const;
    // Keeps the value on top of L (left there) for L's VM; false when
    // every slot is taken.
    bool keep(lua_State *L);
};

// Handler closures made with one request environment (pooled closures
// whose environment is that table), kept with it for as long as it is
// reused: the later runs of the request, and of each request that is given
// the same environment, call them as they are, without setting and
// clearing an environment per run. Fixed size: a request runs few
// handlers; one more runs the way every run did before (code.hpp).
struct EnvClosures {
    static constexpr int kMax = 6;
    std::vector<int> *pool[kMax] = {};   // the closure pool each came from
    int               cell[kMax] = {};
    bool              makes[kMax] = {};  // it makes closures (escapes)
    int               n = 0;

    // The slot of pool `p`'s closure, or -1.
    int slot(const std::vector<int> *p) const
    {
        for (int i = 0; i < n; i++) {
            if (pool[i] == p) {
                return i;
            }
        }
        return -1;
    }
    // Forgets slot i's closure (its cell is the caller's now).
    void drop(int i)
    {
        n--;
        pool[i] = pool[n];
        cell[i] = cell[n];
        makes[i] = makes[n];
    }
    bool add(std::vector<int> *p, int c, bool m)
    {
        if (n == kMax) {
            return false;
        }
        pool[n] = p;
        cell[n] = c;
        makes[n] = m;
        n++;
        return true;
    }
};

// A request environment's cell waiting for the next request of its policy
// with the closures made for it. `renew`: its table went to whoever kept
// it (a closure, getfenv) or was written to; the cell holds the empty
// environment, as its closures do, until the next request puts a new
// table there (ngx/phases.cpp, requestEnvCell).
struct IdleEnv {
    int          cell = 0;
    EnvClosures  closures;
    bool         renew = false;
};

class Vm {
 public:
    Vm() = default;
    ~Vm();
    Vm(const Vm &) = delete;
    Vm &operator=(const Vm &) = delete;

    // Creates the state with LuaJIT's own allocator behind the accounting
    // one, and the standard libraries. Returns false with *err set when LuaJIT cannot start.
    bool open(std::string *err);

    lua_State *L() const { return L_; }
    MemoryAccount &memory() { return memory_; }

    // Limits how deep calls from C into Lua and coroutine resumes may nest
    // on the calling thread's stack (scripts/luajit-patches/
    // unbounded-c-calls.patch): past it they fail with "C stack overflow"
    // instead of running the stack out. Called on the thread that runs
    // this VM next, before it runs (the floor is an address of that
    // thread's stack). Without the patched LuaJIT: nothing.
    void limitCStack();

    // Registry reference to the table of compiled code of this VM: file
    // path -> factory (*_by_lua_file chunks, per worker), and, in a
    // lua_vm, Handler address -> factory for handlers whose VmRefs are
    // full (inline code is compiled into the default VM while the
    // configuration is parsed, into the others on first use).
    int codeCacheRef() const { return code_cache_ref_; }

    // Coroutines for Lua threads, reused: creating one per request phase
    // is a good part of a small handler's cost. take() pushes nothing; it
    // returns a thread and its registry anchor.
    std::pair<lua_State *, int> takeThread();
    // Gives back a thread that finished normally (reset for reuse), or
    // drops its anchor when the cache is full.
    void giveThread(lua_State *co, int ref);

    // Cells of a table of the VM for Lua values C++ keeps between calls (a
    // request's environment, its ngx.ctx table, pooled handler closures),
    // instead of registry references: the free list is C++'s own, so no stray
    // luaL_unref can hand one cell to two owners, and a cell given back
    // twice or never taken is ignored. Cell 0 is "none".
    //
    // hold() stores the value on top of L (popped) in a free cell and
    // returns its number; an allocation failure raises before any cell is
    // taken (the value is still popped).
    int hold(lua_State *L);
    // The cells table, and its address: what names this VM to the FFI
    // (lua/index_ffi.lua).
    void pushCells(lua_State *L) const
    {
        lua_rawgeti(L, LUA_REGISTRYINDEX, cells_ref_);
    }
    const void *cells() const { return cells_; }
    // Pushes the value of cell `cell`.
    void pushHeld(lua_State *L, int cell) const
    {
#if LUAGUARD_LJ_INTERNALS
        luaguard_cells_push(L, cells_, cell);
#else
        lua_rawgeti(L, LUA_REGISTRYINDEX, cells_ref_);
        lua_rawgeti(L, -1, cell);
        lua_remove(L, -2);
#endif
    }
    // Replaces the value of taken cell `cell` with the value on top of L
    // (popped). Never allocates.
    void setHeld(lua_State *L, int cell) const
    {
#if LUAGUARD_LJ_INTERNALS
        luaguard_cells_set(L, cells_, cell);
#else
        lua_rawgeti(L, LUA_REGISTRYINDEX, cells_ref_);
        lua_insert(L, -2);
        lua_rawseti(L, -2, cell);
        lua_pop(L, 1);
#endif
    }
    // Sets the environment of the Lua function on top of L to the table
    // in cell `cell`.
    void setFenvHeld(lua_State *L, int cell) const
    {
#if LUAGUARD_LJ_INTERNALS
        luaguard_cells_setfenv(L, cells_, cell);
#else
        pushHeld(L, cell);
        lua_setfenv(L, -2);
#endif
    }
    // Sets the environment of the Lua function in cell `fn` to the table
    // in cell `env`.
    void setFenvOfHeld(lua_State *L, int fn, int env) const
    {
#if LUAGUARD_LJ_INTERNALS
        luaguard_cells_setfenv_of(L, cells_, fn, env);
#else
        pushHeld(L, fn);
        setFenvHeld(L, env);
        lua_pop(L, 1);
#endif
    }
    // Pushes the Lua function in cell `fn` if its environment is the
    // table in cell `env`; false (nothing pushed) if it is not.
    bool pushIfFenv(lua_State *L, int fn, int env) const
    {
#if LUAGUARD_LJ_INTERNALS
        return luaguard_cells_push_if_fenv(L, cells_, fn, env) != 0;
#else
        pushHeld(L, fn);
        lua_getfenv(L, -1);
        pushHeld(L, env);
        bool same = lua_rawequal(L, -1, -2) != 0;
        lua_pop(L, same ? 2 : 3);
        return same;
#endif
    }
    // Empties cell `cell` (its value is left to the collector) and makes
    // it free. Never raises.
    void release(lua_State *L, int cell);

    // Request environments no code kept (a handler's globals table that
    // never escaped it, see ngx/phases.cpp), per sandbox policy: cells
    // whose tables are handed to later requests instead of new ones.
    std::vector<IdleEnv> &envPool(const void *policy)
    {
        // Two lookups per request, nearly always for one policy.
        if (policy != env_pool_key_ || env_pool_ == nullptr) {
            env_pool_key_ = policy;
            env_pool_ = &env_pools_[policy];   // nodes never move
        }
        return *env_pool_;
    }
    // Whether cell `cell` holds an environment as fresh as a new one once
    // its `ngx` field is restored (which this does). Never true without
    // LuaJIT's internals: no environment is reused there.
    bool resetEnv(lua_State *L, int cell) const
    {
#if LUAGUARD_LJ_INTERNALS
        return luaguard_cells_env_reset(L, cells_, cell) != 0;
#else
        (void)L;
        (void)cell;
        return false;
#endif
    }
    // Whether the Lua function on top of L can make closures that keep its
    // environment (lj_cells.h). Without LuaJIT's internals: always.
    static bool makesClosures(lua_State *L)
    {
#if LUAGUARD_LJ_INTERNALS
        return luaguard_func_closures_keep_env(L) != 0;
#else
        (void)L;
        return true;
#endif
    }

    // The idle handler closures of `factory`: runtime/code.hpp's
    // closurePool.
    std::vector<int> &closurePool(const void *factory);

    // Registry field: a weak-keyed table of the handler closures request
    // code got as values (runtime/code.hpp, markEscaped). Made by open(),
    // so looking it up never allocates.
    static constexpr const char *kEscapedKey = "luaguard.escaped_closures";

    // Reserved cells.
    static constexpr int kIdleEnvCell = 1;   // an empty table
    static constexpr int kFirstCell = 2;

 private:
    static void *allocate(void *ud, void *ptr, size_t osize, size_t nsize);
    static void *allocateSlow(MemoryAccount *m, void *ptr, size_t osize,
                              size_t nsize);
    static void *place(MemoryAccount *m, void *ptr, size_t osize,
                       size_t nsize);

    lua_State *L_ = nullptr;
    MemoryAccount memory_;
    int code_cache_ref_ = LUA_NOREF;
    std::vector<std::pair<lua_State *, int>> thread_cache_;
    void growCells(lua_State *L);

    static constexpr int kInitialCells = 512;
    static constexpr int kRegistryRefs = 512;
    int cells_ref_ = LUA_NOREF;
    const void *cells_ = nullptr;          // the table (lua_topointer)
    int cells_size_ = 0;                   // its array part: 1..size
    int next_cell_ = kFirstCell;
    std::vector<int> free_cells_;
    std::vector<bool> taken_;              // by cell number
    std::unordered_map<const void *, std::vector<int>> closure_pools_;
    std::unordered_map<const void *, std::vector<IdleEnv>> env_pools_;
    const void *env_pool_key_ = nullptr;
    std::vector<IdleEnv> *env_pool_ = nullptr;
};

}  // namespace luaguard
