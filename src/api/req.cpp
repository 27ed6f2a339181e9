// ngx.req.*: the request line, headers, URI arguments and body.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "api/socket.hpp"
#include "api/util.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/subrequest.hpp"
#include "ngx/thread.hpp"
#include "runtime/codec.hpp"

namespace luaguard::api {

namespace {

constexpr PhaseMask kWritePhases = mask(Phase::Set, Phase::ServerRewrite,
                                        Phase::Rewrite, Phase::Access,
                                        Phase::Content, Phase::HeaderFilter,
                                        Phase::BodyFilter, Phase::Balancer);
constexpr PhaseMask kBodyPhases = mask(Phase::ServerRewrite, Phase::Rewrite,
                                       Phase::Access, Phase::Content);
// In balancer_by_lua a new body goes to the next try with
// ngx.balancer.recreate_request(); reading one needs the event loop.
constexpr PhaseMask kBodyWritePhases = kBodyPhases | mask(Phase::Balancer);
constexpr lua_Integer kDefaultMaxArgs = 100;

const char kHeadersMeta[] = "luaguard.req_headers_mt";

// The phase check of the request fields lua-resty-core reaches through
// FFI: in a timer or a TLS handshake they answer that the (placeholder)
// request has none.
Run *fieldPhase(lua_State *L, PhaseMask allowed)
{
    Phase p = g_run ? g_run->phase : Phase::None;
    if ((mask(p) & kPlaceholder) && !(allowed & mask(p))) {
        luaL_error(L, "API disabled in the current context");
    }
    return glue::checkPhase(L, allowed);
}

RequestCtx *requestFor(lua_State *L)
{
    fieldPhase(L, kRequest);
    return glue::requireRequest(L);
}

void pushStr(lua_State *L, const ngx_str_t &s)
{
    lua_pushlstring(L, reinterpret_cast<const char *>(s.data), s.len);
}

bool copyToPool(ngx_pool_t *pool, const std::string &s, ngx_str_t *out)
{
    auto *p = static_cast<u_char *>(ngx_pnalloc(pool, s.size() + 1));
    if (p == nullptr) {
        return false;
    }
    ngx_memcpy(p, s.data(), s.size());
    p[s.size()] = '\0';
    out->data = p;
    out->len = s.size();
    return true;
}

// Calls f(elt) for every header of the list until f returns false.
template <typename F>
void eachHeader(ngx_list_t *list, F f)
{
    glue::forEachHeader(list, [&](ngx_table_elt_t &h) { return f(&h); });
}

bool keyIs(const ngx_table_elt_t *h, const char *name, size_t len)
{
    return h->key.len == len
           && ngx_strncasecmp(h->key.data,
                              reinterpret_cast<u_char *>(
                                  const_cast<char *>(name)),
                              len) == 0;
}

// Max-args style optional integer argument.
lua_Integer maxArg(lua_State *L, int idx)
{
    if (lua_isnoneornil(L, idx)) {
        return kDefaultMaxArgs;
    }
    lua_Integer n = luaL_checkinteger(L, idx);
    return n > 0 ? n : 0;
}

// ---- request line ----

int getMethod(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    pushStr(L, ctx->r->method_name);
    return 1;
}


int setMethod(lua_State *L)
{
    glue::checkPhase(L, kWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    if (lua_type(L, 1) != LUA_TNUMBER) {
        return luaL_error(L, "bad method number");
    }
    lua_Integer id = lua_tointeger(L, 1);
    if (const glue::HttpMethod *m = glue::httpMethod(id)) {
        ctx->r->method = m->id;
        ctx->r->method_name.data = reinterpret_cast<u_char *>(
            const_cast<char *>(m->name));
        ctx->r->method_name.len = std::strlen(m->name);
        return 0;
    }
    return luaL_error(L, "unsupported HTTP method: %d", static_cast<int>(id));
}

int httpVersion(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    switch (ctx->r->http_version) {
    case NGX_HTTP_VERSION_9: lua_pushnumber(L, 0.9); break;
    case NGX_HTTP_VERSION_10: lua_pushnumber(L, 1.0); break;
    case NGX_HTTP_VERSION_11: lua_pushnumber(L, 1.1); break;
    case NGX_HTTP_VERSION_20: lua_pushnumber(L, 2.0); break;
    default: lua_pushnil(L);
    }
    return 1;
}

int isInternal(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    lua_pushboolean(L, ctx->r->internal);
    return 1;
}

// nginx writes a NUL after each header name and value in its input buffer.
// Copies the header block starting at `p` up to and including the empty
// line, restoring those bytes; false when the block does not end inside
// [p, last).
bool copyHeaderBlock(const u_char *p, const u_char *last, std::string *out)
{
    bool colon = false;
    bool line_empty = true;
    for (; p < last; p++) {
        char c = static_cast<char>(*p);
        if (c == '\0') {
            if (!colon) {
                c = ':';
            } else if (p + 1 < last && p[1] == '\n') {
                c = '\r';
            } else if (p + 1 < last
                       && (p[1] == '\r' || p[1] == ' ' || p[1] == '\t'))
            {
                c = ' ';
            } else {
                c = '\n';
            }
        }
        out->push_back(c);
        if (c == '\n') {
            if (line_empty) {
                return true;
            }
            colon = false;
            line_empty = true;
            continue;
        }
        if (c == ':') {
            colon = true;
        }
        if (c != '\r') {
            line_empty = false;
        }
    }
    return false;
}

int rawHeader(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    bool no_request_line = lua_toboolean(L, 1);
    ngx_http_request_t *mr = ctx->r->main;
    if (mr->http_version >= NGX_HTTP_VERSION_20) {
        return luaL_error(L, "http v2 not supported yet");
    }

    std::string out;
    ngx_buf_t *b = mr->header_in;
    const u_char *start = mr->request_line.data;
    if (b && start && start >= b->start && start < b->last) {
        const u_char *p = start;
        if (no_request_line) {
            p += mr->request_line.len;
            while (p < b->last && *p != '\n') {
                p++;
            }
            p++;
        }
        if (p <= b->last && copyHeaderBlock(p, b->last, &out)) {
            lua_pushlstring(L, out.data(), out.size());
            return 1;
        }
        out.clear();
    }

    // The block spans several buffers (large_client_header_buffers):
    // rebuild it from what nginx parsed.
    if (!no_request_line) {
        out.append(reinterpret_cast<char *>(mr->request_line.data),
                   mr->request_line.len);
        out += "\r\n";
    }
    eachHeader(&mr->headers_in.headers, [&](ngx_table_elt_t *h) {
        out.append(reinterpret_cast<char *>(h->key.data), h->key.len);
        out += ": ";
        out.append(reinterpret_cast<char *>(h->value.data), h->value.len);
        out += "\r\n";
        return true;
    });
    out += "\r\n";
    lua_pushlstring(L, out.data(), out.size());
    return 1;
}

// ---- request headers ----

int headersIndex(lua_State *L)
{
    if (lua_type(L, 2) != LUA_TSTRING) {
        return 0;
    }
    size_t len;
    const char *k = lua_tolstring(L, 2, &len);
    pushLower(L, k, len, true);
    lua_rawget(L, 1);
    return 1;
}

int getHeaders(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    lua_Integer max = maxArg(L, 1);
    bool raw = lua_toboolean(L, 2);
    ngx_list_t *list = &ctx->r->headers_in.headers;
    // Sized once: a table grown header by header is rehashed again and
    // again (a quarter of the cost with 50 headers).
    lua_Integer n = 0;
    for (ngx_list_part_t *part = &list->part; part; part = part->next) {
        n += static_cast<lua_Integer>(part->nelts);
    }
    MultiTable t(L, static_cast<size_t>(max && n > max ? max : n));
    lua_Integer count = 0;
    bool truncated = false;
    eachHeader(list, [&](ngx_table_elt_t *h) {
        if (max && count == max) {
            truncated = true;
            return false;
        }
        count++;
        if (raw) {
            pushStr(L, h->key);
        } else if (h->lowcase_key) {
            // nginx's parser (and ngx.req.set_header) keep the lower-case
            // name beside the key.
            lua_pushlstring(L, reinterpret_cast<char *>(h->lowcase_key),
                            h->key.len);
        } else {
            pushLower(L, reinterpret_cast<char *>(h->key.data), h->key.len);
        }
        pushStr(L, h->value);
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

// Removes every `name` header from a list, compacting the parts in place.
void removeHeaders(ngx_list_t *list, const std::string &name)
{
    for (ngx_list_part_t *part = &list->part; part; part = part->next) {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        ngx_uint_t j = 0;
        for (ngx_uint_t i = 0; i < part->nelts; i++) {
            if (keyIs(&h[i], name.data(), name.size())) {
                continue;
            }
            if (i != j) {
                h[j] = h[i];
            }
            j++;
        }
        part->nelts = j;
    }
}

bool isArrayField(ngx_uint_t offset)
{
    if (offset == offsetof(ngx_http_headers_in_t, cookies)) {
        return true;
    }
#if (NGX_HTTP_X_FORWARDED_FOR)
    if (offset == offsetof(ngx_http_headers_in_t, x_forwarded_for)) {
        return true;
    }
#endif
    return false;
}

// Points nginx's shortcut fields of r->headers_in (host, user_agent,
// cookies, ...) at the current list entries: removal moves elements, so
// they are recomputed from scratch after every change.
bool rebuildSpecial(ngx_http_request_t *r)
{
    ngx_http_headers_in_t *in = &r->headers_in;
    auto *base = reinterpret_cast<char *>(in);
    for (ngx_http_header_t *hh = ngx_http_headers_in; hh->name.len; hh++) {
        if (isArrayField(hh->offset)) {
            auto *a = reinterpret_cast<ngx_array_t *>(base + hh->offset);
            if (a->elts == nullptr
                && ngx_array_init(a, r->pool, 2, sizeof(ngx_table_elt_t *))
                       != NGX_OK)
            {
                return false;
            }
            a->nelts = 0;
        } else {
            *reinterpret_cast<ngx_table_elt_t **>(base + hh->offset) =
                nullptr;
        }
    }
    bool ok = true;
    eachHeader(&in->headers, [&](ngx_table_elt_t *h) {
        for (ngx_http_header_t *hh = ngx_http_headers_in; hh->name.len;
             hh++)
        {
            if (!keyIs(h, reinterpret_cast<char *>(hh->name.data),
                       hh->name.len))
            {
                continue;
            }
            if (isArrayField(hh->offset)) {
                auto *a = reinterpret_cast<ngx_array_t *>(base + hh->offset);
                auto **slot = static_cast<ngx_table_elt_t **>(
                    ngx_array_push(a));
                if (slot == nullptr) {
                    ok = false;
                    return false;
                }
                *slot = h;
            } else {
                auto **slot = reinterpret_cast<ngx_table_elt_t **>(
                    base + hh->offset);
                if (*slot == nullptr) {
                    *slot = h;
                }
            }
            break;
        }
        return true;
    });
    // $host follows the Host header, as after nginx's own parsing.
    if (in->host) {
        ngx_str_t v = in->host->value;
        size_t n = v.len;
        if (n && v.data[0] != '[') {
            for (size_t i = 0; i < v.len; i++) {
                if (v.data[i] == ':') {
                    n = i;
                    break;
                }
            }
        }
        while (n && v.data[n - 1] == '.') {
            n--;
        }
        auto *p = static_cast<u_char *>(ngx_pnalloc(r->pool, n ? n : 1));
        if (p == nullptr) {
            return false;
        }
        ngx_strlow(p, v.data, n);
        in->server.data = p;
        in->server.len = n;
    } else {
        in->server.len = 0;
    }
    return ok;
}

bool pushHeader(ngx_http_request_t *r, const std::string &name,
                const std::string &value)
{
    auto *h = static_cast<ngx_table_elt_t *>(
        ngx_list_push(&r->headers_in.headers));
    if (h == nullptr) {
        return false;
    }
    ngx_memzero(h, sizeof(*h));
    if (!copyToPool(r->pool, name, &h->key)
        || !copyToPool(r->pool, value, &h->value))
    {
        return false;
    }
    h->lowcase_key = static_cast<u_char *>(ngx_pnalloc(r->pool,
                                                       name.size() + 1));
    if (h->lowcase_key == nullptr) {
        return false;
    }
    ngx_strlow(h->lowcase_key, h->key.data, h->key.len);
    h->lowcase_key[h->key.len] = '\0';
    h->hash = ngx_hash_key(h->lowcase_key, h->key.len);
    return true;
}

// nginx gives a subrequest a copy of its parent's headers_in: the list
// head and the cookie arrays point at the parent's storage. Changed in
// place, the parent's headers would change (removal compacts the parts)
// and pushes would land in the parent's part, unseen by the subrequest.
// Its first change gives the subrequest a list and arrays of its own.
bool ownHeaders(ngx_http_request_t *r)
{
    ngx_http_headers_in_t *in = &r->headers_in;
    if (r == r->main || r->parent == nullptr
        || in->headers.part.elts != r->parent->headers_in.headers.part.elts)
    {
        return true;
    }
    ngx_list_t fresh;
    if (ngx_list_init(&fresh, r->pool, 20, sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return false;
    }
    bool ok = true;
    eachHeader(&in->headers, [&](ngx_table_elt_t *h) {
        auto *e = static_cast<ngx_table_elt_t *>(ngx_list_push(&fresh));
        if (e == nullptr) {
            ok = false;
            return false;
        }
        *e = *h;
        return true;
    });
    if (!ok) {
        return false;
    }
    in->headers = fresh;
    if (fresh.last == &fresh.part) {
        in->headers.last = &in->headers.part;  // not the local's
    }
    auto *base = reinterpret_cast<char *>(in);
    for (ngx_http_header_t *hh = ngx_http_headers_in; hh->name.len; hh++) {
        if (isArrayField(hh->offset)) {
            // rebuildSpecial makes a new one.
            reinterpret_cast<ngx_array_t *>(base + hh->offset)->elts =
                nullptr;
        }
    }
    return true;
}

// Replaces the request headers called `name` by `values` (escaped as
// RFC 9110 requires, codec::escapeHeaderName/Value); no values removes them.
bool replaceHeaders(ngx_http_request_t *r, const char *name, size_t nlen,
                    const std::vector<std::string> &values)
{
    if (!ownHeaders(r)) {
        return false;
    }
    std::string key = codec::escapeHeaderName(name, nlen);
    removeHeaders(&r->headers_in.headers, key);
    for (const std::string &v : values) {
        std::string safe = codec::escapeHeaderValue(v.data(), v.size());
        if (!pushHeader(r, key, safe)) {
            return false;
        }
    }
    return rebuildSpecial(r);
}

bool headerValueText(lua_State *L, int idx, std::string *out)
{
    int t = lua_type(L, idx);
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        out->assign(s, len);
        return true;
    }
    if (t == LUA_TBOOLEAN) {
        *out = lua_toboolean(L, idx) ? "true" : "false";
        return true;
    }
    return false;
}

int setHeaderCommon(lua_State *L, bool clear)
{
    fieldPhase(L, kWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    int t = lua_type(L, 1);
    if (t != LUA_TSTRING && t != LUA_TNUMBER) {
        return luaL_error(L, "bad 'name' argument: string expected, got %s",
                          luaL_typename(L, 1));
    }
    size_t nlen;
    const char *name = lua_tolstring(L, 1, &nlen);
    std::vector<std::string> values;
    if (!clear && !lua_isnoneornil(L, 2)) {
        std::string v;
        if (lua_istable(L, 2)) {
            size_t n = lua_objlen(L, 2);
            for (size_t i = 1; i <= n; i++) {
                lua_rawgeti(L, 2, static_cast<int>(i));
                if (!headerValueText(L, -1, &v)) {
                    return luaL_error(L, "bad 'value' argument: string, "
                                      "number or boolean expected in the "
                                      "array, got %s", luaL_typename(L, -1));
                }
                lua_pop(L, 1);
                if (!v.empty()) {
                    values.push_back(v);
                }
            }
        } else if (headerValueText(L, 2, &v)) {
            // An empty value removes the header, as in lua-nginx-module.
            if (!v.empty()) {
                values.push_back(v);
            }
        } else {
            return luaL_error(L, "bad 'value' argument: string or table "
                              "expected, got %s", luaL_typename(L, 2));
        }
    }
    if (nlen == 14 && ngx_strncasecmp(reinterpret_cast<u_char *>(
                                         const_cast<char *>(name)),
                                     reinterpret_cast<u_char *>(
                                         const_cast<char *>(
                                             "Content-Length")), 14) == 0)
    {
        for (const std::string &v : values) {
            if (ngx_atoof(reinterpret_cast<u_char *>(
                                           const_cast<char *>(v.data())),
                                       v.size()) == NGX_ERROR)
            {
                return luaL_error(L, "invalid Content-Length header value");
            }
        }
    }
    size_t bytes = 0;
    for (const std::string &v : values) {
        bytes += nlen + v.size() + sizeof(ngx_table_elt_t);
    }
    if (ctx->r->headers_in.headers.nalloc == 0) {
        // No header list: an HTTP/0.9 request, or one nginx rejected
        // before parsing headers (error_page 400 = /loc). Nothing to
        // change, as in lua-nginx-module.
        return 0;
    }
    chargeMemory(L, bytes, "ngx.req.set_header");
    if (!replaceHeaders(ctx->r, name, nlen, values)) {
        return luaL_error(L, "no memory");
    }
    return 0;
}

int setHeader(lua_State *L)
{
    return setHeaderCommon(L, false);
}

int clearHeader(lua_State *L)
{
    return setHeaderCommon(L, true);
}

// ---- URI and arguments ----

int getUriArgs(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    lua_Integer max = maxArg(L, 1);
    ngx_str_t args = ctx->r->args;
    bool truncated = pushArgsTable(L, reinterpret_cast<char *>(args.data),
                                   args.len, static_cast<size_t>(max));
    if (truncated) {
        lua_pushliteral(L, "truncated");
        return 2;
    }
    return 1;
}

int setUriArgs(lua_State *L)
{
    glue::checkPhase(L, kWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    std::string args;
    switch (lua_type(L, 1)) {
    case LUA_TSTRING:
    case LUA_TNUMBER: {
        size_t len;
        const char *s = lua_tolstring(L, 1, &len);
        args = codec::escapeArgsString(s, len);
        break;
    }
    case LUA_TTABLE:
        lua_settop(L, 1);
        if (!encodeArgsTable(L, 1, &args)) {
            return lua_error(L);
        }
        break;
    default:
        return luaL_error(L, "bad argument #1 to 'set_uri_args' (string, "
                          "number, or table expected, but got %s)",
                          luaL_typename(L, 1));
    }
    ngx_http_request_t *r = ctx->r;
    if (!copyToPool(r->pool, args, &r->args)) {
        return luaL_error(L, "no memory");
    }
    r->valid_unparsed_uri = 0;
    return 0;
}

int setUri(lua_State *L)
{
    Run *run = fieldPhase(L, kWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    size_t len;
    const char *uri = luaL_checklstring(L, 1, &len);
    if (len == 0) {
        return luaL_error(L, "attempt to use zero-length uri");
    }
    bool jump = lua_toboolean(L, 2);
    bool binary = lua_toboolean(L, 3);
    if (!binary) {
        size_t bad = codec::unsafeUriByte(uri, len);
        if (bad != std::string::npos) {
            return unsafeUriError(L, uri, len, bad, "uri",
                                  " (maybe you want to set the 'binary' "
                                  "argument?)");
        }
    } else {
        // $uri holds the bytes raw: add_header, return and friends would
        // put CR LF into the response (lua-nginx-module lets them through;
        // docs/compatibility.md).
        for (size_t i = 0; i < len; i++) {
            if (uri[i] == '\r' || uri[i] == '\n') {
                return unsafeUriError(L, uri, len, i, "uri", "");
            }
        }
    }
    if (jump && run->phase != Phase::Rewrite
        && run->phase != Phase::ServerRewrite)
    {
        return luaL_error(L, "API disabled in the context of %s",
                          directiveName(run->phase));
    }
    if (jump) {
        subreq::checkAbortable(L, ctx);
    }
    ngx_http_request_t *r = ctx->r;
    if (!copyToPool(r->pool, std::string(uri, len), &r->uri)) {
        return luaL_error(L, "no memory");
    }
    ngx_http_set_exten(r);
    // The flags nginx's rewrite sets (lua-nginx-module documents set_uri
    // as `rewrite ... last` and `... break`): an internal request whose
    // URI upstream modules escape, as the client never sent it.
    r->internal = 1;
    r->valid_unparsed_uri = 0;
    if (jump) {
        // The location is searched again once the phase handler returns.
        r->uri_changed = 1;
        return glue::exitThread(L, ctx, NGX_DECLINED);
    }
    // The URI no longer begins with the location's prefix: proxy_pass
    // with a URI part passes it whole.
    r->valid_location = 0;
    return 0;
}

// ---- the request body ----

void bodyRead(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    if (ctx == nullptr) {
        return;
    }
    ctx->req_body_done = true;
    if (LuaThread *t = ctx->req_body_waiter) {
        ctx->req_body_waiter = nullptr;
        t->cancel = nullptr;
        entry::resumeWith(t, 0);
    }
}

void cancelBodyWait(LuaThread *t)
{
    t->ctx->req_body_waiter = nullptr;
}

int readBody(lua_State *L)
{
    glue::checkPhase(L, kBodyPhases);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_t *r = ctx->r;
    if (r != r->main || r->request_body || r->discard_body) {
        return 0;
    }
    ctx->req_body_done = false;
    ctx->req_body_waiter = nullptr;
    ngx_int_t rc = ngx_http_read_client_request_body(r, entry::edge<bodyRead>);
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        // Too large, bad framing: the request ends with that status, as
        // lua-nginx-module does.
        return glue::exitThread(L, ctx, rc);
    }
    // The reader's reference: nginx handlers give it back by returning
    // NGX_DONE; the suspended thread holds its own.
    r->main->count--;
    if (rc == NGX_ERROR) {
        return glue::exitThread(L, ctx, NGX_ERROR);
    }
    if (ctx->req_body_done) {
        return 0;
    }
    // On a client error met later nginx finalizes the request itself and
    // bodyRead is never called: a timeout or a closed connection frees the
    // request (the pool cleanup kills the thread); an error page (413 found
    // in a chunked body, bad framing) passes the header filter, which ends
    // the waiting phase (glue::bodyWaitAbandoned).
    LuaThread *t = threads::current();
    if (t == nullptr) {
        return luaL_error(L, "no request found");
    }
    ctx->req_body_waiter = t;
    t->cancel = cancelBodyWait;
    return glue::yield(L);
}

int discardBody(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_t *r = ctx->r;
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }
    return 0;
}

int getBodyData(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    lua_Integer max = 0;
    if (!lua_isnoneornil(L, 1)) {
        max = luaL_checkinteger(L, 1);
        if (max < 0) {
            return luaL_error(L, "bad max_bytes argument: %d",
                              static_cast<int>(max));
        }
    }
    ngx_http_request_body_t *rb = ctx->r->request_body;
    if (rb == nullptr || rb->bufs == nullptr || rb->temp_file) {
        lua_pushnil(L);
        return 1;
    }
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    size_t total = 0;
    for (ngx_chain_t *cl = rb->bufs; cl; cl = cl->next) {
        ngx_buf_t *buf = cl->buf;
        if (buf->in_file && !ngx_buf_in_memory(buf)) {
            lua_pushnil(L);
            return 1;
        }
        if (!ngx_buf_in_memory(buf)) {
            continue;
        }
        size_t n = buf->last - buf->pos;
        if (max && total + n > static_cast<size_t>(max)) {
            n = static_cast<size_t>(max) - total;
        }
        luaL_addlstring(&b, reinterpret_cast<char *>(buf->pos), n);
        total += n;
        if (max && total == static_cast<size_t>(max)) {
            break;
        }
    }
    luaL_pushresult(&b);
    if (total == 0) {
        // No bytes is no body (discarded, or empty), as in lua-nginx-module.
        lua_pushnil(L);
    }
    return 1;
}

int getBodyFile(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    ngx_http_request_body_t *rb = ctx->r->request_body;
    if (rb == nullptr || rb->temp_file == nullptr) {
        lua_pushnil(L);
        return 1;
    }
    pushStr(L, rb->temp_file->file.name);
    return 1;
}

ngx_http_request_body_t *requireBody(lua_State *L, RequestCtx *ctx)
{
    ngx_http_request_body_t *rb = ctx->r->request_body;
    if (rb == nullptr) {
        luaL_error(L, "request body not read yet");
    }
    return rb;
}

// A file given to set_body_file with auto_clean: its cleanup is told
// apart from nginx's own temp files by this handler, so that the next
// set_body_file or set_body_data removes it at once, as documented.
void deleteAutoCleanFile(void *data)
{
    ngx_pool_delete_file(data);
}

void dropAutoCleanFile(ngx_http_request_t *r)
{
    ngx_http_request_body_t *rb = r->request_body;
    if (rb == nullptr || rb->temp_file == nullptr) {
        return;
    }
    for (ngx_pool_cleanup_t *c = r->pool->cleanup; c; c = c->next) {
        auto *f = static_cast<ngx_pool_cleanup_file_t *>(c->data);
        if (c->handler == deleteAutoCleanFile
            && f->fd == rb->temp_file->file.fd)
        {
            c->handler(c->data);
            c->handler = nullptr;
            return;
        }
    }
}

// The new body in place of the old. An empty one is no body at all:
// get_body_data() answers nil, and an upstream is sent no buffer (an
// empty one makes nginx log "zero size buf in output").
void installBody(ngx_http_request_body_t *rb, ngx_chain_t *cl, off_t size,
                 ngx_temp_file_t *tf)
{
    rb->bufs = size ? cl : nullptr;
    rb->buf = size && tf == nullptr ? cl->buf : nullptr;
    rb->temp_file = tf;
}

// The framing headers describe the new body once it is replaced (the
// client's body has been read entirely by then).
bool setBodyLength(ngx_http_request_t *r, off_t n)
{
    r->headers_in.content_length_n = n;
    r->headers_in.chunked = 0;
    removeHeaders(&r->headers_in.headers, "Transfer-Encoding");
    removeHeaders(&r->headers_in.headers, "Content-Length");
    if (!pushHeader(r, "Content-Length", std::to_string(
                                             static_cast<long long>(n))))
    {
        return false;
    }
    return rebuildSpecial(r);
}

ngx_chain_t *memoryChain(ngx_http_request_t *r, const char *data, size_t len)
{
    ngx_buf_t *b = ngx_create_temp_buf(r->pool, len ? len : 1);
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (b == nullptr || cl == nullptr) {
        return nullptr;
    }
    if (len) {
        b->last = ngx_cpymem(b->pos, data, len);
    }
    b->last_buf = 1;
    cl->buf = b;
    cl->next = nullptr;
    return cl;
}

ngx_chain_t *fileChain(ngx_http_request_t *r, ngx_temp_file_t *tf, off_t size)
{
    auto *b = static_cast<ngx_buf_t *>(ngx_calloc_buf(r->pool));
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (b == nullptr || cl == nullptr) {
        return nullptr;
    }
    b->in_file = 1;
    b->file = &tf->file;
    b->file_pos = 0;
    b->file_last = size;
    b->last_buf = 1;
    cl->buf = b;
    cl->next = nullptr;
    return cl;
}

int setBodyData(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_body_t *rb = requireBody(L, ctx);
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    chargeMemory(L, len, "ngx.req.set_body_data");
    ngx_chain_t *cl = memoryChain(ctx->r, data, len);
    if (cl == nullptr || !setBodyLength(ctx->r, static_cast<off_t>(len))) {
        return luaL_error(L, "no memory");
    }
    dropAutoCleanFile(ctx->r);
    installBody(rb, cl, static_cast<off_t>(len), nullptr);
    return 0;
}

int setBodyFile(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_body_t *rb = requireBody(L, ctx);
    ngx_http_request_t *r = ctx->r;
    size_t len;
    const char *path = luaL_checklstring(L, 1, &len);
    bool auto_clean = lua_toboolean(L, 2);
    if (len == 0 || std::memchr(path, '\0', len) != nullptr) {
        return luaL_error(L, "bad file name");
    }

    auto *tf = static_cast<ngx_temp_file_t *>(
        ngx_pcalloc(r->pool, sizeof(ngx_temp_file_t)));
    auto *cln = ngx_pool_cleanup_add(r->pool,
                                     sizeof(ngx_pool_cleanup_file_t));
    if (tf == nullptr || cln == nullptr
        || !copyToPool(r->pool, std::string(path, len), &tf->file.name))
    {
        return luaL_error(L, "no memory");
    }
    // Not ngx_open_file: the macro's bare open() would find api::open.
    ngx_fd_t fd = ::open(reinterpret_cast<char *>(tf->file.name.data),
                         O_RDONLY | O_CLOEXEC);
    if (fd == NGX_INVALID_FILE) {
        return luaL_error(L, "%s \"%s\" failed", ngx_open_file_n,
                          tf->file.name.data);
    }
    auto *clnf = static_cast<ngx_pool_cleanup_file_t *>(cln->data);
    clnf->fd = fd;
    clnf->name = tf->file.name.data;
    clnf->log = r->pool->log;
    cln->handler = auto_clean ? deleteAutoCleanFile : ngx_pool_cleanup_file;

    ngx_file_info_t fi;
    if (ngx_fd_info(fd, &fi) == NGX_FILE_ERROR) {
        return luaL_error(L, "%s \"%s\" failed", ngx_fd_info_n,
                          tf->file.name.data);
    }
    tf->file.fd = fd;
    tf->file.log = r->connection->log;
    tf->file.offset = ngx_file_size(&fi);
    ngx_chain_t *cl = fileChain(r, tf, ngx_file_size(&fi));
    if (cl == nullptr || !setBodyLength(r, ngx_file_size(&fi))) {
        return luaL_error(L, "no memory");
    }
    dropAutoCleanFile(r);
    installBody(rb, cl, ngx_file_size(&fi), tf);
    return 0;
}

// ngx.req.init_body's state: a memory buffer that spills into a temp file.
struct BodyWriter {
    ngx_buf_t        *buf;
    ngx_temp_file_t  *tf;
};

// RequestCtx keeps the writer as an opaque slot: only these two read and
// write it, typed.
BodyWriter *bodyWriter(const RequestCtx *ctx)
{
    return static_cast<BodyWriter *>(ctx->req_body_writer);
}

void setBodyWriter(RequestCtx *ctx, BodyWriter *w)
{
    ctx->req_body_writer = w;
}

// Writes `b` (the writer's buffer, or data that cannot fit in it) to the
// writer's temp file, made on first use.
bool spill(ngx_http_request_t *r, BodyWriter *w, ngx_buf_t *b)
{
    if (b->last == b->pos) {
        return true;
    }
    if (w->tf == nullptr) {
        auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
            ngx_http_get_module_loc_conf(r, ngx_http_core_module));
        w->tf = static_cast<ngx_temp_file_t *>(
            ngx_pcalloc(r->pool, sizeof(ngx_temp_file_t)));
        if (w->tf == nullptr) {
            return false;
        }
        w->tf->file.fd = NGX_INVALID_FILE;
        w->tf->file.log = r->connection->log;
        w->tf->path = clcf->client_body_temp_path;
        w->tf->pool = r->pool;
        w->tf->warn = const_cast<char *>(
            "a client request body is buffered to a temporary file");
        w->tf->log_level = r->request_body_file_log_level;
        // Named on disk for get_body_file, removed with the request.
        w->tf->persistent = 1;
        w->tf->clean = 1;
    }
    ngx_chain_t cl = {b, nullptr};
    ssize_t n = ngx_write_chain_to_temp_file(w->tf, &cl);
    if (n == NGX_ERROR) {
        return false;
    }
    w->tf->offset += n;  // the caller's job, as in nginx's body writer
    b->pos = b->last = b->start;
    return true;
}

bool spill(ngx_http_request_t *r, BodyWriter *w)
{
    return spill(r, w, w->buf);
}

BodyWriter *requireWriter(lua_State *L, RequestCtx *ctx)
{
    BodyWriter *w = bodyWriter(ctx);
    if (w == nullptr) {
        luaL_error(L, "request_body not initialized");
    }
    return w;
}

int initBody(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    ngx_http_request_t *r = ctx->r;
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    lua_Integer size = static_cast<lua_Integer>(
        clcf->client_body_buffer_size);
    if (!lua_isnoneornil(L, 1)) {
        lua_Integer n = luaL_checkinteger(L, 1);
        if (n < 0) {
            return luaL_error(L, "bad buffer size");
        }
        size = n;  // 0: everything goes to the temp file
    }
    ngx_http_request_body_t *rb = r->request_body;
    if (rb == nullptr && ctx->req_socket != nullptr) {
        // The body was read through ngx.req.socket(), which nginx never
        // saw: the new one gets its own record. What the script left
        // unread stays in the connection, which then cannot be reused.
        rb = static_cast<ngx_http_request_body_t *>(
            ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t)));
        if (rb == nullptr) {
            return luaL_error(L, "no memory");
        }
        r->request_body = rb;
        if (r->headers_in.content_length_n > 0) {
            r->keepalive = 0;
        }
    }
    requireBody(L, ctx);
    // The buffer is the script's choice of size: its own memory, charged
    // before it is allocated (a huge size fails on the budget, not on the
    // worker's memory).
    chargeMemory(L, static_cast<size_t>(size), "ngx.req.init_body");
    auto *w = static_cast<BodyWriter *>(ngx_pcalloc(r->pool,
                                                    sizeof(BodyWriter)));
    if (w == nullptr) {
        return luaL_error(L, "no memory");
    }
    w->buf = ngx_create_temp_buf(r->pool, static_cast<size_t>(size));
    if (w->buf == nullptr) {
        return luaL_error(L, "no memory");
    }
    rb->bufs = nullptr;
    rb->buf = nullptr;
    rb->temp_file = nullptr;
    setBodyWriter(ctx, w);
    return 0;
}

int appendBody(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    BodyWriter *w = requireWriter(L, ctx);
    requireBody(L, ctx);
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    if (len && w->buf->start == w->buf->end) {
        // A zero-size buffer (client_body_buffer_size 0): straight to the
        // temp file, as lua-nginx-module does; the loop below would never
        // make room.
        ngx_buf_t b;
        ngx_memzero(&b, sizeof(b));
        b.start = b.pos = reinterpret_cast<u_char *>(
            const_cast<char *>(data));
        b.last = b.end = b.start + len;
        b.temporary = 1;
        if (!spill(ctx->r, w, &b)) {
            return luaL_error(L, "failed to write the request body to a "
                              "temporary file");
        }
        return 0;
    }
    while (len) {
        size_t room = w->buf->end - w->buf->last;
        if (room == 0) {
            if (!spill(ctx->r, w)) {
                return luaL_error(L, "failed to write the request body to "
                                  "a temporary file");
            }
            continue;
        }
        size_t n = len < room ? len : room;
        w->buf->last = ngx_cpymem(w->buf->last, data, n);
        data += n;
        len -= n;
    }
    return 0;
}

int finishBody(lua_State *L)
{
    glue::checkPhase(L, kBodyWritePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    BodyWriter *w = requireWriter(L, ctx);
    ngx_http_request_body_t *rb = requireBody(L, ctx);
    ngx_http_request_t *r = ctx->r;
    ngx_chain_t *cl;
    off_t size;
    // client_body_in_file_only: the new body goes to a file too.
    if (w->tf || r->request_body_in_file_only) {
        if (!spill(r, w)) {
            return luaL_error(L, "failed to write the request body to a "
                              "temporary file");
        }
        size = w->tf ? w->tf->offset : 0;
        cl = w->tf ? fileChain(r, w->tf, size) : nullptr;
        if (w->tf == nullptr) {
            cl = memoryChain(r, "", 0);  // nothing was appended
        }
    } else {
        size = w->buf->last - w->buf->pos;
        cl = ngx_alloc_chain_link(r->pool);
        if (cl) {
            w->buf->last_buf = 1;
            cl->buf = w->buf;
            cl->next = nullptr;
        }
    }
    if (cl == nullptr || !setBodyLength(r, size)) {
        return luaL_error(L, "no memory");
    }
    installBody(rb, cl, size, w->tf);
    setBodyWriter(ctx, nullptr);
    return 0;
}

int reqSocket(lua_State *L)
{
    // Documented contexts: rewrite, access, content.
    glue::checkPhase(L, mask(Phase::ServerRewrite, Phase::Rewrite,
                             Phase::Access, Phase::Content));
    int n = lua_gettop(L);
    if (n > 1) {
        return luaL_error(L, "expecting zero arguments, but got %d",
                          n);
    }
    RequestCtx *ctx = sock::currentCtx();
    if (ctx == nullptr) {
        return luaL_error(L, "no request found");
    }
    return sock::reqSocketOpen(L, ctx, n == 1 && lua_toboolean(L, 1));
}

int getPostArgs(lua_State *L)
{
    RequestCtx *ctx = requestFor(L);
    lua_Integer max = maxArg(L, 1);
    ngx_http_request_body_t *rb = ctx->r->request_body;
    if (rb == nullptr) {
        return luaL_error(L, "no request body found; maybe you should turn "
                          "on lua_need_request_body?");
    }
    if (rb->temp_file) {
        lua_pushnil(L);
        lua_pushliteral(L, "request body in temp file not supported");
        return 2;
    }
    // A body in one buffer (the usual case) is parsed where it lies.
    ngx_chain_t *cl = rb->bufs;
    const char *data = "";
    size_t len = 0;
    std::string body;
    if (cl && cl->next == nullptr) {
        if (ngx_buf_in_memory(cl->buf)) {
            data = reinterpret_cast<char *>(cl->buf->pos);
            len = cl->buf->last - cl->buf->pos;
        }
    } else {
        for (; cl; cl = cl->next) {
            if (ngx_buf_in_memory(cl->buf)) {
                body.append(reinterpret_cast<char *>(cl->buf->pos),
                            cl->buf->last - cl->buf->pos);
            }
        }
        data = body.data();
        len = body.size();
    }
    bool truncated = pushArgsTable(L, data, len, static_cast<size_t>(max));
    if (truncated) {
        lua_pushliteral(L, "truncated");
        return 2;
    }
    return 1;
}

}  // namespace

bool kvRoom(luaguard_kv_list_t *l, size_t kv, size_t buf)
{
    if (kv <= l->kv_cap && buf <= l->buf_cap) {
        return true;
    }
    l->need_kv = kv;
    l->need_buf = buf;
    return false;
}

void openReq(lua_State *L)
{
    luaL_newmetatable(L, kHeadersMeta);
    lua_pushcfunction(L, headersIndex);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    // ngx.req exists already (openTime adds start_time): add to it.
    subTable(L, "req");
    const luaL_Reg fns[] = {{"get_method", getMethod},
                            {"set_method", setMethod},
                            {"http_version", httpVersion},
                            {"is_internal", isInternal},
                            {"raw_header", rawHeader},
                            {"get_headers", getHeaders},
                            {"set_header", setHeader},
                            {"clear_header", clearHeader},
                            {"get_uri_args", getUriArgs},
                            {"set_uri_args", setUriArgs},
                            {"set_uri", setUri},
                            {"get_post_args", getPostArgs},
                            {"read_body", readBody},
                            {"discard_body", discardBody},
                            {"get_body_data", getBodyData},
                            {"get_body_file", getBodyFile},
                            {"set_body_data", setBodyData},
                            {"set_body_file", setBodyFile},
                            {"init_body", initBody},
                            {"append_body", appendBody},
                            {"finish_body", finishBody},
                            {"socket", reqSocket},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
}

}  // namespace luaguard::api

int luaguard_req_get_headers(luaguard_kv_list_t *l, int max, int raw)
{
    using namespace luaguard;
    ngx_http_request_t *r = api::ffiRequest(max);
    if (r == nullptr) {
        return -1;
    }
    // One pass: the pairs are written while they fit; past the list's
    // room the rest is only counted, for the retry the caller makes with
    // a list grown to `need_kv` pairs and `need_buf` bytes. Plain loops
    // over locals: this runs once per header.
    size_t limit = max > 0 ? static_cast<size_t>(max) : SIZE_MAX;
    size_t kv_cap = l->kv_cap;
    luaguard_kv_t *kv = l->kv;
    char *buf = l->buf;
    char *buf_end = l->buf + l->buf_cap;
    size_t n = 0;
    size_t lower = 0;  // bytes of names nginx keeps no lower-case copy of
    bool fits = true;
    int truncated = 0;
    for (ngx_list_part_t *part = &r->headers_in.headers.part; part;
         part = part->next)
    {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; i++, n++) {
            if (n == limit) {
                truncated = 1;
                goto done;
            }
            size_t klen = h[i].key.len;
            const char *key = raw ? reinterpret_cast<char *>(h[i].key.data)
                                  : reinterpret_cast<char *>(h[i].lowcase_key);
            if (key == nullptr) {
                lower += klen;
                if (fits && klen <= static_cast<size_t>(buf_end - buf)) {
                    ngx_strlow(reinterpret_cast<u_char *>(buf), h[i].key.data,
                               klen);
                    key = buf;
                    buf += klen;
                } else {
                    fits = false;
                }
            }
            if (fits && n < kv_cap) {
                kv[n].key = key;
                kv[n].klen = klen;
                // A null value would read as an argument without '='.
                kv[n].value = h[i].value.data
                                  ? reinterpret_cast<char *>(h[i].value.data)
                                  : "";
                kv[n].vlen = h[i].value.len;
            } else {
                fits = false;
            }
        }
    }
done:
    if (!fits) {
        api::kvRoom(l, n, lower);  // records the room the retry needs
        return -2;
    }
    l->truncated = truncated;
    return static_cast<int>(n);
}

int luaguard_req_get_args(luaguard_kv_list_t *l, int which, int max)
{
    using namespace luaguard;
    ngx_http_request_t *r = api::ffiRequest(max);
    if (r == nullptr) {
        return -1;
    }
    const char *s;
    size_t len;
    if (which == 0) {
        s = reinterpret_cast<char *>(r->args.data);
        len = r->args.len;
    } else {
        // No body, a body in a file or in several buffers: the C function.
        ngx_http_request_body_t *rb = r->request_body;
        if (rb == nullptr || rb->temp_file) {
            return -1;
        }
        ngx_chain_t *cl = rb->bufs;
        if (cl == nullptr) {
            s = "";
            len = 0;
        } else if (cl->next == nullptr && ngx_buf_in_memory(cl->buf)) {
            s = reinterpret_cast<char *>(cl->buf->pos);
            len = static_cast<size_t>(cl->buf->last - cl->buf->pos);
        } else {
            return -1;
        }
    }
    size_t n = codec::countArgs(s, len);
    size_t want = max && n > static_cast<size_t>(max)
                      ? static_cast<size_t>(max) : n;
    if (!api::kvRoom(l, want, len)) {
        return -2;
    }
    codec::ArgReader reader(s, len, l->buf);
    codec::Arg a;
    size_t count = 0;
    l->truncated = 0;
    while (reader.next(&a)) {
        if (count == want) {
            l->truncated = 1;
            break;
        }
        luaguard_kv_t &e = l->kv[count++];
        e.key = a.key;
        e.klen = a.key_len;
        e.value = a.has_value ? a.value : nullptr;
        e.vlen = a.value_len;
    }
    return static_cast<int>(count);
}
