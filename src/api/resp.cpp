// ngx.resp.get_headers: the response headers as a table (the C function;
// lua/req_ffi.lua's fast path calls luaguard_resp_get_headers).

#include <cstring>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "api/util.hpp"
#include "ngx/glue.hpp"
#include "runtime/embedded.hpp"

namespace luaguard::api {

namespace {

const char kHeadersMeta[] = "luaguard.req_headers_mt";

// Calls f(key, klen, value, vlen) for every response header until f
// returns false; `num` holds the content length's digits meanwhile.
template <typename F>
void eachRespHeader(ngx_http_request_t *r, char (&num)[NGX_OFF_T_LEN], F f)
{
    // What nginx's header filter will write (or wrote) from fields kept
    // outside the list, named in lower case even in raw mode, as
    // lua-nginx-module does.
    ngx_http_headers_out_t &out = r->headers_out;
    if (out.content_type.len
        && !f("content-type", 12,
              reinterpret_cast<char *>(out.content_type.data),
              out.content_type.len))
    {
        return;
    }
    if (out.content_length == nullptr && out.content_length_n >= 0) {
        auto *end = ngx_sprintf(reinterpret_cast<u_char *>(num), "%O",
                                out.content_length_n);
        if (!f("content-length", 14, num,
               static_cast<size_t>(reinterpret_cast<char *>(end) - num)))
        {
            return;
        }
    }
    const char *conn = r->keepalive ? "keep-alive" : "close";
    if (!f("connection", 10, conn, std::strlen(conn))) {
        return;
    }
    if (r->header_sent && r->chunked
        && !f("transfer-encoding", 17, "chunked", 7))
    {
        return;
    }
    glue::forEachHeader(&out.headers, [&](ngx_table_elt_t &h) {
        return h.hash == 0
               || f(reinterpret_cast<char *>(h.key.data), h.key.len,
                    h.value.data ? reinterpret_cast<char *>(h.value.data)
                                 : "",
                    h.value.len);
    });
}

// Entries eachRespHeader gives at most: the list and 4 fields.
size_t respHeaderCount(ngx_http_request_t *r)
{
    size_t n = 4;
    for (ngx_list_part_t *part = &r->headers_out.headers.part; part;
         part = part->next)
    {
        n += part->nelts;
    }
    return n;
}

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
    size_t n = respHeaderCount(r);
    MultiTable t(L, max && n > static_cast<size_t>(max)
                        ? static_cast<size_t>(max) : n);
    lua_Integer count = 0;
    bool truncated = false;
    char num[NGX_OFF_T_LEN];
    eachRespHeader(r, num, [&](const char *k, size_t klen, const char *v,
                               size_t vlen) {
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
    });
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

bool openResp(lua_State *L, std::string *err)
{
    subTable(L, "resp");
    const luaL_Reg fns[] = {{"get_headers", getHeaders}, {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);

    // The FFI versions of ngx.req's and ngx.resp's tables replace the C
    // functions, which stay as their fallbacks for what the fast path
    // hands back; failing to load them is a start-up error.
    int ngx = lua_gettop(L);
    lua_pushstring(L, kReqCdef);
    lua_getfield(L, ngx, "req");
    lua_getfield(L, ngx, "resp");
    luaL_getmetatable(L, kHeadersMeta);
    return runEmbedded(L, kLua_req_ffi, kLua_req_ffi_len, "=luaguard.req", 4,
                       0, err);
}

}  // namespace luaguard::api

int luaguard_resp_get_headers(luaguard_kv_list_t *l, int max, int raw)
{
    using namespace luaguard;
    ngx_http_request_t *r = api::ffiRequest(max);
    if (r == nullptr) {
        return -1;
    }
    size_t n = api::respHeaderCount(r);
    size_t want = max && n > static_cast<size_t>(max)
                      ? static_cast<size_t>(max) : n;
    // The content length's digits and the names lower-cased.
    size_t room = NGX_OFF_T_LEN;
    if (!raw) {
        glue::forEachHeader(&r->headers_out.headers,
                            [&](ngx_table_elt_t &h) { room += h.key.len; });
    }
    if (!api::kvRoom(l, want, room)) {
        return -2;
    }
    char num[NGX_OFF_T_LEN];
    char *buf = l->buf;
    size_t count = 0;
    l->truncated = 0;
    api::eachRespHeader(r, num, [&](const char *k, size_t klen,
                                    const char *v, size_t vlen) {
        if (count == want) {
            l->truncated = 1;
            return false;
        }
        luaguard_kv_t &e = l->kv[count++];
        e.key = k;
        e.klen = klen;
        e.value = v;
        e.vlen = vlen;
        if (v == num) {
            ngx_memcpy(buf, num, vlen);
            e.value = buf;
            buf += vlen;
        }
        if (!raw) {
            size_t i = 0;
            while (i < klen && !(k[i] >= 'A' && k[i] <= 'Z')) {
                i++;
            }
            if (i < klen) {
                ngx_strlow(reinterpret_cast<u_char *>(buf),
                           reinterpret_cast<u_char *>(const_cast<char *>(k)),
                           klen);
                e.key = buf;
                buf += klen;
            }
        }
        return true;
    });
    return static_cast<int>(count);
}
