// ndk.set_var.DIRECTIVE(value): calls the filter of a directive that
// another module (set-misc, ...) registers through ngx_devel_kit's
// ndk_set_var_value, as lua-nginx-module does.
//
// luaguard does not need ngx_devel_kit; when it is loaded (load_module
// ndk_http_module.so before the modules using it), its symbol
// ndk_set_var_value is found at run time and the directives whose setter
// it is are callable. The structures below are ngx_devel_kit's ABI
// (ndk_set_var.h, stable since 2010).

#include <dlfcn.h>

#include <cstring>
#include <string>

#include "api/api.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {

namespace {

struct NdkFilter {
    ngx_uint_t  type;
    void       *func;
    size_t      size;
    void       *data;
};

enum : ngx_uint_t {
    kBasic = 0,
    kData,
    kValue,
    kValueData,
    kMultiValue,
    kMultiValueData,
    kHash
};

using BasicFn = ngx_int_t (*)(ngx_http_request_t *, ngx_str_t *);
using DataFn = ngx_int_t (*)(ngx_http_request_t *, ngx_str_t *, void *);
using ValueFn = ngx_int_t (*)(ngx_http_request_t *, ngx_str_t *,
                              ngx_http_variable_value_t *);
using ValueDataFn = ngx_int_t (*)(ngx_http_request_t *, ngx_str_t *,
                                  ngx_http_variable_value_t *, void *);
using HashFn = void (*)(u_char *, char *, size_t);

// ndk_set_var_value, or null: ngx_devel_kit is not loaded.
void *ndkSetter()
{
    return dlsym(RTLD_DEFAULT, "ndk_set_var_value");
}

// ndk_find(name): the directive's command (a light userdata), or nil.
int find(lua_State *L)
{
    size_t len;
    const char *name = luaL_checklstring(L, 1, &len);
    void *setter = ndkSetter();
    ngx_cycle_t *cycle = const_cast<ngx_cycle_t *>(ngx_cycle);
    if (setter == nullptr || cycle == nullptr || cycle->modules == nullptr) {
        lua_pushnil(L);
        return 1;
    }
    for (ngx_uint_t i = 0; cycle->modules[i] != nullptr; i++) {
        ngx_module_t *m = cycle->modules[i];
        if (m->type != NGX_HTTP_MODULE || m->commands == nullptr) {
            continue;
        }
        for (ngx_command_t *cmd = m->commands; cmd->name.len; cmd++) {
            if (cmd->name.len == len
                && std::memcmp(cmd->name.data, name, len) == 0
                && reinterpret_cast<void *>(cmd->set) == setter
                && cmd->post != nullptr)
            {
                lua_pushlightuserdata(L, cmd);
                return 1;
            }
        }
    }
    lua_pushnil(L);
    return 1;
}

// Runs the filter for `r`; false when it fails.
bool runFilter(ngx_http_request_t *r, const NdkFilter *f, ngx_str_t *in,
               ngx_str_t *out, ngx_int_t *rc)
{
    ngx_http_variable_value_t v;
    ngx_memzero(&v, sizeof(v));
    v.data = in->data;
    v.len = in->len;
    v.valid = 1;
    *rc = NGX_OK;
    switch (f->type) {
    case kBasic:
        *rc = reinterpret_cast<BasicFn>(f->func)(r, out);
        break;
    case kData:
        *rc = reinterpret_cast<DataFn>(f->func)(r, out, f->data);
        break;
    case kValue:
    case kMultiValue:
        *rc = reinterpret_cast<ValueFn>(f->func)(r, out, &v);
        break;
    case kValueData:
    case kMultiValueData:
        *rc = reinterpret_cast<ValueDataFn>(f->func)(r, out, &v, f->data);
        break;
    case kHash: {
        auto *p = static_cast<u_char *>(ngx_palloc(r->pool, f->size));
        if (p == nullptr) {
            *rc = NGX_ERROR;
            break;
        }
        reinterpret_cast<HashFn>(f->func)(p, reinterpret_cast<char *>(in->data),
                                          in->len);
        out->data = p;
        out->len = f->size;
        break;
    }
    default:
        *rc = NGX_ERROR;
    }
    return *rc == NGX_OK;
}

// ndk_call(cmd, value): the filter's result for the string `value`.
int call(lua_State *L)
{
    auto *cmd = static_cast<ngx_command_t *>(lua_touserdata(L, 1));
    size_t len;
    const char *value = luaL_checklstring(L, 2, &len);
    if (cmd == nullptr) {
        return luaL_argerror(L, 1, "directive expected");
    }
    const auto *f = static_cast<const NdkFilter *>(cmd->post);

    Run *run = g_run;
    if (run == nullptr || run->phase == Phase::Init) {
        return luaL_error(L, "no request found");
    }
    // Outside a request (init_worker, exit_worker) the filter gets a
    // request of its own: a pool and a connection for its log lines.
    ngx_http_request_t *r = run->ctx != nullptr ? run->ctx->r : nullptr;
    ngx_pool_t *pool = nullptr;
    ngx_http_request_t fake_r;
    ngx_connection_t fake_c;
    if (r == nullptr) {
        pool = ngx_create_pool(4096, currentLog());
        if (pool == nullptr) {
            return luaL_error(L, "no memory");
        }
        ngx_memzero(&fake_r, sizeof(fake_r));
        ngx_memzero(&fake_c, sizeof(fake_c));
        fake_c.log = currentLog();
        fake_c.pool = pool;
        fake_r.pool = pool;
        fake_r.connection = &fake_c;
        r = &fake_r;
    }
    // The filter may keep pointers into its input: a copy in the pool.
    ngx_str_t in{len, static_cast<u_char *>(ngx_pnalloc(r->pool, len + 1))};
    ngx_str_t out = ngx_null_string;
    ngx_int_t rc = NGX_ERROR;
    bool ok = false;
    if (in.data != nullptr) {
        ngx_memcpy(in.data, value, len);
        in.data[len] = '\0';
        ok = runFilter(r, f, &in, &out, &rc);
    }
    if (ok) {
        lua_pushlstring(L, reinterpret_cast<char *>(out.data), out.len);
    }
    if (pool != nullptr) {
        ngx_destroy_pool(pool);
    }
    if (!ok) {
        lua_pushfstring(L, "calling directive %s failed with code %d",
                        reinterpret_cast<const char *>(cmd->name.data),
                        static_cast<int>(rc));
        return lua_error(L);
    }
    return 1;
}

}  // namespace

void addNdkFuncs(lua_State *L)
{
    const luaL_Reg fns[] = {{"ndk_find", find},
                            {"ndk_call", call},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
}

}  // namespace luaguard::api
