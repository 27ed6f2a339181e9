// ngx.header: the response headers, read and written by name.

#include <cstring>
#include <string>
#include <vector>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "runtime/codec.hpp"

namespace luaguard::api {

namespace {

constexpr PhaseMask kReadPhases = mask(Phase::Set, Phase::ServerRewrite,
                                       Phase::Rewrite, Phase::Access,
                                       Phase::Content, Phase::HeaderFilter,
                                       Phase::BodyFilter, Phase::Log,
                                       Phase::Balancer);
// body_filter and log may write too: the headers are gone by then, so the
// write only logs that, as in lua-nginx-module.
constexpr PhaseMask kWritePhases = kReadPhases;

// The header name as nginx will send it: underscores become hyphens
// unless lua_transform_underscores_in_response_headers is off, and every
// byte that is not a token character is percent-encoded (as
// lua-nginx-module does), so a name can carry no ':' and no line end.
// Reads and writes use the same spelling, so they find each other.
std::string headerName(RequestCtx *ctx, const char *key, size_t len)
{
    std::string name(key, len);
    if (ctx->llcf->transform_underscores) {
        for (char &c : name) {
            if (c == '_') {
                c = '-';
            }
        }
    }
    if (codec::headerNameClean(name.data(), name.size()) != name.size()) {
        return codec::escapeHeaderName(name.data(), name.size());
    }
    return name;  // the usual case: nothing to escape, no second copy
}

bool nameIs(const std::string &name, const char *lower, size_t len)
{
    return name.size() == len
           && ngx_strncasecmp(reinterpret_cast<u_char *>(
                                  const_cast<char *>(name.data())),
                              reinterpret_cast<u_char *>(
                                  const_cast<char *>(lower)),
                              len) == 0;
}

template <size_t N>
bool nameIs(const std::string &name, const char (&lower)[N])
{
    return nameIs(name, lower, N - 1);
}

// Copies a value into the pool through the one header sanitizer
// (glue::copyHeaderValue): CR, LF and the other controls percent-encoded,
// so a value can never start a header line of its own.
bool copySafe(ngx_http_request_t *r, const char *s, size_t len, ngx_str_t *out)
{
    return glue::copyHeaderValue(r->pool, s, len, out);
}

// The pointer nginx keeps for a header it treats specially, if any.
// Location is deliberately not one: nginx's header filter would turn a
// relative value into an absolute URL, which lua-nginx-module does not.
ngx_table_elt_t **specialSlot(ngx_http_request_t *r, const std::string &name)
{
    ngx_http_headers_out_t &h = r->headers_out;
    switch (name.size()) {  // the length settles most names at once
    case 4:
        return nameIs(name, "date") ? &h.date
               : nameIs(name, "etag") ? &h.etag : nullptr;
    case 6:
        return nameIs(name, "server") ? &h.server : nullptr;
    case 7:
        return nameIs(name, "refresh") ? &h.refresh
               : nameIs(name, "expires") ? &h.expires : nullptr;
    case 13:
        return nameIs(name, "last-modified") ? &h.last_modified
               : nameIs(name, "content-range") ? &h.content_range
               : nameIs(name, "accept-ranges") ? &h.accept_ranges : nullptr;
    case 16:
        return nameIs(name, "content-encoding") ? &h.content_encoding
               : nameIs(name, "www-authenticate") ? &h.www_authenticate
               : nullptr;
    }
    return nullptr;
}

// The array nginx 1.22 keeps for a multi-line header it reads itself
// ($sent_http_cache_control, the expires directive, caches), if any.
ngx_array_t *multiSlot(ngx_http_request_t *r, const std::string &name)
{
    if (nameIs(name, "cache-control")) {
        return &r->headers_out.cache_control;
    }
    if (nameIs(name, "link")) {
        return &r->headers_out.link;
    }
    return nullptr;
}

// A live header of that name (case-insensitive).
bool isHeader(const ngx_table_elt_t &h, const std::string &name)
{
    return h.hash != 0 && h.key.len == name.size()
           && ngx_strncasecmp(h.key.data,
                              reinterpret_cast<u_char *>(
                                  const_cast<char *>(name.data())),
                              name.size()) == 0;
}

void clearHeader(ngx_http_request_t *r, const std::string &name)
{
    glue::forEachHeader(&r->headers_out.headers, [&](ngx_table_elt_t &h) {
        if (isHeader(h, name)) {
            h.hash = 0;
        }
    });
    if (ngx_table_elt_t **slot = specialSlot(r, name)) {
        *slot = nullptr;
    }
    if (ngx_array_t *arr = multiSlot(r, name)) {
        // Emptied to "never set": nginx's expires filter takes an array
        // with storage for one with an element and would write through
        // its stale first slot.
        arr->elts = nullptr;
        arr->nelts = 0;
    }
    if (nameIs(name, "last-modified")) {
        r->headers_out.last_modified_time = -1;
    }
}

bool addHeader(ngx_http_request_t *r, const std::string &name,
               const ngx_str_t &value)
{
    auto *h = static_cast<ngx_table_elt_t *>(
        ngx_list_push(&r->headers_out.headers));
    if (h == nullptr) {
        return false;
    }
    // `name` is headerName()'s: already escaped.
    if (!glue::copyHeaderName(r->pool, name.data(), name.size(), &h->key)) {
        return false;
    }
    h->lowcase_key = static_cast<u_char *>(ngx_pnalloc(r->pool, h->key.len));
    if (h->lowcase_key == nullptr) {
        return false;
    }
    ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
    h->value = value;
    h->hash = value.len ? 1 : 0;
    if (ngx_table_elt_t **slot = specialSlot(r, name)) {
        *slot = h;
    }
    if (ngx_array_t *arr = multiSlot(r, name); arr && h->hash) {
        if (arr->elts == nullptr
            && ngx_array_init(arr, r->pool, 2, sizeof(ngx_table_elt_t *))
                   != NGX_OK)
        {
            return false;
        }
        auto *p = static_cast<ngx_table_elt_t **>(ngx_array_push(arr));
        if (p == nullptr) {
            return false;
        }
        *p = h;
    }
    if (nameIs(name, "last-modified")) {
        r->headers_out.last_modified_time = ngx_parse_http_time(value.data,
                                                                value.len);
    }
    return true;
}

int headerIndex(lua_State *L)
{
    Run *run = requestPhase(L, kReadPhases);
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    size_t len;
    const char *key = luaL_checklstring(L, 2, &len);
    std::string name = headerName(ctx, key, len);

    if (nameIs(name, "content-type")) {
        if (r->headers_out.content_type.len == 0) {
            lua_pushnil(L);
        } else {
            lua_pushlstring(L, reinterpret_cast<char *>(
                                   r->headers_out.content_type.data),
                            r->headers_out.content_type.len);
        }
        return 1;
    }
    if (nameIs(name, "content-length")
        && r->headers_out.content_length == nullptr
        && r->headers_out.content_length_n >= 0)
    {
        lua_pushfstring(L, "%d", static_cast<int>(
                                     r->headers_out.content_length_n));
        if (r->headers_out.content_length_n > 0x7fffffff) {
            lua_pop(L, 1);
            lua_pushstring(L, std::to_string(static_cast<long long>(
                                  r->headers_out.content_length_n)).c_str());
        }
        return 1;
    }

    std::vector<ngx_str_t *> found;
    glue::forEachHeader(&r->headers_out.headers, [&](ngx_table_elt_t &h) {
        if (isHeader(h, name)) {
            found.push_back(&h.value);
        }
    });
    if (found.empty() && nameIs(name, "last-modified")
        && r->headers_out.last_modified_time != -1)
    {
        // Kept as a time only (static files) until nginx's header filter
        // writes the line: lua-nginx-module reads it as that line.
        u_char buf[sizeof("Mon, 28 Sep 1970 06:00:00 GMT")];
        u_char *end = ngx_http_time(buf, r->headers_out.last_modified_time);
        lua_pushlstring(L, reinterpret_cast<char *>(buf), end - buf);
    } else if (found.empty()) {
        lua_pushnil(L);
    } else if (found.size() == 1) {
        lua_pushlstring(L, reinterpret_cast<char *>(found[0]->data),
                        found[0]->len);
    } else {
        lua_createtable(L, static_cast<int>(found.size()), 0);
        for (size_t i = 0; i < found.size(); i++) {
            lua_pushlstring(L, reinterpret_cast<char *>(found[i]->data),
                            found[i]->len);
            lua_rawseti(L, -2, static_cast<int>(i + 1));
        }
    }
    return 1;
}

bool valueText(lua_State *L, int idx, const char **s, size_t *len)
{
    int t = lua_type(L, idx);
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
        *s = lua_tolstring(L, idx, len);
        return true;
    }
    if (t == LUA_TBOOLEAN) {
        *s = lua_toboolean(L, idx) ? "true" : "false";
        *len = std::strlen(*s);
        return true;
    }
    return false;
}

int headerNewIndex(lua_State *L)
{
    Run *run = requestPhase(L, kWritePhases);
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    size_t len;
    const char *key = luaL_checklstring(L, 2, &len);
    std::string name = headerName(ctx, key, len);

    if (r->header_sent || ctx->buffering) {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "attempt to set ngx.header.HEADER after sending out "
                      "response headers");
        return 0;
    }

    // Gather the new values first: a bad one leaves the headers untouched.
    // One value (the usual case) needs no vector.
    ngx_str_t one;
    std::vector<ngx_str_t> many;
    const ngx_str_t *values = nullptr;
    size_t nvalues = 0;
    const char *s;
    size_t slen;
    if (lua_istable(L, 3)) {
        size_t n = lua_objlen(L, 3);
        for (size_t i = 1; i <= n; i++) {
            lua_rawgeti(L, 3, static_cast<int>(i));
            if (!valueText(L, -1, &s, &slen)) {
                return luaL_error(L, "attempt to set ngx.header.%s to an "
                                  "array containing a %s value", key,
                                  luaL_typename(L, -1));
            }
            chargeMemory(L, len + slen + sizeof(ngx_table_elt_t),
                         "ngx.header");
            ngx_str_t v;
            if (!copySafe(r, s, slen, &v)) {
                return luaL_error(L, "no memory");
            }
            many.push_back(v);
            lua_pop(L, 1);
        }
        values = many.data();
        nvalues = many.size();
    } else if (!lua_isnil(L, 3)) {
        if (!valueText(L, 3, &s, &slen)) {
            return luaL_error(L, "attempt to set ngx.header.%s to a %s value",
                              key, luaL_typename(L, 3));
        }
        chargeMemory(L, len + slen + sizeof(ngx_table_elt_t), "ngx.header");
        if (!copySafe(r, s, slen, &one)) {
            return luaL_error(L, "no memory");
        }
        values = &one;
        nvalues = 1;
    }

    if (nameIs(name, "content-type")) {
        // Even a cleared type is a choice: no default type is added then.
        ctx->mime_set = true;
        if (nvalues == 0) {
            r->headers_out.content_type.len = 0;
            r->headers_out.content_type_len = 0;
        } else {
            // The type nginx's checks (gzip_types, charset_types, sub_filter
            // ...) compare is what comes before the first ';', as for
            // lua-nginx-module; the header goes out whole.
            const ngx_str_t &v = values[nvalues - 1];
            auto *semi = static_cast<u_char *>(
                std::memchr(v.data, ';', v.len));
            r->headers_out.content_type = v;
            r->headers_out.content_type_len = semi ? semi - v.data : v.len;
        }
        r->headers_out.content_type_lowcase = nullptr;
        r->headers_out.content_type_hash = 0;
        r->headers_out.charset.len = 0;
        return 0;
    }
    if (nameIs(name, "content-length")) {
        if (r->headers_out.content_length) {
            r->headers_out.content_length->hash = 0;
            r->headers_out.content_length = nullptr;
        }
        if (nvalues == 0) {
            r->headers_out.content_length_n = -1;
            return 0;
        }
        off_t n = ngx_atoof(values[nvalues - 1].data,
                            values[nvalues - 1].len);
        if (n == NGX_ERROR) {
            return luaL_error(L, "invalid Content-Length header value");
        }
        r->headers_out.content_length_n = n;
        return 0;
    }

    clearHeader(r, name);
    for (size_t i = 0; i < nvalues; i++) {
        if (!addHeader(r, name, values[i])) {
            return luaL_error(L, "no memory");
        }
    }
    return 0;
}

}  // namespace

void openHeader(lua_State *L)
{
    lua_newtable(L);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, headerIndex);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, headerNewIndex);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "header");
}

}  // namespace luaguard::api
