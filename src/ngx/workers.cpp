// ngx.worker.pids(): each worker writes its pid into its slot (by worker
// id) of a small shared zone when it starts; the zone is kept across
// reloads, and a respawned worker takes over its predecessor's slot.

#include <type_traits>

#include "api/api.hpp"
#include "ngx/glue.hpp"

namespace luaguard {

namespace {

constexpr ngx_uint_t kSlots = NGX_MAX_PROCESSES;

struct WorkerPids {
    ngx_pid_t pid[kSlots];
};
static_assert(std::is_trivially_copyable_v<WorkerPids>,
              "lives in shared memory");

ngx_shm_zone_t *g_zone = nullptr;

ngx_int_t initZone(ngx_shm_zone_t *zone, void *data)
{
    if (data) {
        zone->data = data;  // reload: the running workers' slots stay
        return NGX_OK;
    }
    auto *shpool = reinterpret_cast<ngx_slab_pool_t *>(zone->shm.addr);
    auto *pids = static_cast<WorkerPids *>(
        ngx_slab_calloc(shpool, sizeof(WorkerPids)));
    if (pids == nullptr) {
        return NGX_ERROR;
    }
    zone->data = pids;
    return NGX_OK;
}

int workerPids(lua_State *L)
{
    if (ngx_process != NGX_PROCESS_WORKER
        && ngx_process != NGX_PROCESS_SINGLE)
    {
        return luaL_error(L, "API disabled in the current context");
    }
    auto *ccf = reinterpret_cast<ngx_core_conf_t *>(
        ngx_get_conf(ngx_cycle->conf_ctx, ngx_core_module));
    ngx_uint_t n = ngx_process == NGX_PROCESS_SINGLE
                       ? 1 : static_cast<ngx_uint_t>(ccf->worker_processes);
    lua_createtable(L, static_cast<int>(n), 0);
    if (ngx_process == NGX_PROCESS_SINGLE || g_zone == nullptr
        || g_zone->data == nullptr)
    {
        lua_pushinteger(L, static_cast<lua_Integer>(ngx_pid));
        lua_rawseti(L, -2, 1);
        return 1;
    }
    auto *pids = static_cast<WorkerPids *>(g_zone->data);
    int idx = 1;
    for (ngx_uint_t i = 0; i < n && i < kSlots; i++) {
        if (pids->pid[i] > 0) {
            lua_pushinteger(L, static_cast<lua_Integer>(pids->pid[i]));
            lua_rawseti(L, -2, idx++);
        }
    }
    return 1;
}

}  // namespace

namespace glue {

ngx_int_t addWorkersZone(ngx_conf_t *cf)
{
    static ngx_str_t name = ngx_string("luaguard_workers");
    g_zone = ngx_shared_memory_add(cf, &name, 8 * ngx_pagesize,
                                   &ngx_http_luaguard_module);
    if (g_zone == nullptr) {
        return NGX_ERROR;
    }
    g_zone->init = initZone;
    g_zone->noreuse = 0;
    return NGX_OK;
}

void registerWorker()
{
    if (g_zone == nullptr || g_zone->data == nullptr || ngx_worker >= kSlots) {
        return;
    }
    static_cast<WorkerPids *>(g_zone->data)->pid[ngx_worker] = ngx_pid;
}

}  // namespace glue

namespace api {

void openWorkerPids(lua_State *L)
{
    subTable(L, "worker");
    lua_pushcfunction(L, workerPids);
    lua_setfield(L, -2, "pids");
    lua_pop(L, 1);
}

}  // namespace api
}  // namespace luaguard
