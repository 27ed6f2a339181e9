#include "runtime/vm.hpp"

#include <cstdlib>

namespace luaguard {

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
        return nullptr;
    }

    if (nsize > osize) {
        size_t grow = nsize - osize;
        bool over_request = m->charge && m->charge_limit
                            && *m->charge + static_cast<int64_t>(grow)
                                   > m->charge_limit;
        if (over_request || (m->ceiling && m->in_use + grow > m->ceiling)) {
            m->refused = true;
            m->refusals++;
            if (m->on_refuse) {
                m->on_refuse(over_request);
            }
            return nullptr;
        }
    }

    void *p = std::realloc(ptr, nsize);
    if (p == nullptr) {
        m->refused = true;
        m->refusals++;
        return nullptr;
    }

    m->in_use = m->in_use - osize + nsize;
    if (nsize < osize) {
        m->freed += osize - nsize;
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
    file_cache_ref_ = luaL_ref(L_, LUA_REGISTRYINDEX);
    return true;
}

Vm::~Vm()
{
    if (L_) {
        lua_close(L_);
    }
}

}  // namespace luaguard
