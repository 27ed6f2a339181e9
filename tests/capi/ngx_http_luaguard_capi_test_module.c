/* A module of another author that uses the C API of ngx_http_lua_api.h
 * (tests/e2e/test_capi.py loads it after luaguard): a Lua module
 * "capi_test" through package preload, and a shared memory zone of its
 * own holding a counter every worker increments. */
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <lauxlib.h>
#include <lua.h>

#include "ngx/ngx_http_lua_api.h"

static ngx_int_t capi_postconfiguration(ngx_conf_t *cf);

static ngx_http_module_t capi_ctx = {
    NULL, capi_postconfiguration, NULL, NULL, NULL, NULL, NULL, NULL
};

ngx_module_t ngx_http_luaguard_capi_test_module = {
    NGX_MODULE_V1,
    &capi_ctx,
    NULL,
    NGX_HTTP_MODULE,
    NULL, NULL, NULL, NULL, NULL, NULL, NULL,
    NGX_MODULE_V1_PADDING
};

static ngx_shm_zone_t *capi_zone;
static int capi_had_state;

static ngx_int_t
capi_init_zone(ngx_shm_zone_t *zone, void *data)
{
    ngx_slab_pool_t *shpool;

    if (data) {                 /* reload: the counter lives on */
        zone->data = data;
        return NGX_OK;
    }
    shpool = (ngx_slab_pool_t *) zone->shm.addr;
    zone->data = ngx_slab_calloc(shpool, sizeof(ngx_atomic_t));
    return zone->data ? NGX_OK : NGX_ERROR;
}

/* capi_test.incr(): the shared counter, incremented */
static int
capi_incr(lua_State *L)
{
    ngx_atomic_t *n = capi_zone->data;

    lua_pushnumber(L, (lua_Number) ngx_atomic_fetch_add(n, 1) + 1);
    return 1;
}

/* capi_test.uri(): the running request's URI, or nil */
static int
capi_uri(lua_State *L)
{
    ngx_http_request_t *r = ngx_http_lua_get_request(L);

    if (r == NULL) {
        lua_pushnil(L);
    } else {
        lua_pushlstring(L, (char *) r->uri.data, r->uri.len);
    }
    return 1;
}

/* capi_test.dict_get(dict, key): type name and value, or nil and why */
static int
capi_dict_get(lua_State *L)
{
    size_t dlen, klen;
    const char *dict = luaL_checklstring(L, 1, &dlen);
    const char *key = luaL_checklstring(L, 2, &klen);
    u_char buf[8];
    ngx_http_lua_value_t v;
    ngx_shm_zone_t *zone;
    ngx_int_t rc;

    zone = ngx_http_lua_find_zone((u_char *) dict, dlen);
    if (zone == NULL) {
        lua_pushnil(L);
        lua_pushliteral(L, "no zone");
        return 2;
    }
    v.value.s.data = buf;
    v.value.s.len = sizeof(buf);
    rc = ngx_http_lua_shared_dict_get(zone, (u_char *) key, klen, &v);
    if (rc == NGX_DECLINED) {
        lua_pushnil(L);
        lua_pushliteral(L, "declined");
        return 2;
    }
    if (rc != NGX_OK) {
        lua_pushnil(L);
        lua_pushliteral(L, "error");
        return 2;
    }
    switch (v.type) {
    case LUA_TBOOLEAN:
        lua_pushliteral(L, "boolean");
        lua_pushboolean(L, v.value.b);
        break;
    case LUA_TNUMBER:
        lua_pushliteral(L, "number");
        lua_pushnumber(L, v.value.n);
        break;
    default:
        lua_pushliteral(L, "string");
        lua_pushlstring(L, (char *) v.value.s.data, v.value.s.len);
    }
    return 2;
}

static int
capi_had_global_state(lua_State *L)
{
    lua_pushboolean(L, capi_had_state);
    return 1;
}

static int
luaopen_capi_test(lua_State *L)
{
    lua_createtable(L, 0, 4);
    lua_pushcfunction(L, capi_incr);
    lua_setfield(L, -2, "incr");
    lua_pushcfunction(L, capi_uri);
    lua_setfield(L, -2, "uri");
    lua_pushcfunction(L, capi_dict_get);
    lua_setfield(L, -2, "dict_get");
    lua_pushcfunction(L, capi_had_global_state);
    lua_setfield(L, -2, "had_global_state");
    return 1;
}

static ngx_int_t
capi_postconfiguration(ngx_conf_t *cf)
{
    ngx_str_t name = ngx_string("capi_test_zone");
    lua_State *L;

    L = ngx_http_lua_get_global_state(cf);
    capi_had_state = L != NULL && lua_gettop(L) >= 0;
    if (ngx_http_lua_add_package_preload(cf, "capi_test", luaopen_capi_test)
        != NGX_OK)
    {
        return NGX_ERROR;
    }
    capi_zone = ngx_http_lua_shared_memory_add(cf, &name, 64 * 1024,
                                               &ngx_http_luaguard_capi_test_module);
    if (capi_zone == NULL) {
        return NGX_ERROR;
    }
    capi_zone->init = capi_init_zone;
    return NGX_OK;
}

ngx_module_t *ngx_modules[] = {
    &ngx_http_luaguard_capi_test_module,
    NULL
};

char *ngx_module_names[] = {
    "ngx_http_luaguard_capi_test_module",
    NULL
};

char *ngx_module_order[] = {
    NULL
};
