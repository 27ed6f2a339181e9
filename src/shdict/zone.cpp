#include "shdict/zone.hpp"

#include <new>

#include "ngx/glue.hpp"

namespace luaguard::shdict {

void *SlabMemory::alloc(size_t size)
{
    return ngx_slab_alloc_locked(pool, size);
}

void SlabMemory::free(void *p)
{
    ngx_slab_free_locked(pool, p);
}

size_t SlabMemory::freeSpace()
{
    return pool->pfree * ngx_pagesize;
}

void SlabMemory::lock()
{
    ngx_shmtx_lock(&pool->mutex);
}

void SlabMemory::unlock()
{
    ngx_shmtx_unlock(&pool->mutex);
}

uint64_t nowMs()
{
    ngx_time_t *tp = ngx_timeofday();
    return static_cast<uint64_t>(tp->sec) * 1000 + tp->msec;
}

namespace {

ngx_int_t initZone(ngx_shm_zone_t *shm_zone, void *data)
{
    auto *zone = static_cast<Zone *>(shm_zone->data);
    auto *old = static_cast<Zone *>(data);
    auto *pool = reinterpret_cast<ngx_slab_pool_t *>(shm_zone->shm.addr);
    zone->mem.pool = pool;

    if (old != nullptr) {
        // Reload with the same name and size: nginx kept the memory, the
        // entries survive as in lua-nginx-module.
        zone->store.attach(old->store.header());
    } else if (shm_zone->shm.exists) {
        zone->store.attach(static_cast<Header *>(pool->data));
    } else {
        // Running out of zone memory is an ordinary "no memory" result,
        // not something for nginx to log at [crit].
        pool->log_nomem = 0;
        size_t len = sizeof(" in lua_shared_dict zone \"\"") + zone->name.len;
        pool->log_ctx = static_cast<u_char *>(ngx_slab_alloc(pool, len));
        if (pool->log_ctx != nullptr) {
            ngx_sprintf(pool->log_ctx, " in lua_shared_dict zone \"%V\"%Z",
                        &zone->name);
        }
        Header *h = Store::create(&zone->mem, shm_zone->shm.size);
        if (h == nullptr) {
            ngx_log_error(NGX_LOG_EMERG, shm_zone->shm.log, 0,
                          "lua_shared_dict \"%V\" is too small",
                          &zone->name);
            return NGX_ERROR;
        }
        pool->data = h;
        zone->store.attach(h);
    }
    pool->log_nomem = 0;
    zone->ready = true;

    Zones *zs = zones(zone->mcf);
    zs->initialized++;
    if (zs->initialized == zs->list.nelts && zs->run_init) {
        // init_by_lua was waiting for every dictionary.
        zs->run_init = false;
        MainConf *mcf = zone->mcf;
        if (mcf->vm && mcf->init
            && glue::runInit(mcf, shm_zone->shm.log) != NGX_OK)
        {
            return NGX_ERROR;
        }
    }
    return NGX_OK;
}

}  // namespace

char *sharedDictDirective(ngx_conf_t *cf, ngx_command_t *, void *conf)
{
    auto *mcf = static_cast<MainConf *>(conf);
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    ngx_str_t name = args[1];

    if (mcf->shdict == nullptr) {
        auto *zs = static_cast<Zones *>(ngx_pcalloc(cf->pool, sizeof(Zones)));
        if (zs == nullptr
            || ngx_array_init(&zs->list, cf->pool, 4, sizeof(Zone *))
                   != NGX_OK)
        {
            return static_cast<char *>(NGX_CONF_ERROR);
        }
        mcf->shdict = zs;
    }

    if (name.len == 0) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid lua shared dict name \"%V\"", &name);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    ssize_t size = ngx_parse_size(&args[2]);
    if (size == NGX_ERROR || size <= 8191) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "invalid lua shared dict size \"%V\"", &args[2]);
        return static_cast<char *>(NGX_CONF_ERROR);
    }

    Zones *zs = zones(mcf);
    auto **elts = static_cast<Zone **>(zs->list.elts);
    for (ngx_uint_t i = 0; i < zs->list.nelts; i++) {
        if (elts[i]->name.len == name.len
            && ngx_strncmp(elts[i]->name.data, name.data, name.len) == 0)
        {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "lua_shared_dict \"%V\" is already defined",
                               &name);
            return static_cast<char *>(NGX_CONF_ERROR);
        }
    }

    void *mem = ngx_pcalloc(cf->pool, sizeof(Zone));
    if (mem == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    // The pool never runs destructors: Zone holds nothing that needs one.
    auto *zone = new (mem) Zone();
    zone->name = name;
    zone->mcf = mcf;

    ngx_shm_zone_t *shm_zone = ngx_shared_memory_add(
        cf, &name, static_cast<size_t>(size), &ngx_http_luaguard_module);
    if (shm_zone == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    if (shm_zone->data) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                           "lua_shared_dict \"%V\" is already defined",
                           &name);
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    shm_zone->init = initZone;
    shm_zone->data = zone;
    // Zones are shared across reloads only when the size is unchanged;
    // nginx handles that by name, size and tag.
    shm_zone->noreuse = 0;
    zone->shm_zone = shm_zone;

    auto **slot = static_cast<Zone **>(ngx_array_push(&zs->list));
    if (slot == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    *slot = zone;
    return NGX_CONF_OK;
}

bool deferInit(MainConf *mcf)
{
    Zones *zs = zones(mcf);
    if (zs == nullptr || zs->list.nelts == 0) {
        return false;
    }
    zs->run_init = true;
    return true;
}

}  // namespace luaguard::shdict
