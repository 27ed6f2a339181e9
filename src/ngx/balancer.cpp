// balancer_by_lua: see balancer.hpp.

#include "ngx/balancer.hpp"

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"

namespace luaguard::balancer {

namespace {

// The handler runs to completion without yielding, so one at a time.
State *g_current = nullptr;

SrvConf *srvConf(ngx_http_upstream_srv_conf_t *us)
{
    return static_cast<SrvConf *>(
        us->srv_conf[ngx_http_luaguard_module.ctx_index]);
}

ngx_int_t getPeer(ngx_peer_connection_t *pc, void *data)
{
    auto *s = static_cast<State *>(data);
    ngx_http_request_t *r = s->r;
    s->pc = pc;
    s->peer_set = false;
    s->exited = false;

    RequestCtx *ctx = glue::ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_ERROR;
    }
    State *prev = g_current;
    g_current = s;
    ngx_int_t rc = glue::runSync(ctx, Phase::Balancer, s->handler, pc->log,
                                 0);
    g_current = prev;
    s->tries_done++;
    if (rc != NGX_OK) {
        return NGX_ERROR;
    }
    if (s->exited && glue::exitFails(s->exit_code)) {
        return NGX_ERROR;
    }
    if (!s->peer_set) {
        s->ours = false;
        return s->orig_get(pc, s->orig_data);
    }
    s->ours = true;
    pc->sockaddr = reinterpret_cast<struct sockaddr *>(&s->addr);
    pc->socklen = s->socklen;
    pc->name = &s->name;
    pc->cached = 0;
    pc->connection = nullptr;
    return NGX_OK;
}

void freePeer(ngx_peer_connection_t *pc, void *data, ngx_uint_t state)
{
    auto *s = static_cast<State *>(data);
    if (state & (NGX_PEER_FAILED | NGX_PEER_NEXT)) {
        s->last_state = state & NGX_PEER_FAILED ? NGX_PEER_FAILED
                                                : NGX_PEER_NEXT;
    }
    if (!s->ours) {
        s->orig_free(pc, s->orig_data, state);
        return;
    }
    // What round robin does for its own peers: one try fewer.
    if (pc->tries) {
        pc->tries--;
    }
}

ngx_int_t initPeer(ngx_http_request_t *r, ngx_http_upstream_srv_conf_t *us)
{
    SrvConf *srv = srvConf(us);
    if (srv->balancer_init_peer(r, us) != NGX_OK) {
        return NGX_ERROR;
    }
    auto *s = static_cast<State *>(ngx_pcalloc(r->pool, sizeof(State)));
    if (s == nullptr) {
        return NGX_ERROR;
    }
    ngx_http_upstream_t *u = r->upstream;
    s->r = r;
    s->handler = srv->balancer;
    s->orig_data = u->peer.data;
    s->orig_get = u->peer.get;
    s->orig_free = u->peer.free;
    u->peer.data = s;
    u->peer.get = entry::edge<getPeer>;
    u->peer.free = entry::edge<freePeer>;
    return NGX_OK;
}

ngx_int_t initUpstream(ngx_conf_t *cf, ngx_http_upstream_srv_conf_t *us)
{
    SrvConf *srv = srvConf(us);
    if (srv->balancer_init_upstream(cf, us) != NGX_OK) {
        return NGX_ERROR;
    }
    srv->balancer_init_peer = us->peer.init;
    us->peer.init = entry::edge<initPeer>;
    return NGX_OK;
}

}  // namespace

State *current()
{
    return g_current;
}

void recordExit(State *s, ngx_int_t code)
{
    s->exited = true;
    s->exit_code = code;
}

char *install(ngx_conf_t *cf, SrvConf *srv)
{
    auto *uscf = static_cast<ngx_http_upstream_srv_conf_t *>(
        ngx_http_conf_get_module_srv_conf(cf, ngx_http_upstream_module));
    if (uscf->peer.init_upstream) {
        ngx_conf_log_error(NGX_LOG_WARN, cf, 0,
                           "load balancing method redefined");
    }
    srv->balancer_init_upstream = uscf->peer.init_upstream
        ? uscf->peer.init_upstream : ngx_http_upstream_init_round_robin;
    uscf->peer.init_upstream = entry::edge<initUpstream>;
    uscf->flags = NGX_HTTP_UPSTREAM_CREATE | NGX_HTTP_UPSTREAM_WEIGHT
                  | NGX_HTTP_UPSTREAM_MAX_FAILS
                  | NGX_HTTP_UPSTREAM_FAIL_TIMEOUT | NGX_HTTP_UPSTREAM_DOWN
                  | NGX_HTTP_UPSTREAM_BACKUP;
    return NGX_CONF_OK;
}

}  // namespace luaguard::balancer
