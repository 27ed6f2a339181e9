// The C API other nginx modules link against (ngx_http_lua_api.h, the
// names and signatures of lua-nginx-module's public header): exported
// with C linkage and default visibility from a module otherwise built
// with hidden symbols. nginx loads modules RTLD_GLOBAL, so a module
// loaded after luaguard resolves them.

#include "ngx/capi.hpp"

#include <cstring>

#include "ngx/ngx_http_lua_api.h"
#include "ngx/entry.hpp"
#include "runtime/vm.hpp"
#include "shdict/zone.hpp"

#define LG_EXPORT extern "C" __attribute__((visibility("default")))

namespace luaguard {

Vm *defaultVm(ngx_conf_t *cf);
bool vmsSetUp(MainConf *mcf);

namespace capi {

struct Preload {
    const char     *name;
    lua_CFunction   open;
};

namespace {

void setPreload(lua_State *L, const Preload &p)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, p.open);
    lua_setfield(L, -2, p.name);
    lua_pop(L, 2);
}

MainConf *confOf(ngx_conf_t *cf)
{
    return static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
}

}  // namespace

void applyPreloads(MainConf *mcf, lua_State *L)
{
    if (mcf->preloads == nullptr) {
        return;
    }
    auto *p = static_cast<Preload *>(mcf->preloads->elts);
    for (ngx_uint_t i = 0; i < mcf->preloads->nelts; i++) {
        setPreload(L, p[i]);
    }
}

}  // namespace capi
}  // namespace luaguard

using namespace luaguard;

LG_EXPORT lua_State *ngx_http_lua_get_global_state(ngx_conf_t *cf)
{
    Vm *vm = defaultVm(cf);
    return vm ? vm->L() : nullptr;
}

LG_EXPORT ngx_http_request_t *ngx_http_lua_get_request(lua_State *)
{
    Run *run = g_run;
    return run != nullptr && run->ctx != nullptr && !run->ctx->is_timer
               ? run->ctx->r : nullptr;
}

LG_EXPORT ngx_int_t ngx_http_lua_add_package_preload(ngx_conf_t *cf,
                                                     const char *package,
                                                     lua_CFunction func)
{
    MainConf *mcf = capi::confOf(cf);
    if (mcf->preloads == nullptr) {
        mcf->preloads = ngx_array_create(cf->pool, 4, sizeof(capi::Preload));
        if (mcf->preloads == nullptr) {
            return NGX_ERROR;
        }
    }
    auto *p = static_cast<capi::Preload *>(ngx_array_push(mcf->preloads));
    if (p == nullptr) {
        return NGX_ERROR;
    }
    size_t len = std::strlen(package);
    auto *name = static_cast<char *>(ngx_pnalloc(cf->pool, len + 1));
    if (name == nullptr) {
        return NGX_ERROR;
    }
    std::memcpy(name, package, len + 1);
    *p = capi::Preload{name, func};
    // VMs already set up (the caller's postconfiguration runs after
    // luaguard's) get it now; the others when they are set up.
    if (vmsSetUp(mcf)) {
        if (mcf->vm != nullptr) {
            capi::setPreload(mcf->vm->L(), *p);
        }
        if (mcf->vms != nullptr) {
            auto **slots = static_cast<VmSlot **>(mcf->vms->elts);
            for (ngx_uint_t i = 0; i < mcf->vms->nelts; i++) {
                if (slots[i]->vm != nullptr) {
                    capi::setPreload(slots[i]->vm->L(), *p);
                }
            }
        }
    }
    return NGX_OK;
}

LG_EXPORT ngx_shm_zone_t *ngx_http_lua_find_zone(u_char *name_data,
                                                 size_t name_len)
{
    MainConf *mcf = mainConf();
    shdict::Zones *zs = mcf != nullptr ? shdict::zones(mcf) : nullptr;
    if (zs == nullptr) {
        return nullptr;
    }
    auto **z = static_cast<shdict::Zone **>(zs->list.elts);
    for (ngx_uint_t i = 0; i < zs->list.nelts; i++) {
        if (z[i]->name.len == name_len
            && ngx_strncmp(z[i]->name.data, name_data, name_len) == 0)
        {
            return z[i]->shm_zone;
        }
    }
    return nullptr;
}

LG_EXPORT ngx_int_t ngx_http_lua_shared_dict_get(ngx_shm_zone_t *shm_zone,
                                                 u_char *key_data,
                                                 size_t key_len,
                                                 ngx_http_lua_value_t *value)
{
    if (shm_zone == nullptr || shm_zone->tag != &ngx_http_luaguard_module
        || key_len == 0 || key_len > shdict::kMaxKeyLen)
    {
        return NGX_ERROR;
    }
    auto *zone = static_cast<shdict::Zone *>(shm_zone->data);
    if (zone == nullptr || !zone->ready) {
        return NGX_ERROR;
    }
    // Strings are copied here under the zone's lock, then into the
    // caller's buffer.
    static shdict::Buffer buf;
    shdict::Value v;
    int32_t flags = 0;
    bool stale = false;
    buf.clear();
    shdict::Status st = zone->store.get(reinterpret_cast<char *>(key_data),
                                        key_len, shdict::nowMs(), false, &v,
                                        &flags, &stale, &buf);
    if (st == shdict::Status::NotFound) {
        return NGX_DECLINED;
    }
    if (st != shdict::Status::Ok) {
        return NGX_ERROR;       // a list, or no memory for the copy
    }
    switch (v.type) {
    case shdict::VType::Boolean:
        value->type = LUA_TBOOLEAN;
        value->value.b = v.boolean;
        return NGX_OK;
    case shdict::VType::Number:
        value->type = LUA_TNUMBER;
        value->value.n = v.number;
        return NGX_OK;
    case shdict::VType::String: {
        if (value->value.s.data == nullptr || value->value.s.len == 0) {
            return NGX_ERROR;   // no buffer given
        }
        size_t n = v.len < value->value.s.len ? v.len : value->value.s.len;
        ngx_memcpy(value->value.s.data, v.str, n);
        value->value.s.len = n;
        value->type = LUA_TSTRING;
        return NGX_OK;
    }
    default:
        return NGX_ERROR;       // a list
    }
}

LG_EXPORT ngx_shm_zone_t *ngx_http_lua_shared_memory_add(ngx_conf_t *cf,
                                                         ngx_str_t *name,
                                                         size_t size,
                                                         void *tag)
{
    // nginx's own zone: the caller sets init and data on it, and nginx
    // maps, reuses across reloads and initialises it as any other.
    // A name declared before with the same tag is that zone (size 0:
    // a lookup); another tag's is refused by nginx with its message.
    return ngx_shared_memory_add(cf, name, size, tag);
}
