// ssl_certificate_by_lua: see tls.hpp.

#include "ngx/tls.hpp"

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"

namespace luaguard::tls {

namespace {

int g_index = -1;   // SSL ex_data slot of the Handshake

void endRun(Handshake *hs, bool ok)
{
    RequestCtx *ctx = hs->ctx;
    hs->ctx = nullptr;
    hs->done = true;
    hs->ok = ok && !(ctx->exited && glue::exitFails(ctx->exit_code));
    ctx->handshake = nullptr;
    glue::destroyFake(ctx->r->connection);
}

// The code yielded and has now ended: the handshake goes on from an event
// (nginx's handshake handler calls SSL_do_handshake, which asks the
// callback again).
void runDone(RequestCtx *ctx)
{
    Handshake *hs = ctx->handshake;
    endRun(hs, !ctx->entry_failed);
    ngx_post_event(hs->c->read, &ngx_posted_events);
}

// The connection went away (client gone, handshake timeout) while the
// code waited: its fake request ends with it.
void abandon(void *data)
{
    auto *hs = static_cast<Handshake *>(data);
    if (hs->ctx) {
        hs->ctx->handshake = nullptr;
        glue::destroyFake(hs->ctx->r->connection);
        hs->ctx = nullptr;
    }
    SSL_set_ex_data(hs->ssl, g_index, nullptr);
}

int certCallback(SSL *ssl, void *)
{
    auto *c = static_cast<ngx_connection_t *>(ngx_ssl_get_connection(ssl));
    auto *hs = static_cast<Handshake *>(SSL_get_ex_data(ssl, g_index));
    if (hs) {
        if (!hs->done) {
            return -1;   // still running: the handshake stays suspended
        }
        return hs->ok ? 1 : 0;
    }
    // The server nginx chose for the SNI name (its SSL_CTX is ours).
    auto *hc = static_cast<ngx_http_connection_t *>(c->data);
    ngx_http_conf_ctx_t *conf = hc->conf_ctx;
    auto *srv = static_cast<SrvConf *>(
        conf->srv_conf[ngx_http_luaguard_module.ctx_index]);
    if (srv->ssl_cert == nullptr) {
        return 1;
    }

    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(c->pool, 0);
    hs = static_cast<Handshake *>(ngx_pcalloc(c->pool, sizeof(Handshake)));
    if (cln == nullptr || hs == nullptr) {
        return 0;
    }
    hs->c = c;
    hs->ssl = ssl;
    RequestCtx *ctx = glue::fakeRequest(conf->main_conf, conf->srv_conf,
                                        conf->loc_conf, nullptr, c->log);
    if (ctx == nullptr) {
        return 0;
    }
    hs->ctx = ctx;
    ctx->handshake = hs;
    ctx->on_done = runDone;
    ctx->thread_phase = Phase::SslCert;
    cln->handler = entry::edge<abandon>;
    cln->data = hs;
    SSL_set_ex_data(ssl, g_index, hs);

    int rc = glue::startDetached(ctx, Phase::SslCert, srv->ssl_cert);
    if (rc < 0) {
        return -1;
    }
    endRun(hs, rc == 1);
    return hs->ok ? 1 : 0;
}

// OpenSSL sends a stapled OCSP response only when the context's status
// callback says so: the one ngx.ocsp.set_ocsp_status_resp gave the
// handshake, else whatever the callback in place (nginx's ssl_stapling)
// decides.
struct StatusChain {
    int  (*cb)(SSL *, void *);
    void  *arg;
};

int statusCallback(SSL *ssl, void *arg)
{
    unsigned char *resp = nullptr;
    if (SSL_get_tlsext_status_ocsp_resp(ssl, &resp) > 0 && resp) {
        return SSL_TLSEXT_ERR_OK;
    }
    auto *prev = static_cast<StatusChain *>(arg);
    return prev->cb ? prev->cb(ssl, prev->arg) : SSL_TLSEXT_ERR_NOACK;
}

bool installStatusHook(ngx_conf_t *cf, SSL_CTX *ctx)
{
    int (*cb)(SSL *, void *) = nullptr;
    SSL_CTX_get_tlsext_status_cb(ctx, &cb);
    if (cb == statusCallback) {
        return true;
    }
    auto *prev = static_cast<StatusChain *>(
        ngx_palloc(cf->pool, sizeof(StatusChain)));
    if (prev == nullptr) {
        return false;
    }
    prev->cb = cb;
    SSL_CTX_get_tlsext_status_arg(ctx, &prev->arg);
    SSL_CTX_set_tlsext_status_cb(ctx, statusCallback);
    SSL_CTX_set_tlsext_status_arg(ctx, prev);
    return true;
}

}  // namespace

Handshake *current()
{
    RequestCtx *ctx = g_run ? g_run->ctx : nullptr;
    return ctx ? ctx->handshake : nullptr;
}

SSL *currentSsl(ngx_connection_t **c)
{
    if (Handshake *hs = current()) {
        *c = hs->c;
        return hs->ssl;
    }
    RequestCtx *ctx = g_run ? g_run->ctx : nullptr;
    if (ctx && !ctx->is_timer && ctx->r->connection->ssl) {
        *c = ctx->r->connection;
        return ctx->r->connection->ssl->connection;
    }
    return nullptr;
}

bool installCertHook(ngx_conf_t *cf, SrvConf *srv)
{
    if (srv->ssl_cert == nullptr) {
        return true;
    }
    auto *sscf = static_cast<ngx_http_ssl_srv_conf_t *>(
        ngx_http_conf_get_module_srv_conf(cf, ngx_http_ssl_module));
    if (sscf == nullptr || sscf->ssl.ctx == nullptr) {
        // An http-level handler applies to the servers that have TLS.
        return true;
    }
    if (g_index < 0) {
        g_index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
        if (g_index < 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "SSL_get_ex_new_index() failed");
            return false;
        }
    }
    SSL_CTX_set_cert_cb(sscf->ssl.ctx, certCallback, nullptr);
    return installStatusHook(cf, sscf->ssl.ctx);
}

}  // namespace luaguard::tls
