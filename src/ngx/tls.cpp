// The server-side TLS phases: see tls.hpp.

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

// The configuration nginx holds for the connection at this point of the
// handshake (the default server of the address until SNI picked another).
ngx_http_conf_ctx_t *confOf(ngx_connection_t *c)
{
    return static_cast<ngx_http_connection_t *>(c->data)->conf_ctx;
}

// Runs `h` for `phase` to its end in a fake request of its own, with `hs`
// as the handshake the Lua API reads. True when the code finished without
// an error or a failing ngx.exit.
bool runToEnd(ngx_connection_t *c, SSL *ssl, Phase phase, Handler *h,
              Handshake *hs)
{
    ngx_http_conf_ctx_t *conf = confOf(c);
    RequestCtx *ctx = glue::fakeRequest(conf->main_conf, conf->srv_conf,
                                        conf->loc_conf, nullptr, c->log);
    if (ctx == nullptr) {
        return false;
    }
    hs->c = c;
    hs->ssl = ssl;
    hs->ctx = ctx;
    ctx->handshake = hs;
    ctx->thread_phase = phase;
    ngx_int_t rc = glue::runSync(ctx, phase, h, c->log, 0);
    bool ok = rc == NGX_OK
              && !(ctx->exited && glue::exitFails(ctx->exit_code));
    // Whatever the code kept (a timer's closure, a global) finds no
    // handshake behind the API from now on.
    ctx->handshake = nullptr;
    hs->ctx = nullptr;
    hs->done = true;
    glue::destroyFake(ctx->r->connection);
    return ok;
}

MainConf *mainConfOf(ngx_connection_t *c)
{
    return static_cast<MainConf *>(
        confOf(c)->main_conf[ngx_http_luaguard_module.ctx_index]);
}

// ssl_session_fetch_by_lua: the session the code found for the ID the
// client offers, or none (a full handshake follows).
SSL_SESSION *getSession(SSL *ssl, const unsigned char *id, int len,
                        int *copy)
{
    *copy = 0;   // the session returned is OpenSSL's from now on
    auto *c = static_cast<ngx_connection_t *>(ngx_ssl_get_connection(ssl));
    MainConf *mcf = mainConfOf(c);
    if (mcf->ssl_sess_fetch == nullptr || len <= 0) {
        return nullptr;
    }
    Handshake hs{};
    hs.sess_id = id;
    hs.sess_id_len = static_cast<unsigned>(len);
    bool ok = runToEnd(c, ssl, Phase::SslSessionFetch, mcf->ssl_sess_fetch,
                       &hs);
    if (!ok && hs.session) {
        SSL_SESSION_free(hs.session);
        hs.session = nullptr;
    }
    return hs.session;
}

// ssl_session_store_by_lua: a full handshake made a new session.
int newSession(SSL *ssl, SSL_SESSION *sess)
{
    auto *c = static_cast<ngx_connection_t *>(ngx_ssl_get_connection(ssl));
    MainConf *mcf = mainConfOf(c);
    if (mcf->ssl_sess_store != nullptr) {
        Handshake hs{};
        hs.session = sess;
        runToEnd(c, ssl, Phase::SslSessionStore, mcf->ssl_sess_store, &hs);
    }
    return 0;   // no reference kept: the code copied what it wanted
}

// ssl_client_hello_by_lua, before anything of the hello is acted on.
int clientHello(SSL *ssl, int *alert, void *)
{
    auto *c = static_cast<ngx_connection_t *>(ngx_ssl_get_connection(ssl));
    auto *srv = static_cast<SrvConf *>(
        confOf(c)->srv_conf[ngx_http_luaguard_module.ctx_index]);
    if (srv->ssl_client_hello == nullptr) {
        return SSL_CLIENT_HELLO_SUCCESS;
    }
    Handshake hs{};
    if (runToEnd(c, ssl, Phase::SslClientHello, srv->ssl_client_hello,
                 &hs))
    {
        return SSL_CLIENT_HELLO_SUCCESS;
    }
    *alert = SSL_AD_INTERNAL_ERROR;
    return SSL_CLIENT_HELLO_ERROR;
}

bool ensureIndex(ngx_conf_t *cf)
{
    if (g_index < 0) {
        g_index = SSL_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
        if (g_index < 0) {
            ngx_conf_log_error(NGX_LOG_EMERG, cf, 0,
                               "SSL_get_ex_new_index() failed");
            return false;
        }
    }
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

bool installHooks(ngx_conf_t *cf, SrvConf *srv)
{
    auto *sscf = static_cast<ngx_http_ssl_srv_conf_t *>(
        ngx_http_conf_get_module_srv_conf(cf, ngx_http_ssl_module));
    if (sscf == nullptr || sscf->ssl.ctx == nullptr) {
        // An http-level handler applies to the servers that have TLS.
        return true;
    }
    SSL_CTX *ctx = sscf->ssl.ctx;
    auto *mcf = static_cast<MainConf *>(
        ngx_http_conf_get_module_main_conf(cf, ngx_http_luaguard_module));
    if (srv->ssl_cert) {
        if (!ensureIndex(cf)) {
            return false;
        }
        SSL_CTX_set_cert_cb(ctx, certCallback, nullptr);
        if (!installStatusHook(cf, ctx)) {
            return false;
        }
    }
    if (srv->ssl_client_hello) {
        SSL_CTX_set_client_hello_cb(ctx, clientHello, nullptr);
    }
    // OpenSSL asks the session callbacks of the SSL_CTX the connection
    // started with (the default server's), whatever SNI picks later:
    // every server carries them. The Lua code is the cache: OpenSSL's
    // own is not looked in first.
    if (mcf->ssl_sess_fetch) {
        SSL_CTX_sess_set_get_cb(ctx, getSession);
        SSL_CTX_set_session_cache_mode(
            ctx, SSL_CTX_get_session_cache_mode(ctx)
                 | SSL_SESS_CACHE_NO_INTERNAL_LOOKUP);
    }
    if (mcf->ssl_sess_store) {
        SSL_CTX_sess_set_new_cb(ctx, newSession);
    }
    return true;
}

}  // namespace luaguard::tls
