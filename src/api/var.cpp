// ngx.var: nginx variables by name, regex captures by number.

#include <cstring>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {

namespace {

constexpr PhaseMask kVarPhases = kRequest;

// Names up to this long are lower-cased on the stack.
constexpr size_t kShortName = 64;

// Lower-cases `name` into `buf` (nginx's variable names are lower case)
// and returns its hash key.
ngx_uint_t lowerKey(const char *name, size_t len, u_char *buf)
{
    return ngx_hash_strlow(buf, reinterpret_cast<u_char *>(
                                    const_cast<char *>(name)), len);
}

// The request's value of variable `name` (lower-cased into `low`, room
// for `len` bytes), nullptr when it has none.
ngx_http_variable_value_t *findVariable(ngx_http_request_t *r,
                                        const char *name, size_t len,
                                        u_char *low)
{
    ngx_str_t key{len, low};
    ngx_http_variable_value_t *vv =
        ngx_http_get_variable(r, &key, lowerKey(name, len, low));
    return vv == nullptr || vv->not_found ? nullptr : vv;
}

int varIndex(lua_State *L)
{
    Run *run = requestPhase(L, kVarPhases);
    ngx_http_request_t *r = run->ctx->r;

    if (lua_type(L, 2) == LUA_TNUMBER) {
        auto n = static_cast<ngx_int_t>(lua_tointeger(L, 2));
        // ngx.var[0] is not the whole match in lua-nginx-module: nil.
        if (n < 1 || r->captures == nullptr
            || static_cast<ngx_uint_t>(n * 2) >= r->ncaptures)
        {
            lua_pushnil(L);
            return 1;
        }
        int *cap = r->captures;
        ngx_int_t from = cap[n * 2], to = cap[n * 2 + 1];
        if (from < 0 || to < 0) {
            lua_pushnil(L);
            return 1;
        }
        lua_pushlstring(L, reinterpret_cast<char *>(r->captures_data + from),
                        to - from);
        return 1;
    }

    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    u_char stackbuf[kShortName];
    u_char *low = len <= sizeof(stackbuf)
                      ? stackbuf
                      : static_cast<u_char *>(ngx_pnalloc(r->pool, len));
    if (low == nullptr) {
        return luaL_error(L, "no memory");
    }
    ngx_http_variable_value_t *vv = findVariable(r, name, len, low);
    if (vv == nullptr) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushlstring(L, reinterpret_cast<char *>(vv->data), vv->len);
    return 1;
}

int varNewIndex(lua_State *L)
{
    Run *run = requestPhase(L, kVarPhases);
    ngx_http_request_t *r = run->ctx->r;
    size_t len;
    const char *name = luaL_checklstring(L, 2, &len);
    // Every write copies into the request's pool until the request ends.
    size_t vlen = 0;
    if (lua_type(L, 3) == LUA_TSTRING || lua_type(L, 3) == LUA_TNUMBER) {
        lua_tolstring(L, 3, &vlen);
    }
    chargeMemory(L, len + sizeof(ngx_http_variable_value_t) + vlen,
                 "ngx.var");

    auto *low = static_cast<u_char *>(ngx_pnalloc(r->pool, len));
    if (low == nullptr) {
        return luaL_error(L, "no memory");
    }
    ngx_uint_t hash = lowerKey(name, len, low);
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_get_module_main_conf(r, ngx_http_core_module));
    auto *v = static_cast<ngx_http_variable_t *>(
        ngx_hash_find(&cmcf->variables_hash, hash, low, len));

    if (v == nullptr) {
        return luaL_error(L, "variable \"%s\" not found for writing; maybe "
                          "it is a built-in variable that is not changeable "
                          "or you forgot to use \"set $%s '';\" in the config "
                          "file to define it first", name, name);
    }
    if (!(v->flags & NGX_HTTP_VAR_CHANGEABLE)) {
        return luaL_error(L, "variable \"%s\" not changeable", name);
    }

    auto *vv = static_cast<ngx_http_variable_value_t *>(
        ngx_pcalloc(r->pool, sizeof(ngx_http_variable_value_t)));
    if (vv == nullptr) {
        return luaL_error(L, "no memory");
    }
    switch (lua_type(L, 3)) {
    case LUA_TNIL:
        vv->not_found = 1;
        break;
    case LUA_TSTRING:
    case LUA_TNUMBER: {
        size_t vlen;
        const char *val = lua_tolstring(L, 3, &vlen);
        // add_header and proxy_set_header may send it, $args goes into a
        // request line: escaped on the way in (glue::copyVariableValue).
        ngx_str_t data;
        if (!glue::copyVariableValue(r->pool, name, len, val, vlen, &data)) {
            return luaL_error(L, "no memory");
        }
        vv->data = data.data;
        vv->len = data.len;
        vv->valid = 1;
        break;
    }
    default:
        return luaL_error(L, "bad variable value type: %s",
                          luaL_typename(L, 3));
    }

    if (v->set_handler) {
        v->set_handler(r, vv, v->data);
        return 0;
    }
    if (v->flags & NGX_HTTP_VAR_INDEXED) {
        r->variables[v->index] = *vv;
        return 0;
    }
    return luaL_error(L, "variable \"%s\" cannot be assigned a value", name);
}

}  // namespace

void openVar(lua_State *L)
{
    lua_newtable(L);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, varIndex);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, varNewIndex);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "var");
}

}  // namespace luaguard::api

int luaguard_var_get(const void *vm, const char *name, size_t len,
                     luaguard_var_value_t *out)
{
    using namespace luaguard;
    Run *run = g_run;
    // Names past the stack buffer, and anything varIndex would refuse or
    // treat specially, go to it.
    u_char low[api::kShortName];
    if (run == nullptr || run->ctx == nullptr
        || !(mask(run->phase) & api::kVarPhases)
        || run->ctx->vm->cells() != vm || len > sizeof(low))
    {
        return -1;
    }
    ngx_http_variable_value_t *vv =
        api::findVariable(run->ctx->r, name, len, low);
    if (vv == nullptr) {
        return 0;
    }
    out->data = vv->len ? reinterpret_cast<const char *>(vv->data) : "";
    out->len = vv->len;
    return 1;
}
