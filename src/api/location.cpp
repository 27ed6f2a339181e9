// ngx.location.capture, ngx.location.capture_multi and ngx.on_abort.

#include <cstring>
#include <string>

#include "api/api.hpp"
#include "api/util.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "runtime/codec.hpp"
#include "security/log_escape.hpp"
#include "security/sandbox.hpp"
#include "ngx/subrequest.hpp"
#include "ngx/thread.hpp"

namespace luaguard::api {

namespace {

constexpr PhaseMask kCapturePhases = mask(Phase::Rewrite, Phase::Access,
                                          Phase::Content);


// One subrequest as the Lua arguments describe it.
struct Spec {
    ngx_str_t         uri;
    ngx_str_t         args;
    const glue::HttpMethod *method;
    bool              has_body;
    ngx_str_t         body;
    bool              forward_body;
    bool              share_vars;
    bool              copy_vars;
    int               vars;      // stack index of the vars table, or 0
    int               ctx;       // stack index of the ctx table, or 0
};

ngx_str_t poolCopy(lua_State *L, ngx_pool_t *pool, const char *s, size_t n)
{
    ngx_str_t out;
    out.len = n;
    out.data = static_cast<u_char *>(ngx_pnalloc(pool, n ? n : 1));
    if (out.data == nullptr) {
        luaL_error(L, "no memory");
    }
    if (n) {
        ngx_memcpy(out.data, s, n);
    }
    return out;
}

bool optionFlag(lua_State *L, int opts, const char *name)
{
    lua_getfield(L, opts, name);
    bool on = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return on;
}

// Reads {uri, options?} at stack index `item` into *spec. Raises on misuse.
// Tables it keeps (vars, ctx) stay on the stack for the second pass.
void readSpec(lua_State *L, ngx_http_request_t *r, int item, int index,
              Spec *spec)
{
    lua_rawgeti(L, item, 1);
    if (lua_type(L, -1) != LUA_TSTRING) {
        luaL_error(L, "the first argument of a subrequest should be a "
                      "string (uri)");
    }
    size_t len;
    const char *uri = lua_tolstring(L, -1, &len);
    if (len == 0) {
        luaL_error(L, "uri is empty");
    }
    std::string path(uri, len);
    std::string args;
    size_t q = path.find('?');
    if (q != std::string::npos) {
        args = path.substr(q + 1);
        path.resize(q);
    }
    lua_pop(L, 1);

    *spec = Spec();
    spec->method = &glue::kHttpGet;
    lua_rawgeti(L, item, 2);
    int opts = lua_gettop(L);
    if (!lua_isnil(L, opts)) {
        if (!lua_istable(L, opts)) {
            luaL_error(L, "expecting table as the 2nd argument for "
                          "subrequest %d, but got %s", index,
                       luaL_typename(L, opts));
        }
        lua_getfield(L, opts, "args");
        std::string extra;
        switch (lua_type(L, -1)) {
        case LUA_TNIL:
            break;
        case LUA_TSTRING:
        case LUA_TNUMBER: {
            size_t n;
            const char *s = lua_tolstring(L, -1, &n);
            extra.assign(s, n);
            break;
        }
        case LUA_TTABLE:
            if (!encodeArgsTable(L, lua_gettop(L), &extra)) {
                lua_error(L);
            }
            break;
        default:
            luaL_error(L, "Bad args option value");
        }
        lua_pop(L, 1);
        if (!extra.empty()) {
            args = args.empty() ? extra : args + "&" + extra;
        }

        lua_getfield(L, opts, "method");
        if (!lua_isnil(L, -1)) {
            if (lua_type(L, -1) != LUA_TNUMBER) {
                luaL_error(L, "Bad http request method");
            }
            lua_Integer id = lua_tointeger(L, -1);
            spec->method = glue::httpMethod(id);
            if (spec->method == nullptr) {
                ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                              "unsupported HTTP method: %d",
                              static_cast<int>(id));
                luaL_error(L, "failed to adjust the subrequest: -1");
            }
        }
        lua_pop(L, 1);

        lua_getfield(L, opts, "body");
        if (!lua_isnil(L, -1)) {
            if (lua_type(L, -1) != LUA_TSTRING
                && lua_type(L, -1) != LUA_TNUMBER)
            {
                luaL_error(L, "Bad http request body");
            }
            size_t n;
            const char *s = lua_tolstring(L, -1, &n);
            spec->has_body = true;
            spec->body = poolCopy(L, r->pool, s, n);
        }
        lua_pop(L, 1);

        spec->forward_body = optionFlag(L, opts, "always_forward_body");
        spec->share_vars = optionFlag(L, opts, "share_all_vars");
        spec->copy_vars = optionFlag(L, opts, "copy_all_vars");

        lua_getfield(L, opts, "vars");
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
        } else if (!lua_istable(L, -1)) {
            luaL_error(L, "Bad vars option value");
        } else {
            spec->vars = lua_gettop(L);
        }

        lua_getfield(L, opts, "ctx");
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
        } else if (!lua_istable(L, -1)) {
            luaL_error(L, "Bad ctx option value type %s, expected a Lua "
                          "table", luaL_typename(L, -1));
        } else {
            spec->ctx = lua_gettop(L);
        }
    }

    spec->uri = poolCopy(L, r->pool, path.data(), path.size());
    spec->args = poolCopy(L, r->pool, args.data(), args.size());
    ngx_uint_t flags = 0;
    if (ngx_http_parse_unsafe_uri(r, &spec->uri, &spec->args, &flags)
        != NGX_OK
        // Decoded ("%0D%0A"), CR and LF would be the subrequest's $uri,
        // which proxy_set_header may send (docs/compatibility.md).
        || std::memchr(spec->uri.data, '\r', spec->uri.len)
        || std::memchr(spec->uri.data, '\n', spec->uri.len))
    {
        luaL_error(L, "unsafe uri in argument #1: %s", path.c_str());
    }
    // The query string (which a decoded "%3F" in the path may have
    // replaced) goes into the subrequest's request line (a proxy_pass
    // sends it): escaped as ngx.req.set_uri_args escapes a string.
    // lua-nginx-module passes it raw (docs/compatibility.md).
    std::string escaped = codec::escapeArgsString(
        reinterpret_cast<const char *>(spec->args.data), spec->args.len);
    if (escaped.size() != spec->args.len) {
        spec->args = poolCopy(L, r->pool, escaped.data(), escaped.size());
    }
}

bool headerIs(const ngx_table_elt_t *h, const char *name)
{
    size_t n = std::strlen(name);
    return h->key.len == n
           && ngx_strncasecmp(h->key.data,
                              reinterpret_cast<u_char *>(
                                  const_cast<char *>(name)),
                              n) == 0;
}

// Gives the subrequest its own header list whose framing describes exactly
// the body it carries (`len`, or none when -1): a Content-Length or
// Transfer-Encoding inherited from the parent could make a proxied
// subrequest's body read as a second request (CVE-2020-11724).
bool setFraming(ngx_http_request_t *sr, off_t len)
{
    ngx_list_t fresh;
    if (ngx_list_init(&fresh, sr->pool, 20, sizeof(ngx_table_elt_t))
        != NGX_OK)
    {
        return false;
    }
    for (ngx_list_part_t *part = &sr->headers_in.headers.part; part;
         part = part->next)
    {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; i++) {
            if (h[i].hash == 0 || headerIs(&h[i], "Content-Length")
                || headerIs(&h[i], "Transfer-Encoding"))
            {
                continue;
            }
            auto *e = static_cast<ngx_table_elt_t *>(ngx_list_push(&fresh));
            if (e == nullptr) {
                return false;
            }
            *e = h[i];
        }
    }
    sr->headers_in.content_length = nullptr;
    sr->headers_in.transfer_encoding = nullptr;
    sr->headers_in.chunked = 0;
    sr->headers_in.content_length_n = len;
    if (len >= 0) {
        auto *e = static_cast<ngx_table_elt_t *>(ngx_list_push(&fresh));
        auto *v = static_cast<u_char *>(ngx_pnalloc(sr->pool,
                                                    NGX_OFF_T_LEN));
        if (e == nullptr || v == nullptr) {
            return false;
        }
        ngx_str_set(&e->key, "Content-Length");
        e->lowcase_key = reinterpret_cast<u_char *>(
            const_cast<char *>("content-length"));
        // The real hash: proxy_pass finds the headers it replaces by it.
        e->hash = ngx_hash_key(e->lowcase_key, e->key.len);
        e->value.data = v;
        e->value.len = ngx_sprintf(v, "%O", len) - v;
        sr->headers_in.content_length = e;
    }
    sr->headers_in.headers = fresh;
    // The copy's `last` still points at the local `fresh.part` while the
    // list has one part: a later push (ngx.req.set_header in the
    // subrequest) would write through a dead stack frame.
    if (fresh.last == &fresh.part) {
        sr->headers_in.headers.last = &sr->headers_in.headers.part;
    }
    return true;
}

off_t bodyLength(ngx_http_request_body_t *rb)
{
    off_t n = 0;
    for (ngx_chain_t *cl = rb->bufs; cl; cl = cl->next) {
        n += ngx_buf_size(cl->buf);
    }
    return n;
}

bool attachBody(ngx_http_request_t *r, ngx_http_request_t *sr,
                const Spec &spec)
{
    if (spec.has_body) {
        auto *rb = static_cast<ngx_http_request_body_t *>(
            ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t)));
        ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
        auto *b = static_cast<ngx_buf_t *>(ngx_calloc_buf(r->pool));
        if (rb == nullptr || cl == nullptr || b == nullptr) {
            return false;
        }
        b->start = b->pos = spec.body.data;
        b->end = b->last = spec.body.data + spec.body.len;
        b->temporary = 1;
        b->last_buf = 1;
        cl->buf = b;
        cl->next = nullptr;
        rb->bufs = cl;
        rb->buf = b;
        rb->rest = 0;
        sr->request_body = rb;
        return setFraming(sr, static_cast<off_t>(spec.body.len));
    }
    bool inherit = spec.forward_body || spec.method->id == NGX_HTTP_POST
                   || spec.method->id == NGX_HTTP_PUT;
    if (inherit && r->request_body && r->request_body->rest == 0) {
        sr->request_body = r->request_body;
        return setFraming(sr, bodyLength(r->request_body));
    }
    sr->request_body = nullptr;
    if (r->headers_in.content_length || r->headers_in.transfer_encoding
        || r->headers_in.content_length_n >= 0 || r->headers_in.chunked)
    {
        return setFraming(sr, -1);
    }
    return true;
}

// vars = {name = value}: set in the subrequest like ngx.var.name = value.
void setVars(lua_State *L, ngx_http_request_t *sr, int vars)
{
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_get_module_main_conf(sr, ngx_http_core_module));
    lua_pushnil(L);
    while (lua_next(L, vars)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            luaL_error(L, "attempt to use a non-string key in the "
                          "\"vars\" option table");
        }
        size_t len;
        const char *name = lua_tolstring(L, -2, &len);
        auto *low = static_cast<u_char *>(ngx_pnalloc(sr->pool, len + 1));
        if (low == nullptr) {
            luaL_error(L, "no memory");
        }
        ngx_uint_t hash = ngx_hash_strlow(low, reinterpret_cast<u_char *>(
                                                   const_cast<char *>(name)),
                                          len);
        auto *v = static_cast<ngx_http_variable_t *>(
            ngx_hash_find(&cmcf->variables_hash, hash, low, len));
        if (v == nullptr || !(v->flags & NGX_HTTP_VAR_CHANGEABLE)) {
            std::string shown;
            appendLogEscaped(shown, name, len);
            ngx_log_error(NGX_LOG_ERR, sr->connection->log, 0,
                          "variable \"%s\" cannot be assigned a value "
                          "(maybe you forgot to define it first?) ",
                          shown.c_str());
            luaL_error(L, "failed to adjust the subrequest: -1");
        }
        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER) {
            luaL_error(L, "Bad variable value type: %s",
                       luaL_typename(L, -1));
        }
        size_t vlen;
        const char *val = lua_tolstring(L, -1, &vlen);
        auto *vv = static_cast<ngx_http_variable_value_t *>(
            ngx_pcalloc(sr->pool, sizeof(ngx_http_variable_value_t)));
        if (vv == nullptr) {
            luaL_error(L, "no memory");
        }
        // Escaped as ngx.var.x = ... escapes it: it may reach a header.
        ngx_str_t data;
        if (!glue::copyVariableValue(sr->pool, name, len, val, vlen, &data)) {
            luaL_error(L, "no memory");
        }
        vv->data = data.data;
        vv->len = data.len;
        vv->valid = 1;
        if (v->set_handler) {
            v->set_handler(sr, vv, v->data);
        } else if (v->flags & NGX_HTTP_VAR_INDEXED) {
            sr->variables[v->index] = *vv;
        } else {
            luaL_error(L, "variable \"%s\" cannot be assigned a value",
                       name);
        }
        lua_pop(L, 1);
    }
}

// The subrequest's variables: its own (the default), a copy of the
// parent's, or the parent's very array (share_all_vars).
bool setupVars(ngx_http_request_t *r, ngx_http_request_t *sr,
               const Spec &spec)
{
    if (spec.share_vars) {
        sr->variables = r->variables;
        return true;
    }
    auto *cmcf = static_cast<ngx_http_core_main_conf_t *>(
        ngx_http_get_module_main_conf(r, ngx_http_core_module));
    size_t size = cmcf->variables.nelts * sizeof(ngx_http_variable_value_t);
    auto *vars = static_cast<ngx_http_variable_value_t *>(
        ngx_pcalloc(r->pool, size ? size : 1));
    if (vars == nullptr) {
        return false;
    }
    if (spec.copy_vars && size) {
        ngx_memcpy(vars, r->variables, size);
    }
    sr->variables = vars;
    return true;
}

void pushStr(lua_State *L, const ngx_str_t &s)
{
    lua_pushlstring(L, reinterpret_cast<const char *>(s.data), s.len);
}

void pushHeaders(lua_State *L, ngx_http_request_t *sr)
{
    lua_newtable(L);
    int t = lua_gettop(L);
    ngx_http_headers_out_t &ho = sr->headers_out;
    for (ngx_list_part_t *part = &ho.headers.part; part; part = part->next) {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; i++) {
            if (h[i].hash == 0) {
                continue;
            }
            pushStr(L, h[i].key);
            pushStr(L, h[i].value);
            addMultiValue(L, t);
        }
    }
    // Fields nginx keeps outside the list until its header filter, which
    // never runs for subrequests.
    if (ho.content_type.len) {
        lua_pushliteral(L, "Content-Type");
        if (ho.charset.len) {
            std::string v(reinterpret_cast<char *>(ho.content_type.data),
                          ho.content_type.len);
            v += "; charset=";
            v.append(reinterpret_cast<char *>(ho.charset.data),
                     ho.charset.len);
            lua_pushlstring(L, v.data(), v.size());
        } else {
            pushStr(L, ho.content_type);
        }
        lua_rawset(L, t);
    }
    if (ho.last_modified == nullptr && ho.last_modified_time != -1) {
        u_char buf[sizeof("Mon, 28 Sep 1970 06:00:00 GMT")];
        u_char *end = ngx_http_time(buf, ho.last_modified_time);
        lua_pushliteral(L, "Last-Modified");
        lua_pushlstring(L, reinterpret_cast<char *>(buf), end - buf);
        lua_rawset(L, t);
    }
    if (ho.content_length == nullptr && ho.content_length_n >= 0) {
        lua_pushliteral(L, "Content-Length");
        lua_pushfstring(L, "%d", static_cast<int>(ho.content_length_n));
        lua_rawset(L, t);
    }
}

void pushResult(lua_State *L, subreq::Capture *cap)
{
    lua_createtable(L, 0, 4);
    lua_pushinteger(L, cap->status);
    lua_setfield(L, -2, "status");
    pushHeaders(L, cap->sr);
    lua_setfield(L, -2, "header");
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (ngx_chain_t *cl = cap->body; cl; cl = cl->next) {
        luaL_addlstring(&b, reinterpret_cast<char *>(cl->buf->pos),
                        cl->buf->last - cl->buf->pos);
    }
    luaL_pushresult(&b);
    lua_setfield(L, -2, "body");
    // As lua-nginx-module: a body that never reached its end (an error,
    // a broken upstream, but also a bodiless error status) is truncated.
    bool truncated = cap->failed || !cap->eof;
    lua_pushboolean(L, truncated);
    lua_setfield(L, -2, "truncated");
}

void deliver(subreq::Batch *b)
{
    LuaThread *t = b->thread;
    b->thread = nullptr;
    t->cancel = nullptr;
    t->cancel_data = nullptr;
    entry::resume(t, [b](lua_State *co) {
        if (!lua_checkstack(co, b->n + 10)) {
            // Not below LUAI_MAXCSTACK subrequests (nginx allows 50).
            lua_pushnil(co);
            return 1;
        }
        for (int i = 0; i < b->n; i++) {
            pushResult(co, &b->caps[i]);
        }
        return b->n;
    });
}

void cancelWait(LuaThread *t)
{
    subreq::cancel(static_cast<subreq::Batch *>(t->cancel_data));
    t->cancel_data = nullptr;
}

// Issues the subrequests described by the array at stack index `list`
// and suspends the calling thread until they are all done.
int issue(lua_State *L, int list)
{
    glue::checkPhase(L, kCapturePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    LuaThread *t = threads::current();
    if (t == nullptr) {
        return luaL_error(L, "no request found");
    }
    ngx_http_request_t *r = ctx->r;
    int n = static_cast<int>(lua_objlen(L, list));
    if (n == 0) {
        return luaL_error(L, "at least one subrequest should be specified");
    }
    if (!lua_checkstack(L, 4 * n + 20)) {
        return luaL_error(L, "too many subrequests");
    }

    auto *specs = static_cast<Spec *>(ngx_pcalloc(r->pool, n * sizeof(Spec)));
    auto *b = static_cast<subreq::Batch *>(
        ngx_pcalloc(r->pool, sizeof(subreq::Batch)));
    auto *caps = static_cast<subreq::Capture *>(
        ngx_pcalloc(r->pool, n * sizeof(subreq::Capture)));
    if (specs == nullptr || b == nullptr || caps == nullptr) {
        return luaL_error(L, "no memory");
    }

    // All arguments are checked before any subrequest starts.
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, list, i + 1);
        int item = lua_gettop(L);
        if (!lua_istable(L, item)) {
            return luaL_error(L, "the query argument %d is not a table, "
                                 "but a %s", i, luaL_typename(L, item));
        }
        readSpec(L, r, item, i, &specs[i]);
    }

    b->caps = caps;
    b->n = n;
    b->deliver = deliver;
    b->wake.log = r->connection->log;
    for (int i = 0; i < n; i++) {
        const Spec &spec = specs[i];
        subreq::Capture *cap = &caps[i];
        subreq::prepare(b, cap);
        if (!subreq::watch(cap, ctx)) {
            // Fail closed: a subrequest the egress policy cannot follow
            // is not issued.
            return luaL_error(L, "failed to issue subrequest: %d (egress "
                                 "policy unavailable)",
                              static_cast<int>(i + 1));
        }
        ngx_str_t uri = spec.uri;
        ngx_str_t args = spec.args;
        ngx_http_request_t *sr;
        // No query string at all ($args is nil), not an empty one.
        if (ngx_http_subrequest(r, &uri, args.len ? &args : nullptr, &sr,
                                &cap->ps,
                                NGX_HTTP_SUBREQUEST_BACKGROUND)
            != NGX_OK)
        {
            // Those already started finish without a waiter.
            return luaL_error(L, "failed to issue subrequest: %d",
                              static_cast<int>(i + 1));
        }
        cap->sr = sr;
        b->pending++;

        sr->method = spec.method->id;
        sr->method_name.data = reinterpret_cast<u_char *>(
            const_cast<char *>(spec.method->name));
        sr->method_name.len = std::strlen(spec.method->name);
        sr->header_only = spec.method->id == NGX_HTTP_HEAD;

        if (!setupVars(r, sr, spec) || !attachBody(r, sr, spec)) {
            return luaL_error(L, "no memory");
        }
        if (spec.vars) {
            setVars(L, sr, spec.vars);
        }
        if (spec.ctx) {
            // The table lives in this VM's registry: the subrequest's
            // context starts in this VM too, and drops the table if its
            // location runs in another (glue::ensureCtx).
            RequestCtx *sctx = createCtx(sr, ctx->vm);
            if (sctx == nullptr) {
                return luaL_error(L, "no memory");
            }
            lua_pushvalue(L, spec.ctx);
            sctx->ctx_cell = ctx->vm->hold(L);
        }
    }

    b->thread = t;
    t->cancel = cancelWait;
    t->cancel_data = b;
    return glue::yield(L);
}

int captureMulti(lua_State *L)
{
    sandbox::require(L, sandbox::Capability::Subrequest);
    if (lua_gettop(L) != 1) {
        return luaL_error(L, "only one argument is expected, but got %d",
                          lua_gettop(L));
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    return issue(L, 1);
}

int capture(lua_State *L)
{
    sandbox::require(L, sandbox::Capability::Subrequest);
    int nargs = lua_gettop(L);
    if (nargs != 1 && nargs != 2) {
        return luaL_error(L, "expecting one or two arguments");
    }
    // capture(uri, opts) is capture_multi({{uri, opts}}).
    lua_createtable(L, 1, 0);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 1);
    if (nargs == 2) {
        lua_pushvalue(L, 2);
        lua_rawseti(L, -2, 2);
    }
    lua_rawseti(L, -2, 1);
    return issue(L, lua_gettop(L));
}

int onAbort(lua_State *L)
{
    glue::checkPhase(L, kCapturePhases);
    RequestCtx *ctx = glue::requireRequest(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (ctx->on_abort_ref != LUA_NOREF) {
        lua_pushnil(L);
        lua_pushliteral(L, "duplicate call");
        return 2;
    }
    if (!ctx->llcf->check_client_abort) {
        lua_pushnil(L);
        lua_pushliteral(L, "lua_check_client_abort is off");
        return 2;
    }
    lua_pushvalue(L, 1);
    ctx->on_abort_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushinteger(L, 1);
    return 1;
}

}  // namespace

void openLocation(lua_State *L)
{
    subTable(L, "location");
    const luaL_Reg fns[] = {{"capture", capture},
                            {"capture_multi", captureMulti},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
    lua_pushcfunction(L, onAbort);
    lua_setfield(L, -2, "on_abort");
}

}  // namespace luaguard::api
