#include "runtime/vm.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <new>
#include <cstdlib>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define LUAGUARD_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LUAGUARD_ASAN 1
#endif
#endif


namespace luaguard {

namespace {

void *refuse(MemoryAccount *m)
{
    m->refused = true;
    m->refusals++;
    return nullptr;
}

size_t hardCeiling(size_t limit)
{
    return MemoryAccount::hardCeiling(limit);
}

#ifdef LUAGUARD_ASAN
// Under AddressSanitizer Lua's objects stay in malloc's heap, where every
// use after free and overflow of a GC object is caught (LuaJIT's mspace
// would hide them).
void *systemAlloc(void *, void *ptr, size_t, size_t nsize)
{
    if (nsize == 0) {
        std::free(ptr);
        return nullptr;
    }
    return std::realloc(ptr, nsize);
}
#endif

}  // namespace

bool VmRefs::push(lua_State *L) const
{
    const void *key = lua_topointer(L, LUA_REGISTRYINDEX);
    for (int i = 0; i < kSlots && vm[i]; i++) {
        if (vm[i] == key) {
            lua_rawgeti(L, LUA_REGISTRYINDEX, ref[i]);
            return true;
        }
    }
    return false;
}

bool VmRefs::keep(lua_State *L)
{
    for (int i = 0; i < kSlots; i++) {
        if (vm[i] == nullptr) {
            lua_pushvalue(L, -1);
            ref[i] = luaL_ref(L, LUA_REGISTRYINDEX);
            vm[i] = lua_topointer(L, LUA_REGISTRYINDEX);
            return true;
        }
    }
    return false;
}

// Every Lua allocation passes here: the common case (no limit near) is
// two compares; everything that tells or refuses is in allocateSlow.
void *Vm::allocate(void *ud, void *ptr, size_t osize, size_t nsize)
{
    auto *m = static_cast<MemoryAccount *>(ud);

    if (ptr == nullptr) {
        osize = 0;  // osize carries a type tag for new blocks
    }

    if (nsize == 0) {
        m->in_use -= osize;
        m->freed += osize;
        *m->charge -= static_cast<int64_t>(osize);
        m->noteFreed();
        return m->base(m->base_ud, ptr, osize, 0);
    }

    if (nsize > osize) {
        size_t grow = nsize - osize;
#ifdef LUAGUARD_FAULT_INJECTION
        if (m->fail_countdown && --m->fail_countdown == 0) {
            return refuse(m);
        }
#endif
        if (m->in_use + grow > m->in_use_trip
            || *m->charge + static_cast<int64_t>(grow) > m->charge_trip)
        {
            return allocateSlow(m, ptr, osize, nsize);
        }
    }
    return place(m, ptr, osize, nsize);
}

void *Vm::place(MemoryAccount *m, void *ptr, size_t osize, size_t nsize)
{
    void *p = m->base(m->base_ud, ptr, osize, nsize);
    if (p == nullptr) {
        return refuse(m);
    }
    m->in_use = m->in_use - osize + nsize;
    *m->charge += static_cast<int64_t>(nsize) - static_cast<int64_t>(osize);
    if (nsize < osize) {
        m->freed += osize - nsize;
        m->noteFreed();
    } else if (m->in_use > m->peak) {
        m->peak = m->in_use;
    }
    return p;
}

void *Vm::allocateSlow(MemoryAccount *m, void *ptr, size_t osize,
                       size_t nsize)
{
    size_t grow = nsize - osize;
    if (m->ceiling && m->in_use + grow > hardCeiling(m->ceiling)) {
        return refuse(m);
    }
    int64_t after = *m->charge + static_cast<int64_t>(grow);
    if (m->charge_hard && after > m->charge_hard) {
        return refuse(m);
    }
    if (m->charge_limit && after > m->charge_limit) {
        m->setCharge(m->charge, 0, m->charge_hard);  // told once per run
        if (m->on_over) {
            m->on_over(true);
        }
    }
    if (m->ceiling && !m->over_ceiling && m->in_use + grow > m->ceiling) {
        m->setOverCeiling(true);
        if (m->on_over) {
            m->on_over(false);
        }
    }
    return place(m, ptr, osize, nsize);
}

#if defined(LUAGUARD_CHECKHOOK) && !defined(LUAGUARD_ASAN)
namespace {

// The layout of LuaJIT's allocator state (lj_alloc.c of luajit2
// 2.1-20230119, the source scripts/build-luajit.sh builds; dlmalloc 2.8's
// mstate), mirrored to walk its chunks: LuaJIT has no trim of its own.
// trim() checks every chunk header it walks against its neighbours before
// it touches a page, so a different layout is a no-op, not a corruption.
struct Chunk {
    size_t prev_foot;
    size_t head;
};
struct Segment {
    char    *base;
    size_t   size;
    Segment *next;
};
struct MState {
    unsigned smallmap, treemap;
    size_t   dvsize, topsize;
    Chunk   *dv, *top;
    size_t   trim_check, release_checks;
    Chunk   *smallbins[(32 + 1) * 2];
    void    *treebins[32];
    Segment  seg;
    void    *prng;
};

constexpr size_t kPinuse = 1, kCinuse = 2, kInuse = kPinuse | kCinuse;
constexpr size_t kFencepost = kInuse | sizeof(size_t);
constexpr size_t kMinChunk = 4 * sizeof(size_t);
// A free chunk's own fields (head, list and tree links) lie in its first
// 56 bytes: the pages past them hold nothing the allocator reads.
constexpr size_t kFreeHeader = 64;

size_t chunkSize(const Chunk *c) { return c->head & ~kInuse; }

Chunk *firstChunk(char *base)
{
    auto mem = reinterpret_cast<uintptr_t>(base) + 2 * sizeof(size_t);
    size_t off = (mem & 7) ? (8 - (mem & 7)) & 7 : 0;
    return reinterpret_cast<Chunk *>(base + off);
}

// Adds the free space [from, to) of every free chunk of `m` to `out`;
// false if a header does not fit the layout (nothing may be trimmed).
bool freeRanges(MState *m, std::vector<std::pair<char *, char *>> *out)
{
    int segments = 0;
    bool saw_top = false;
    for (Segment *sp = &m->seg; sp; sp = sp->next) {
        if (++segments > 1 << 20 || sp->base == nullptr) {
            return false;
        }
        char *end = sp->base + sp->size;
        Chunk *c = firstChunk(sp->base);
        bool prev_inuse = true;
        for (;;) {
            auto *p = reinterpret_cast<char *>(c);
            if (p < sp->base || p >= end) {
                return false;
            }
            if (c == m->top) {
                if (chunkSize(c) != m->topsize || p + m->topsize > end) {
                    return false;
                }
                out->emplace_back(p + kFreeHeader, p + m->topsize);
                saw_top = true;
                break;
            }
            if (c->head == kFencepost) {
                break;
            }
            size_t size = chunkSize(c);
            if (size < kMinChunk || (size & 7) || p + size > end
                || ((c->head & kPinuse) != 0) != prev_inuse)
            {
                return false;
            }
            prev_inuse = (c->head & kCinuse) != 0;
            if (!prev_inuse && size > kFreeHeader) {
                out->emplace_back(p + kFreeHeader, p + size);
            }
            c = reinterpret_cast<Chunk *>(p + size);
        }
    }
    return saw_top;
}

}  // namespace

void MemoryAccount::trim()
{
    if (!base_is_luajit || base_ud == nullptr) {
        return;
    }
    std::vector<std::pair<char *, char *>> ranges;
    try {
        if (!freeRanges(static_cast<MState *>(base_ud), &ranges)) {
            return;
        }
    } catch (...) {
        return;  // no memory for the list: nothing trimmed
    }
    const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
    for (auto [from, to] : ranges) {
        uintptr_t a = (reinterpret_cast<uintptr_t>(from) + page - 1) & ~(page - 1);
        uintptr_t b = reinterpret_cast<uintptr_t>(to) & ~(page - 1);
        if (a < b) {
            madvise(reinterpret_cast<void *>(a), b - a, MADV_DONTNEED);
        }
    }
}
#else
void MemoryAccount::trim() {}
#endif

namespace {

// Room left below the floor: an error raised there is formatted and
// unwound, a message handler or a budget stop's hook may run, the budget
// signal's handler may come: all far less than this.
constexpr size_t kCStackReserve = 256 * 1024;
// At most this much of a stack is used: a stack without a limit (ulimit
// -s unlimited) can end at whatever mapping lies below it.
constexpr size_t kCStackAssumed = 8 * 1024 * 1024;

// The floor of the calling thread's stack: its lowest address (glibc
// reads the main thread's from its mapping and RLIMIT_STACK) plus the
// reserve; null when it cannot be known.
char *threadCStackFloor()
{
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) {
        return nullptr;
    }
    void *addr = nullptr;
    size_t size = 0;
    int rc = pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    if (rc != 0 || addr == nullptr || size <= 2 * kCStackReserve) {
        return nullptr;
    }
    char *top = static_cast<char *>(addr) + size;
    size = std::min(size, kCStackAssumed);
    return top - size + kCStackReserve;
}

}  // namespace

void Vm::limitCStack()
{
#ifdef LUAGUARD_CHECKHOOK
    // Computed once per thread: a worker thread's VM is set before each
    // task, and the main thread's lookup reads /proc/self/maps.
    thread_local char *floor = threadCStackFloor();
    luaguard_cstack_floor(L_, floor);
#endif
}

bool Vm::open(std::string *err)
{
#ifdef LUAGUARD_ASAN
    memory_.base = systemAlloc;
    L_ = lua_newstate(allocate, &memory_);
#else
    // LuaJIT's allocator, not glibc's malloc: fewer instructions per
    // allocation, a lock-free single-threaded heap, and it gives memory
    // back by itself (big blocks are mapped one by one, the top of a
    // segment is trimmed, empty segments are unmapped). Only luaL_newstate
    // can create it; the accounting wraps it once the state exists.
    L_ = luaL_newstate();
#endif
    if (L_ == nullptr) {
        *err = "creating the Lua state failed";
        return false;
    }
#ifndef LUAGUARD_ASAN
    memory_.base = lua_getallocf(L_, &memory_.base_ud);
    memory_.base_is_luajit = true;
    // What the state holds already (its global state, string table,
    // registry), so that freeing it later does not take the count below
    // zero.
    memory_.in_use = static_cast<size_t>(lua_gc(L_, LUA_GCCOUNT, 0)) * 1024
                     + static_cast<size_t>(lua_gc(L_, LUA_GCCOUNTB, 0));
    memory_.peak = memory_.in_use;
    lua_setallocf(L_, allocate, &memory_);
#endif
    luaL_openlibs(L_);
    // The registry's array part made room for kRegistryRefs references
    // at once (taken and given back: they stay in its free list): a
    // reference in the hash part can vanish when a resize meets an
    // allocation failure (see growCells), one in the array part cannot.
    std::vector<int> refs(kRegistryRefs);
    for (int &ref : refs) {
        lua_pushboolean(L_, 1);
        ref = luaL_ref(L_, LUA_REGISTRYINDEX);
    }
    for (auto it = refs.rbegin(); it != refs.rend(); ++it) {
        luaL_unref(L_, LUA_REGISTRYINDEX, *it);
    }
    lua_newtable(L_);
    code_cache_ref_ = luaL_ref(L_, LUA_REGISTRYINDEX);
    // Room for a busy worker's requests and runs without growing.
    lua_createtable(L_, kInitialCells, 0);
    cells_size_ = kInitialCells;
    lua_newtable(L_);
    lua_rawseti(L_, -2, kIdleEnvCell);
    cells_ = lua_topointer(L_, -1);
    cells_ref_ = luaL_ref(L_, LUA_REGISTRYINDEX);
    lua_newtable(L_);
    lua_createtable(L_, 0, 1);
    lua_pushliteral(L_, "k");
    lua_setfield(L_, -2, "__mode");
    lua_setmetatable(L_, -2);
    lua_setfield(L_, LUA_REGISTRYINDEX, kEscapedKey);
    return true;
}

int Vm::hold(lua_State *L)
{
    int cell = free_cells_.empty() ? next_cell_ : free_cells_.back();
    if (static_cast<size_t>(cell) >= taken_.size()) {
        taken_.resize(static_cast<size_t>(cell) * 2);
    }
    // release() must not allocate: room for every cell in the free list.
    free_cells_.reserve(static_cast<size_t>(next_cell_));
    if (cell > cells_size_) {
        growCells(L);
    }
    setHeld(L, cell);  // in the array part: no allocation
    if (free_cells_.empty()) {
        next_cell_++;
    } else {
        free_cells_.pop_back();
    }
    taken_[static_cast<size_t>(cell)] = true;
    return cell;
}

// Cells stay in the table's array part: LuaJIT's table resize grows the
// array before it allocates the new hash part, and when that allocation
// fails, integer keys that were in the old hash part and now fall in the
// array range read as nil (lj_tab_resize; patched in the LuaJIT we build,
// scripts/luajit-patches, not in Debian's libluajit2 that
// -DLUAGUARD_LUAJIT=system links). A registry reference past the
// registry's array part can vanish that way; a cell cannot. The copy is
// made whole before it replaces the table.
void Vm::growCells(lua_State *L)
{
    int size = cells_size_ * 2;
    lua_createtable(L, size, 0);                         // may raise
    lua_rawgeti(L, LUA_REGISTRYINDEX, cells_ref_);
    for (int i = 1; i <= cells_size_; i++) {
        lua_rawgeti(L, -1, i);
        lua_rawseti(L, -3, i);
    }
    lua_pop(L, 1);
    const void *cells = lua_topointer(L, -1);
    lua_rawseti(L, LUA_REGISTRYINDEX, cells_ref_);       // an existing key
    cells_ = cells;
    cells_size_ = size;
}

void Vm::release(lua_State *L, int cell)
{
    if (cell < kFirstCell || static_cast<size_t>(cell) >= taken_.size()
        || !taken_[static_cast<size_t>(cell)])
    {
        return;
    }
    taken_[static_cast<size_t>(cell)] = false;
    lua_pushnil(L);
    setHeld(L, cell);  // an existing key: no allocation
    free_cells_.push_back(cell);
}

std::vector<int> &Vm::closurePool(const void *factory)
{
    return closure_pools_[factory];
}

std::pair<lua_State *, int> Vm::takeThread()
{
    if (!thread_cache_.empty()) {
        auto t = thread_cache_.back();
        thread_cache_.pop_back();
        return t;
    }
    lua_State *co = lua_newthread(L_);
    int ref = luaL_ref(L_, LUA_REGISTRYINDEX);
    return {co, ref};
}

void Vm::giveThread(lua_State *co, int ref)
{
    // As many as a busy worker runs at once is plenty; beyond that the
    // collector takes them.
    constexpr size_t kMaxCached = 256;
    if (thread_cache_.size() >= kMaxCached) {
        luaL_unref(L_, LUA_REGISTRYINDEX, ref);
        return;
    }
    if (lua_status(co) == 0) {
        // Returned: nothing open, no frame left. Emptying the stack is
        // enough, and much cheaper than lua_resetthread, which clears the
        // whole stack (about 1.6k instructions per thread); the collector
        // never marks slots above the top.
        lua_settop(co, 0);
    } else {
        lua_resetthread(L_, co);
    }
    thread_cache_.emplace_back(co, ref);
}

Vm::~Vm()
{
    if (L_) {
        // Closed by LuaJIT's own allocator, which then unmaps its whole
        // heap at once (it only does so when it is the state's allocator).
        lua_setallocf(L_, memory_.base, memory_.base_ud);
        lua_close(L_);
    }
}

}  // namespace luaguard
