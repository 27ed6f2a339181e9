/* The C API luaguard offers other nginx modules: the names and signatures
 * of lua-nginx-module's public header of the same name (0.10.23), so a
 * module written against it builds and loads unchanged with luaguard
 * (load luaguard's module before it). Implemented in src/ngx/capi.cpp;
 * what differs is in docs/compatibility.md ("C API"). */
#ifndef LUAGUARD_NGX_HTTP_LUA_API_H
#define LUAGUARD_NGX_HTTP_LUA_API_H

#include <nginx.h>
#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_http.h>

#include <lua.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ngx_http_lua_version  10023

/* A lua_shared_dict value read from C; `type` is Lua's type tag
 * (LUA_TBOOLEAN, LUA_TNUMBER, LUA_TSTRING). For a string, the caller
 * supplies the buffer in value.s (data, capacity in len); the bytes that
 * fit are copied and len set to their number. */
typedef struct {
    uint8_t         type;

    union {
        int         b;
        lua_Number  n;
        ngx_str_t   s;
    } value;

} ngx_http_lua_value_t;

typedef struct {
    int          len;
    u_char      *data;
} ngx_http_lua_ffi_str_t;

/* The default VM's main state (created if no Lua directive made it yet). */
lua_State *ngx_http_lua_get_global_state(ngx_conf_t *cf);

/* The request whose Lua is running, or NULL. */
ngx_http_request_t *ngx_http_lua_get_request(lua_State *L);

/* package.preload[package] = func in every VM of the configuration. */
ngx_int_t ngx_http_lua_add_package_preload(ngx_conf_t *cf,
    const char *package, lua_CFunction func);

/* NGX_OK with *value, NGX_DECLINED when the key is missing or expired,
 * NGX_ERROR for a zone that is not a lua_shared_dict, a list value or a
 * string without a buffer. */
ngx_int_t ngx_http_lua_shared_dict_get(ngx_shm_zone_t *shm_zone,
    u_char *key_data, size_t key_len, ngx_http_lua_value_t *value);

/* The lua_shared_dict zone of that name, or NULL. */
ngx_shm_zone_t *ngx_http_lua_find_zone(u_char *name_data, size_t name_len);

/* A shared memory zone of the caller's own (set its init and data on the
 * zone returned), as ngx_shared_memory_add; NULL on error. */
ngx_shm_zone_t *ngx_http_lua_shared_memory_add(ngx_conf_t *cf,
    ngx_str_t *name, size_t size, void *tag);

#ifdef __cplusplus
}
#endif

#endif
