// ngx.resp.get_headers: the response headers as a table.

#include <cstring>

#include "api/api.hpp"
#include "api/util.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {

namespace {

const char kHeadersMeta[] = "luaguard.req_headers_mt";

int getHeaders(lua_State *L)
{
    glue::checkPhase(L, kRequest);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_t *r = ctx->r;
    lua_Integer max = 100;
    if (!lua_isnoneornil(L, 1)) {
        max = luaL_checkinteger(L, 1);
        if (max < 0) {
            max = 0;
        }
    }
    bool raw = lua_toboolean(L, 2);
    ngx_http_headers_out_t &out = r->headers_out;
    size_t n = 4;
    for (ngx_list_part_t *part = &out.headers.part; part; part = part->next) {
        n += part->nelts;
    }
    MultiTable t(L, max && n > static_cast<size_t>(max)
                        ? static_cast<size_t>(max) : n);
    lua_Integer count = 0;
    bool truncated = false;

    auto add = [&](const char *k, size_t klen, const char *v, size_t vlen) {
        if (max && count == max) {
            truncated = true;
            return false;
        }
        count++;
        if (raw) {
            lua_pushlstring(L, k, klen);
        } else {
            pushLower(L, k, klen);
        }
        lua_pushlstring(L, v, vlen);
        t.add();
        return true;
    };

    // What nginx's header filter will write (or wrote) from fields kept
    // outside the list, named in lower case even in raw mode, as
    // lua-nginx-module does.
    bool go = true;
    if (out.content_type.len) {
        go = add("content-type", 12,
                 reinterpret_cast<char *>(out.content_type.data),
                 out.content_type.len);
    }
    if (go && out.content_length == nullptr && out.content_length_n >= 0) {
        char num[NGX_OFF_T_LEN];
        auto *end = ngx_sprintf(reinterpret_cast<u_char *>(num), "%O",
                                out.content_length_n);
        go = add("content-length", 14, num,
                 static_cast<size_t>(reinterpret_cast<char *>(end) - num));
    }
    if (go) {
        const char *conn = r->keepalive ? "keep-alive" : "close";
        go = add("connection", 10, conn, std::strlen(conn));
    }
    if (go && r->header_sent && r->chunked) {
        go = add("transfer-encoding", 17, "chunked", 7);
    }
    for (ngx_list_part_t *part = &out.headers.part; go && part;
         part = part->next)
    {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; i++) {
            if (h[i].hash == 0) {
                continue;
            }
            if (!add(reinterpret_cast<char *>(h[i].key.data), h[i].key.len,
                     reinterpret_cast<char *>(h[i].value.data),
                     h[i].value.len))
            {
                go = false;
                break;
            }
        }
    }
    if (!raw) {
        luaL_getmetatable(L, kHeadersMeta);
        lua_setmetatable(L, t.index());
    }
    if (truncated) {
        lua_pushliteral(L, "truncated");
        return 2;
    }
    return 1;
}

}  // namespace

void openResp(lua_State *L)
{
    subTable(L, "resp");
    const luaL_Reg fns[] = {{"get_headers", getHeaders}, {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
}

}  // namespace luaguard::api
