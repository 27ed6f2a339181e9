// The Lua VM of one nginx worker. Created while the configuration is
// parsed, in the master, so init_by_lua state is inherited by every worker
// through fork; closed with the cycle that created it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "runtime/lua.hpp"

namespace luaguard {

// Counts every byte the VM holds. The ceiling refuses allocations past it
// ("not enough memory" in Lua); `charge`, when set, points at the running
// request's net allocation, which has its own limit.
struct MemoryAccount {
    size_t   in_use = 0;
    size_t   peak = 0;
    size_t   ceiling = 0;          // 0: no ceiling
    int64_t *charge = nullptr;     // running request's net bytes, or null
    int64_t  charge_limit = 0;     // 0: no per-request limit
    bool     refused = false;      // an allocation was refused since reset
    uint64_t refusals = 0;
    uint64_t freed = 0;            // bytes given back, for the metrics
    // Told of each refusal; true when the request limit (not the ceiling)
    // refused. Budgets use it to end the run that asked.
    void   (*on_refuse)(bool request_limit) = nullptr;

};

class Vm {
 public:
    Vm() = default;
    ~Vm();
    Vm(const Vm &) = delete;
    Vm &operator=(const Vm &) = delete;

    // Creates the state with the accounting allocator and the standard
    // libraries. Returns false with *err set when LuaJIT cannot start.
    bool open(std::string *err);

    lua_State *L() const { return L_; }
    MemoryAccount &memory() { return memory_; }

    // Registry reference to a table mapping file path -> factory function
    // (compiled *_by_lua_file chunks, per worker).
    int fileCacheRef() const { return file_cache_ref_; }

    // Coroutines for Lua threads, reused: creating one per request phase
    // is a good part of a small handler's cost. take() pushes nothing; it
    // returns a thread and its registry anchor.
    std::pair<lua_State *, int> takeThread();
    // Gives back a thread that finished normally (reset for reuse), or
    // drops its anchor when the cache is full.
    void giveThread(lua_State *co, int ref);

 private:
    static void *allocate(void *ud, void *ptr, size_t osize, size_t nsize);

    lua_State *L_ = nullptr;
    MemoryAccount memory_;
    int file_cache_ref_ = LUA_NOREF;
    std::vector<std::pair<lua_State *, int>> thread_cache_;
};

}  // namespace luaguard
