// Shared cosocket plumbing: see api/socket.hpp.

#include "api/socket.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <algorithm>
#include <cctype>
#include <cstring>

#include "ngx/entry.hpp"
#include "ngx/metrics.hpp"
#include "security/egress.hpp"
#include "security/log_escape.hpp"

namespace luaguard::api::sock {

namespace {

void setName(Target *t)
{
    size_t n = ngx_sock_ntop(reinterpret_cast<struct sockaddr *>(&t->addr),
                             t->len, t->text, sizeof(t->text) - 1, 1);
    t->name.data = t->text;
    t->name.len = n;
}

void resolved(ngx_resolver_ctx_t *rctx)
{
    auto *res = static_cast<Resolve *>(rctx->data);
    res->rctx = nullptr;
    if (rctx->state) {
        // Same shape as lua-nginx-module: name (code: text).
        res->err.assign(reinterpret_cast<char *>(rctx->name.data),
                        rctx->name.len);
        res->err += " could not be resolved (";
        res->err += std::to_string(rctx->state);
        res->err += ": ";
        res->err += reinterpret_cast<const char *>(
            ngx_resolver_strerror(rctx->state));
        res->err += ")";
    } else if (rctx->naddrs == 0) {
        res->err = "name resolved to no address";
    } else {
        // Several addresses: one at random, as documented.
        ngx_uint_t i = rctx->naddrs > 1
                           ? static_cast<ngx_uint_t>(ngx_random())
                                 % rctx->naddrs
                           : 0;
        ngx_resolver_addr_t *a = &rctx->addrs[i];
        Target *t = res->target;
        std::memcpy(&t->addr, a->sockaddr, a->socklen);
        t->len = a->socklen;
        ngx_inet_set_port(reinterpret_cast<struct sockaddr *>(&t->addr),
                          res->port);
        setName(t);
    }
    ngx_resolve_name_done(rctx);
    res->finished = true;
    if (!res->sync) {
        res->done(res);
    }
}

}  // namespace

bool literal(const char *host, size_t len, in_port_t port, Target *t)
{
    if (len >= 5 && std::memcmp(host, "unix:", 5) == 0) {
        auto *sun = reinterpret_cast<struct sockaddr_un *>(&t->addr);
        size_t plen = len - 5;
        std::memset(sun, 0, sizeof(*sun));
        sun->sun_family = AF_UNIX;
        if (plen >= sizeof(sun->sun_path)) {
            plen = sizeof(sun->sun_path) - 1;
        }
        std::memcpy(sun->sun_path, host + 5, plen);
        t->len = static_cast<socklen_t>(offsetof(struct sockaddr_un, sun_path)
                                        + plen + 1);
        // The name nginx and we log ("connect() to unix:... failed"):
        // the path is the script's, escaped.
        std::string name;
        appendLogEscaped(name, host, len);
        size_t n = std::min(name.size(), sizeof(t->text) - 1);
        std::memcpy(t->text, name.data(), n);
        t->name.data = t->text;
        t->name.len = n;
        return true;
    }
    char buf[64];
    if (len == 0 || len >= sizeof(buf)) {
        return false;
    }
    std::memcpy(buf, host, len);
    buf[len] = '\0';
    // "[::1]" as nginx writes IPv6 hosts.
    char *h = buf;
    if (len > 2 && buf[0] == '[' && buf[len - 1] == ']') {
        buf[len - 1] = '\0';
        h = buf + 1;
    }
    std::memset(&t->addr, 0, sizeof(t->addr));
    auto *sin = reinterpret_cast<struct sockaddr_in *>(&t->addr);
    auto *sin6 = reinterpret_cast<struct sockaddr_in6 *>(&t->addr);
    if (inet_pton(AF_INET, h, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons(port);
        t->len = sizeof(*sin);
    } else if (inet_pton(AF_INET6, h, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(port);
        t->len = sizeof(*sin6);
    } else {
        return false;
    }
    setName(t);
    return true;
}

bool resolveStart(ngx_http_request_t *r, Resolve *res, const char *host,
                  size_t len, in_port_t port, Target *t)
{
    res->err.clear();
    res->finished = false;
    res->target = t;
    res->port = port;
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    ngx_resolver_ctx_t temp;
    ngx_memzero(&temp, sizeof(temp));
    temp.name.data = reinterpret_cast<u_char *>(const_cast<char *>(host));
    temp.name.len = len;
    ngx_resolver_ctx_t *rctx = nullptr;
    if (clcf->resolver) {
        rctx = ngx_resolve_start(clcf->resolver, &temp);
    }
    if (clcf->resolver == nullptr || rctx == NGX_NO_RESOLVER) {
        res->err = "no resolver defined to resolve \"";
        res->err.append(host, len);
        res->err += "\"";
        return true;
    }
    if (rctx == nullptr) {
        res->err = "failed to start the resolver";
        return true;
    }
    rctx->name.data = static_cast<u_char *>(ngx_palloc(r->pool, len));
    if (rctx->name.data == nullptr) {
        ngx_resolve_name_done(rctx);
        res->err = "no memory";
        return true;
    }
    std::memcpy(rctx->name.data, host, len);
    rctx->name.len = len;
    rctx->handler = entry::edge<resolved>;
    rctx->data = res;
    rctx->timeout = clcf->resolver_timeout;
    res->rctx = rctx;
    res->sync = true;
    if (ngx_resolve_name(rctx) != NGX_OK) {
        // nginx released the context itself.
        res->rctx = nullptr;
        res->sync = false;
        res->err = "failed to resolve";
        return true;
    }
    res->sync = false;
    return res->finished;
}

void resolveCancel(Resolve *res)
{
    if (res->rctx) {
        ngx_resolve_name_done(res->rctx);
        res->rctx = nullptr;
    }
}

bool takeSlot(Slot *slot, RequestCtx *ctx, const char *kind)
{
    if (slot->owner) {
        return true;
    }
    // Subrequests count against their main request: capture_multi must
    // not multiply the cap. Same pool, so the main context outlives them.
    RequestCtx *owner = ctx;
    if (ctx->r->main != ctx->r) {
        if (RequestCtx *main = getCtx(ctx->r->main)) {
            owner = main;
        }
    }
    if (owner->sockets_held >= ctx->llcf->socket_max_per_request) {
        metrics::countBudgetRefusal(ctx, metrics::BudgetRefusal::Connections);
        ngx_log_error(NGX_LOG_ERR, ctx->r->connection->log, 0,
                      "lua %s socket: too many connections: the request "
                      "holds %ui (lua_socket_max_per_request)", kind,
                      owner->sockets_held);
        return false;
    }
    owner->sockets_held++;
    slot->owner = owner;
    return true;
}

void dropSlot(Slot *slot)
{
    if (slot->owner) {
        slot->owner->sockets_held--;
        slot->owner = nullptr;
    }
}

bool egressCheck(RequestCtx *ctx, const char *what, Target *t)
{
    std::string why;
    const egress::Policy *loc = ctx ? ctx->llcf->egress : nullptr;
    auto *sa = reinterpret_cast<struct sockaddr *>(&t->addr);
    bool ok;
    if (sa->sa_family == AF_UNIX) {
        auto *sun = reinterpret_cast<struct sockaddr_un *>(sa);
        std::string resolved;
        ok = egressAllowedUnix(loc, sun->sun_path,
                               strnlen(sun->sun_path, sizeof(sun->sun_path)),
                               &resolved, &why);
        if (ok && resolved.size() >= sizeof(sun->sun_path)) {
            ok = false;
            why = "resolved unix socket path too long";
        }
        if (ok) {
            // Connect to the path that was judged, not to a spelling that
            // could be re-resolved differently.
            std::memset(sun->sun_path, 0, sizeof(sun->sun_path));
            std::memcpy(sun->sun_path, resolved.data(), resolved.size());
            t->len = static_cast<socklen_t>(
                offsetof(struct sockaddr_un, sun_path) + resolved.size() + 1);
        }
    } else {
        ok = egressAllowed(loc, sa, t->len, &why);
    }
    if (!ok) {
        metrics::countEgressRefusal(ctx);
        std::string name;
        appendLogEscaped(name, reinterpret_cast<char *>(t->name.data),
                         t->name.len);
        ngx_log_error(NGX_LOG_ERR,
                      ctx ? ctx->r->connection->log : ngx_cycle->log, 0,
                      "lua %s: connection to %s refused by the egress "
                      "policy (%s)", what, name.c_str(), why.c_str());
    }
    return ok;
}

std::string errnoText(ngx_err_t err)
{
    if (err == NGX_ETIMEDOUT) {
        return "timeout";
    }
    std::string s = std::strerror(err);
    if (!s.empty()) {
        s[0] = static_cast<char>(std::tolower(static_cast<u_char>(s[0])));
    }
    return s;
}

ngx_int_t connectPeer(ngx_peer_connection_t *pc, Target *t, int type,
                      ngx_addr_t *local, ngx_log_t *log, bool log_errors,
                      std::string *err)
{
    ngx_memzero(pc, sizeof(*pc));
    pc->sockaddr = reinterpret_cast<struct sockaddr *>(&t->addr);
    pc->socklen = t->len;
    pc->name = &t->name;
    pc->get = ngx_event_get_peer;
    pc->log = log;
    // ECONNRESET and friends at "error", never as alerts.
    pc->log_error = log_errors ? NGX_ERROR_ERR : NGX_ERROR_INFO;
    pc->type = type;
    pc->local = local;
    ngx_set_socket_errno(0);
    ngx_int_t rc = ngx_event_connect_peer(pc);
    if (rc == NGX_ERROR) {
        *err = "failed to create the socket";
        return NGX_ERROR;
    }
    if (rc == NGX_BUSY) {
        *err = "no live connection";
        return NGX_ERROR;
    }
    if (rc == NGX_DECLINED) {
        ngx_err_t e = ngx_socket_errno;
        *err = e ? errnoText(e) : "connection refused";
        return NGX_ERROR;
    }
    return rc;  // NGX_OK or NGX_AGAIN
}

bool flatten(lua_State *L, int idx, std::string *out, int depth)
{
    if (depth > 100) {
        return false;
    }
    // As lua-nginx-module checks them: arrays only, of strings, numbers
    // and arrays (a boolean or nil is a value only at the top level).
    // The length is the largest key, so that a hole is found and refused.
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_Number k = lua_type(L, -2) == LUA_TNUMBER ? lua_tonumber(L, -2)
                                                     : 0;
        if (k < 1 || k > static_cast<lua_Number>(INT32_MAX)
            || k != static_cast<lua_Number>(static_cast<size_t>(k)))
        {
            luaL_error(L, "bad argument #2 to '?' (non-array table found)");
        }
        n = std::max(n, static_cast<size_t>(k));
        lua_pop(L, 1);
    }
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, static_cast<int>(i));
        int type = lua_type(L, -1);
        if (type == LUA_TSTRING || type == LUA_TNUMBER) {
            size_t len;
            const char *p = lua_tolstring(L, -1, &len);
            out->append(p, len);
        } else if (type == LUA_TTABLE) {
            if (!flatten(L, lua_gettop(L), out, depth + 1)) {
                lua_pop(L, 1);
                return false;
            }
        } else {
            luaL_error(L, "bad argument #2 to '?' (bad data type %s found)",
                       lua_typename(L, type));
        }
        lua_pop(L, 1);
    }
    return true;
}

void closeConnection(ngx_connection_t *c)
{
    ngx_pool_t *pool = c->pool;  // TLS state lives there
#if (NGX_SSL)
    if (c->ssl) {
        c->ssl->no_wait_shutdown = 1;
        c->ssl->no_send_shutdown = 0;
        (void) ngx_ssl_shutdown(c);
    }
#endif
    ngx_close_connection(c);
    if (pool) {
        ngx_destroy_pool(pool);
    }
}

}  // namespace luaguard::api::sock
