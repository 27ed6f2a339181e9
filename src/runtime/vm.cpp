#include "runtime/vm.hpp"

#include <cstdlib>

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

void *Vm::allocate(void *ud, void *ptr, size_t osize, size_t nsize)
{
    auto *m = static_cast<MemoryAccount *>(ud);

    if (ptr == nullptr) {
        osize = 0;  // osize carries a type tag for new blocks
    }

    if (nsize == 0) {
        std::free(ptr);
        m->in_use -= osize;
        m->freed += osize;
        if (m->charge) {
            *m->charge -= static_cast<int64_t>(osize);
        }
        if (m->over_ceiling && m->in_use < m->ceiling) {
            m->over_ceiling = false;  // back under: the next crossing counts
        }
        return nullptr;
    }

    if (nsize > osize) {
        size_t grow = nsize - osize;
#ifdef LUAGUARD_FAULT_INJECTION
        if (m->fail_countdown && --m->fail_countdown == 0) {
            return refuse(m);
        }
#endif
        if (m->ceiling && m->in_use + grow > hardCeiling(m->ceiling)) {
            return refuse(m);
        }
        if (m->charge) {
            int64_t after = *m->charge + static_cast<int64_t>(grow);
            if (m->charge_hard && after > m->charge_hard) {
                return refuse(m);
            }
            if (m->charge_limit && after > m->charge_limit) {
                m->charge_limit = 0;  // told once per run
                if (m->on_over) {
                    m->on_over(true);
                }
            }
        }
        if (m->ceiling && !m->over_ceiling
            && m->in_use + grow > m->ceiling)
        {
            m->over_ceiling = true;
            if (m->on_over) {
                m->on_over(false);
            }
        }
    }

    void *p = std::realloc(ptr, nsize);
    if (p == nullptr) {
        return refuse(m);
    }

    m->in_use = m->in_use - osize + nsize;
    if (nsize < osize) {
        m->freed += osize - nsize;
    }
    if (m->over_ceiling && m->in_use < m->ceiling) {
        m->over_ceiling = false;  // back under: the next crossing counts
    }
    if (m->in_use > m->peak) {
        m->peak = m->in_use;
    }
    if (m->charge) {
        *m->charge += static_cast<int64_t>(nsize) - static_cast<int64_t>(osize);
    }
    return p;
}

bool Vm::open(std::string *err)
{
    L_ = lua_newstate(allocate, &memory_);
    if (L_ == nullptr) {
        *err = "lua_newstate() failed";
        return false;
    }
    luaL_openlibs(L_);
    lua_newtable(L_);
    code_cache_ref_ = luaL_ref(L_, LUA_REGISTRYINDEX);
    return true;
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
        lua_close(L_);
    }
}

}  // namespace luaguard
