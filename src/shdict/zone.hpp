// lua_shared_dict zones: the directive, the nginx shared memory zone
// holding a shdict::Store, and the deferred init_by_lua.
#pragma once

#include "ngx/module.hpp"
#include "runtime/shdict_store.hpp"

namespace luaguard::shdict {

// The zone's allocator and lock: nginx's slab pool and its mutex.
class SlabMemory : public Memory {
 public:
    void *alloc(size_t size) override;
    void free(void *p) override;
    size_t freeSpace() override;
    void lock() override;
    void unlock() override;

    ngx_slab_pool_t *pool = nullptr;
};

// One configured dictionary, in the cycle's pool (process memory): the
// shared part is reached through `store`.
struct Zone {
    ngx_str_t        name;
    ngx_shm_zone_t  *shm_zone;
    MainConf        *mcf;
    SlabMemory       mem;
    Store            store{nullptr, &mem};
    bool             ready;      // the shared memory is mapped and set up
};

// All zones of a configuration (MainConf::shdict).
struct Zones {
    ngx_array_t      list;       // of Zone*
    ngx_uint_t       initialized;
    bool             run_init;   // init_by_lua waits for the zones
};

char *sharedDictDirective(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

// Called by postconfiguration instead of running init_by_lua directly:
// true when zones exist, in which case init_by_lua runs once the last
// zone is initialised (shared dictionaries are usable from init_by_lua).
bool deferInit(MainConf *mcf);

inline Zones *zones(MainConf *mcf)
{
    return static_cast<Zones *>(mcf->shdict);
}

// The current time in milliseconds, as expiry uses it.
uint64_t nowMs();

}  // namespace luaguard::shdict
