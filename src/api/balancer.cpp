// require "ngx.balancer": the peer of each upstream try, chosen in
// balancer_by_lua (ngx/balancer.cpp holds the nginx side). A peer Lua
// chooses is judged by the location's egress policy like a cosocket's.

#include "api/api.hpp"
#include "api/socket.hpp"
#include "ngx/balancer.hpp"
#include "ngx/glue.hpp"
#include "security/egress.hpp"

namespace luaguard::api {

namespace {

// The balancer try of the running handler; null outside
// balancer_by_lua, where lua-nginx-module's functions return "no upstream
// found" (in their own result shapes) instead of raising.
balancer::State *state(lua_State *L)
{
    if (g_run == nullptr || g_run->ctx == nullptr) {
        luaL_error(L, "no request found");
    }
    return g_run->phase == Phase::Balancer ? balancer::current() : nullptr;
}

constexpr char kNoUpstream[] = "no upstream found";

int setCurrentPeer(lua_State *L)
{
    balancer::State *s = state(L);
    if (s == nullptr) {
        return pushNilErr(L, kNoUpstream);
    }
    size_t len;
    const char *addr = luaL_checklstring(L, 1, &len);
    lua_Integer port = lua_isnoneornil(L, 2) ? 0 : luaL_checkinteger(L, 2);
    if (port < 0 || port > 65535) {
        return pushNilErr(L, "invalid port");
    }

    ngx_url_t url{};
    url.url.data = reinterpret_cast<u_char *>(const_cast<char *>(addr));
    url.url.len = len;
    url.no_resolve = 1;
    // The port argument is the default: a port in the address wins, as in
    // lua-resty-core. nginx names the address with its port.
    url.default_port = static_cast<in_port_t>(port);
    if (ngx_parse_url(s->r->pool, &url) != NGX_OK) {
        std::string err = "failed to parse host name \"";
        err.append(addr, len).append("\"");
        if (url.err) {
            err.append(": ").append(url.err);
        }
        return pushNilErr(L, err.c_str());
    }
    if (url.addrs == nullptr || url.naddrs == 0) {
        return pushNilErr(L, "no host allowed");
    }

    sock::Target t;  // filled below, as far as it is read
    socklen_t sl = url.addrs[0].socklen;
    if (sl > sizeof(t.addr)) {
        return pushNilErr(L, "no host allowed");
    }
    ngx_memcpy(&t.addr, url.addrs[0].sockaddr, sl);
    t.len = sl;
    auto *sa = reinterpret_cast<struct sockaddr *>(&t.addr);
    if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) {
        t.name = url.addrs[0].name;  // in the request pool
    } else {
        t.name.data = t.text;
        t.name.len = ngx_sock_ntop(sa, t.len, t.text, sizeof(t.text), 1);
    }

    RequestCtx *ctx = g_run ? g_run->ctx : nullptr;
    if (!sock::egressCheck(ctx, "balancer", &t)) {
        return pushNilErr(L, kEgressDenied);
    }

    ngx_memcpy(&s->addr, &t.addr, t.len);
    s->socklen = t.len;
    s->name.len = ngx_min(t.name.len, sizeof(s->name_buf));
    ngx_memcpy(s->name_buf, t.name.data, s->name.len);
    s->name.data = s->name_buf;
    s->peer_set = true;
    lua_pushboolean(L, 1);
    return 1;
}

int setMoreTries(lua_State *L)
{
    balancer::State *s = state(L);
    if (s == nullptr) {
        return pushNilErr(L, kNoUpstream);
    }
    lua_Integer count = luaL_checkinteger(L, 1);
    if (count < 0) {
        return luaL_argerror(L, 1, "count must not be negative");
    }
    auto more = static_cast<ngx_uint_t>(count);
    ngx_uint_t limit = s->r->upstream->conf->next_upstream_tries;
    ngx_uint_t planned = s->tries_done + s->pc->tries;
    bool reduced = false;
    if (limit && planned + more > limit) {
        more = planned < limit ? limit - planned : 0;
        reduced = true;
    }
    s->pc->tries += more;
    lua_pushboolean(L, 1);
    if (reduced) {
        lua_pushliteral(L, "reduced tries due to limit");
        return 2;
    }
    return 1;
}

int getLastFailure(lua_State *L)
{
    balancer::State *s = state(L);
    if (s == nullptr) {
        lua_pushnil(L);
        lua_pushnil(L);
        lua_pushstring(L, kNoUpstream);
        return 3;
    }
    if (s->tries_done == 0 || s->last_state == 0) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushstring(L, s->last_state == NGX_PEER_FAILED ? "failed" : "next");
    // nginx fills a try's status once its peer is freed; this try's own
    // state is the last element, the failed one the element before.
    ngx_array_t *states = s->r->upstream_states;
    ngx_uint_t status = 0;
    if (states && states->nelts >= 2) {
        status = static_cast<ngx_http_upstream_state_t *>(
            states->elts)[states->nelts - 2].status;
    }
    lua_pushinteger(L, static_cast<lua_Integer>(status));
    return 2;
}

// A timeout argument in seconds: nil keeps the configured one.
bool timeoutArg(lua_State *L, int idx, const char *what, ngx_msec_t *out)
{
    if (lua_isnoneornil(L, idx)) {
        return false;
    }
    lua_Number v = lua_isnumber(L, idx) ? lua_tonumber(L, idx) : -1;
    auto ms = static_cast<ngx_msec_t>(v * 1000);
    if (!(v > 0) || ms == 0) {
        luaL_where(L, 1);
        lua_pushfstring(L, "bad %s timeout", what);
        lua_concat(L, 2);
        lua_error(L);
    }
    *out = ms;
    return true;
}

int setTimeouts(lua_State *L)
{
    balancer::State *s = state(L);
    ngx_msec_t c = 0, w = 0, r = 0;
    bool has_c = timeoutArg(L, 1, "connect", &c);
    bool has_w = timeoutArg(L, 2, "send", &w);
    bool has_r = timeoutArg(L, 3, "read", &r);
    if (s == nullptr) {
        lua_pushboolean(L, 0);
        lua_pushstring(L, kNoUpstream);
        return 2;
    }
    ngx_http_upstream_t *u = s->r->upstream;
    if (!s->conf_copied) {
        // The location's upstream configuration is shared by every
        // request: this request gets its own copy.
        auto *conf = static_cast<ngx_http_upstream_conf_t *>(
            ngx_palloc(s->r->pool, sizeof(ngx_http_upstream_conf_t)));
        if (conf == nullptr) {
            return pushNilErr(L, "no memory");
        }
        *conf = *u->conf;
        u->conf = conf;
        s->conf_copied = true;
    }
    if (has_c) {
        u->conf->connect_timeout = c;
    }
    if (has_w) {
        u->conf->send_timeout = w;
    }
    if (has_r) {
        u->conf->read_timeout = r;
    }
    lua_pushboolean(L, 1);
    return 1;
}

int recreateRequest(lua_State *L)
{
    balancer::State *s = state(L);
    if (s == nullptr) {
        return pushNilErr(L, kNoUpstream);
    }
    ngx_http_request_t *r = s->r;
    ngx_http_upstream_t *u = r->upstream;
    if (u->create_request == nullptr || r->request_body_no_buffering) {
        return pushNilErr(L, "failed to recreate the upstream request");
    }
    // create_request takes the body chain from u->request_bufs, which now
    // holds the previous request's header in front of it.
    u->request_bufs = r->request_body ? r->request_body->bufs : nullptr;
    if (u->create_request(r) != NGX_OK) {
        return pushNilErr(L, "failed to recreate the upstream request");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int openModule(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"set_current_peer", setCurrentPeer},
        {"set_more_tries", setMoreTries},
        {"get_last_failure", getLastFailure},
        {"set_timeouts", setTimeouts},
        {"recreate_request", recreateRequest},
        {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

void openBalancer(lua_State *L)
{
    preload(L, "ngx.balancer", openModule);
}

}  // namespace luaguard::api
