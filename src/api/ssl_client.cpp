// TLS on cosockets: the client contexts of the lua_ssl_* directives (made
// while the configuration is read when they name files), tcpsock:
// sslhandshake with session reuse, and setclientcert. The server side of
// TLS (the handshake phases) is src/ngx/tls.cpp with ngx.ssl in
// api/ssl.cpp; the socket itself is api/socket_tcp.cpp.

#include <openssl/pem.h>
#include <openssl/ssl.h>

#include <cstring>
#include <string>

#include "api/api.hpp"
#include "api/socket_tcp.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"
#include "ngx/thread.hpp"
#include "security/egress.hpp"

namespace luaguard::api {
namespace tcp {

int sessionGc(lua_State *L)
{
    auto **sp = static_cast<ngx_ssl_session_t **>(lua_touserdata(L, 1));
    if (sp && *sp) {
        ngx_ssl_free_session(*sp);
        *sp = nullptr;
    }
    return 0;
}

void sslCleanup(void *data)
{
    ngx_ssl_cleanup_ctx(data);
}

// The client TLS context of a location (lua_ssl_* directives). Made
// while the configuration is read when a trusted certificate is given (the
// master can read files a worker may not), else on first use; kept for the
// life of the configuration.
// lua_ssl_crl: peers' certificates are checked against the list, the
// whole chain as nginx's ssl_crl does.
bool loadCrl(ngx_ssl_t *ssl, ngx_str_t file, ngx_pool_t *pool, ngx_log_t *log,
             ngx_str_t *prefix, std::string *err)
{
    if (ngx_get_full_name(pool, prefix, &file) != NGX_OK) {
        *err = "no memory";
        return false;
    }
    std::string path(reinterpret_cast<char *>(file.data), file.len);
    X509_STORE *store = SSL_CTX_get_cert_store(ssl->ctx);
    X509_LOOKUP *lookup = store ? X509_STORE_add_lookup(store,
                                                        X509_LOOKUP_file())
                                : nullptr;
    if (lookup == nullptr
        || X509_LOOKUP_load_file(lookup, path.c_str(), X509_FILETYPE_PEM)
               != 1)
    {
        ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                      const_cast<char *>("X509_LOOKUP_load_file(\"%s\") "
                                         "failed"), path.c_str());
        *err = "failed to load lua_ssl_crl";
        return false;
    }
    X509_STORE_set_flags(store,
                         X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    ERR_clear_error();
    return true;
}

// lua_ssl_conf_command: OpenSSL's SSL_CONF commands, as nginx's
// ssl_conf_command applies them to a server context.
bool applyConfCommands(ngx_ssl_t *ssl, ngx_array_t *commands, ngx_log_t *log,
                       std::string *err)
{
    SSL_CONF_CTX *cctx = SSL_CONF_CTX_new();
    if (cctx == nullptr) {
        *err = "SSL_CONF_CTX_new() failed";
        return false;
    }
    SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_FILE | SSL_CONF_FLAG_CLIENT
                                 | SSL_CONF_FLAG_CERTIFICATE
                                 | SSL_CONF_FLAG_SHOW_ERRORS);
    SSL_CONF_CTX_set_ssl_ctx(cctx, ssl->ctx);
    auto *kv = static_cast<ngx_keyval_t *>(commands->elts);
    bool ok = true;
    for (ngx_uint_t i = 0; ok && i < commands->nelts; i++) {
        std::string k(reinterpret_cast<char *>(kv[i].key.data), kv[i].key.len);
        std::string v(reinterpret_cast<char *>(kv[i].value.data),
                      kv[i].value.len);
        if (SSL_CONF_cmd(cctx, k.c_str(), v.c_str()) <= 0) {
            ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                          const_cast<char *>("SSL_CONF_cmd(\"%s\", \"%s\") "
                                             "failed"), k.c_str(), v.c_str());
            *err = "bad lua_ssl_conf_command \"" + k + "\"";
            ok = false;
        }
    }
    if (ok && SSL_CONF_CTX_finish(cctx) != 1) {
        *err = "SSL_CONF_CTX_finish() failed";
        ok = false;
    }
    SSL_CONF_CTX_free(cctx);
    ERR_clear_error();
    return ok;
}

ngx_ssl_t *makeSslContext(LocConf *lc, ngx_pool_t *pool, ngx_log_t *log,
                          ngx_str_t *prefix, std::string *err)
{
    auto *ssl = static_cast<ngx_ssl_t *>(ngx_pcalloc(pool,
                                                     sizeof(ngx_ssl_t)));
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(pool, 0);
    if (ssl == nullptr || cln == nullptr) {
        *err = "no memory";
        return nullptr;
    }
    ssl->log = log;
    if (ngx_ssl_create(ssl, lc->ssl_protocols, nullptr) != NGX_OK) {
        *err = "failed to create the SSL context";
        return nullptr;
    }
    cln->handler = sslCleanup;
    cln->data = ssl;
    SSL_CTX_set_mode(ssl->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    std::string ciphers(reinterpret_cast<char *>(lc->ssl_ciphers.data),
                        lc->ssl_ciphers.len);
    if (SSL_CTX_set_cipher_list(ssl->ctx, ciphers.c_str()) == 0) {
        ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                      const_cast<char *>("SSL_CTX_set_cipher_list(\"%s\") "
                                         "failed"), ciphers.c_str());
        *err = "bad lua_ssl_ciphers";
        return nullptr;
    }
    SSL_CTX_set_verify_depth(ssl->ctx, static_cast<int>(lc->ssl_verify_depth));
    if (lc->ssl_trusted_certificate.len) {
        ngx_str_t name = lc->ssl_trusted_certificate;
        if (ngx_get_full_name(pool, prefix, &name) != NGX_OK) {
            *err = "no memory";
            return nullptr;
        }
        std::string path(reinterpret_cast<char *>(name.data), name.len);
        if (SSL_CTX_load_verify_locations(ssl->ctx, path.c_str(), nullptr)
            == 0)
        {
            ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                          const_cast<char *>("SSL_CTX_load_verify_locations"
                                             "(\"%s\") failed"),
                          path.c_str());
            *err = "failed to load lua_ssl_trusted_certificate";
            return nullptr;
        }
        ERR_clear_error();
    }
    if (lc->ssl_crl.len && !loadCrl(ssl, lc->ssl_crl, pool, log, prefix, err))
    {
        return nullptr;
    }
    if (lc->ssl_conf_commands
        && !applyConfCommands(ssl, lc->ssl_conf_commands, log, err))
    {
        return nullptr;
    }
    return ssl;
}

ngx_ssl_t *sslContext(LocConf *lc, std::string *err)
{
    if (lc->ssl == nullptr) {
        ngx_str_t prefix;
        prefix.data = ngx_cycle->conf_prefix.data;
        prefix.len = ngx_cycle->conf_prefix.len;
        lc->ssl = makeSslContext(lc, ngx_cycle->pool, ngx_cycle->log,
                                 &prefix, err);
    }
    return static_cast<ngx_ssl_t *>(lc->ssl);
}

// The handshake is over (or failed): checks, then the results.
int handshakeDone(Tcp *s, lua_State *dst, const char *fail)
{
    ngx_connection_t *c = s->c;
    std::string err;
    if (fail) {
        err = fail;
    } else if (!c->ssl || !c->ssl->handshaked) {
        err = "handshake failed";
    } else if (s->ssl_verify) {
        long rc = SSL_get_verify_result(c->ssl->connection);
        if (rc != X509_V_OK) {
            err = std::to_string(rc) + ": "
                  + X509_verify_cert_error_string(rc);
        } else if (!s->sni.empty()) {
            ngx_str_t name;
            name.data = reinterpret_cast<u_char *>(&s->sni[0]);
            name.len = s->sni.size();
            if (ngx_ssl_check_host(c, &name) != NGX_OK) {
                err = "certificate host mismatch";
            }
        }
    }
    if (!err.empty()) {
        if (s->log_errors && s->ctx) {
            ngx_log_error(NGX_LOG_ERR, s->ctx->r->connection->log, 0,
                          "lua tcp socket SSL handshake failed: %s",
                          err.c_str());
        }
        closeSock(s, s->shaker);
        lua_pushnil(dst);
        lua_pushlstring(dst, err.data(), err.size());
        return 2;
    }
    c->read->handler = entry::edge<onRead>;
    c->write->handler = entry::edge<onWrite>;
    if (!s->ssl_ret_session) {
        lua_pushboolean(dst, 1);
        return 1;
    }
    ngx_ssl_session_t *sess = ngx_ssl_get_session(c);
    if (sess == nullptr) {
        lua_pushboolean(dst, 1);  // nothing to reuse (yet)
        return 1;
    }
    auto **sp = static_cast<ngx_ssl_session_t **>(
        lua_newuserdata(dst, sizeof(ngx_ssl_session_t *)));
    *sp = sess;
    luaL_getmetatable(dst, kSessionMeta);
    lua_setmetatable(dst, -2);
    return 1;
}

void onHandshake(ngx_connection_t *c)
{
    auto *s = static_cast<Tcp *>(c->data);
    LuaThread *t = s->shaker;
    if (t == nullptr) {
        return;
    }
    const char *fail = nullptr;
    if (c->read->timedout || c->write->timedout) {
        c->read->timedout = c->write->timedout = 0;
        fail = "timeout";
    }
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    // handshakeDone closes the socket under s->shaker on failure.
    int n = 0;
    std::string err;
    bool ok = entry::protect(t->co, [&] { n = handshakeDone(s, t->co, fail); },
                             &err);
    s->shaker = nullptr;
    t->cancel = nullptr;
    if (!ok) {
        entry::fail(t, err);
        return;
    }
    entry::resumeWith(t, n);
}

void cancelHandshake(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->shaker != t) {
        return;
    }
    s->shaker = nullptr;
    if (s->c) {
        // Half a handshake cannot be picked up again.
        sock::closeConnection(s->c);
        s->c = nullptr;
        releaseCount(s);
        sock::dropSlot(&s->slot);
    }
}

// ---- client certificates (setclientcert) ----

// OpenResty takes cdata from ngx.ssl.parse_pem_cert/parse_pem_priv_key;
// luaguard has no ngx.ssl yet, so the PEM texts themselves are accepted
// and parsed here. `ssl` null: only check that they parse.
bool useClientCert(SSL *ssl, const std::string &cert, const std::string &key,
                   std::string *err)
{
    BIO *bio = BIO_new_mem_buf(cert.data(), static_cast<int>(cert.size()));
    if (bio == nullptr) {
        *err = "no memory";
        return false;
    }
    bool ok = true;
    X509 *x = PEM_read_bio_X509_AUX(bio, nullptr, nullptr, nullptr);
    if (x == nullptr) {
        *err = "PEM_read_bio_X509_AUX() failed";
        ok = false;
    } else if (ssl && SSL_use_certificate(ssl, x) == 0) {
        *err = "SSL_use_certificate() failed";
        ok = false;
    }
    X509_free(x);
    // The rest of the text is the chain.
    while (ok) {
        X509 *ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
        if (ca == nullptr) {
            ERR_clear_error();   // the end of the text
            break;
        }
        if (ssl && SSL_add1_chain_cert(ssl, ca) == 0) {
            *err = "SSL_add1_chain_cert() failed";
            ok = false;
        }
        X509_free(ca);
    }
    BIO_free(bio);
    if (!ok) {
        ERR_clear_error();
        return false;
    }
    bio = BIO_new_mem_buf(key.data(), static_cast<int>(key.size()));
    if (bio == nullptr) {
        *err = "no memory";
        return false;
    }
    EVP_PKEY *pk = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (pk == nullptr) {
        *err = "PEM_read_bio_PrivateKey() failed";
        ok = false;
    } else if (ssl && SSL_use_PrivateKey(ssl, pk) == 0) {
        *err = "SSL_use_PrivateKey() failed";
        ok = false;
    } else if (ssl && SSL_check_private_key(ssl) == 0) {
        *err = "SSL_check_private_key() failed";
        ok = false;
    }
    EVP_PKEY_free(pk);
    if (!ok) {
        ERR_clear_error();
    }
    return ok;
}

int tcpSetClientCert(lua_State *L)
{
    Tcp *s = use(L);
    if (lua_gettop(L) != 3) {
        return luaL_error(L, "ngx.socket setclientcert: expecting 3 "
                          "arguments (including the object), but seen %d",
                          lua_gettop(L));
    }
    if (lua_isnil(L, 2) && lua_isnil(L, 3)) {
        s->client_cert.clear();
        s->client_key.clear();
        lua_pushboolean(L, 1);
        return 1;
    }
    if (lua_isnil(L, 2) || lua_isnil(L, 3)) {
        return luaL_error(L, "client certificate must be supplied with "
                          "corresponding private key");
    }
    // PEM strings, or the objects of ngx.ssl.parse_pem_cert/_priv_key.
    std::string c, k, err;
    if (!sslPemArg(L, 2, false, &c)) {
        return luaL_error(L, "bad cert arg: PEM string or ngx.ssl "
                          "certificate expected, got %s", luaL_typename(L, 2));
    }
    if (!sslPemArg(L, 3, true, &k)) {
        return luaL_error(L, "bad pkey arg: PEM string or ngx.ssl private "
                          "key expected, got %s", luaL_typename(L, 3));
    }
    if (!useClientCert(nullptr, c, k, &err)) {
        return pushNilErr(L, err.c_str());
    }
    s->client_cert.swap(c);
    s->client_key.swap(k);
    lua_pushboolean(L, 1);
    return 1;
}

int tcpSslHandshake(lua_State *L)
{
    Tcp *s = use(L);
    int n = lua_gettop(L);
    if (n < 1 || n > 5) {
        return luaL_error(L, "ngx.socket sslhandshake: expecting 1 ~ 5 "
                          "arguments (including the object), but seen %d",
                          n);
    }
    ngx_connection_t *c = s->c;
    if (c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->shaker || s->reader || s->writer) {
        return pushNilErr(L, "socket busy");
    }
    ngx_ssl_session_t *reuse = nullptr;
    s->ssl_ret_session = true;
    if (n >= 2) {
        if (lua_isboolean(L, 2) && !lua_toboolean(L, 2)) {
            s->ssl_ret_session = false;
        } else if (!lua_isnil(L, 2)) {
            auto **sp = static_cast<ngx_ssl_session_t **>(
                luaL_checkudata(L, 2, kSessionMeta));
            reuse = *sp;
        }
    }
    s->sni.clear();
    if (n >= 3 && !lua_isnil(L, 3)) {
        size_t len;
        const char *name = luaL_checklstring(L, 3, &len);
        s->sni.assign(name, len);
    }
    s->ssl_verify = n >= 4 && lua_toboolean(L, 4);

    if (c->ssl && c->ssl->handshaked) {
        return handshakeDone(s, L, nullptr);
    }
    std::string err;
    ngx_ssl_t *ssl = sslContext(s->ctx->llcf, &err);
    if (ssl == nullptr) {
        return pushNilErr(L, err.c_str());
    }
    if (c->pool == nullptr) {
        // TLS state is allocated from the connection's pool: one of its
        // own, since the connection may outlive the request (keepalive).
        c->pool = ngx_create_pool(256, ngx_cycle->log);
        if (c->pool == nullptr) {
            return pushNilErr(L, "no memory");
        }
    }
    if (ngx_ssl_create_connection(ssl, c, NGX_SSL_CLIENT) != NGX_OK) {
        return pushNilErr(L, "failed to create ssl connection");
    }
    if (reuse && ngx_ssl_set_session(c, reuse) != NGX_OK) {
        return pushNilErr(L, "failed to set ssl session");
    }
    if (!s->client_cert.empty()
        && !useClientCert(c->ssl->connection, s->client_cert,
                          s->client_key, &err))
    {
        return pushNilErr(L, err.c_str());
    }
    if (!s->sni.empty()) {
        SSL_set_tlsext_host_name(c->ssl->connection, s->sni.c_str());
    }
    ngx_int_t rc = ngx_ssl_handshake(c);
    if (rc != NGX_AGAIN) {
        return handshakeDone(s, L, nullptr);
    }
    LuaThread *t = threads::current();
    s->shaker = t;
    t->cancel = cancelHandshake;
    t->cancel_data = s;
    c->ssl->handler = entry::edge<onHandshake>;
    ngx_add_timer(c->read, connectTimeout(s));
    return glue::yield(L);
}

}  // namespace tcp

char *mergeSocketSsl(ngx_conf_t *cf, LocConf *prev, LocConf *conf)
{
    auto same = [](const ngx_str_t &a, const ngx_str_t &b) {
        return a.len == b.len
               && (a.len == 0 || std::memcmp(a.data, b.data, a.len) == 0);
    };
    if (prev->ssl && same(prev->ssl_trusted_certificate,
                          conf->ssl_trusted_certificate)
        && same(prev->ssl_ciphers, conf->ssl_ciphers)
        && prev->ssl_protocols == conf->ssl_protocols
        && prev->ssl_verify_depth == conf->ssl_verify_depth
        && same(prev->ssl_crl, conf->ssl_crl)
        && prev->ssl_conf_commands == conf->ssl_conf_commands)
    {
        conf->ssl = prev->ssl;
        return NGX_CONF_OK;
    }
    if (conf->ssl_trusted_certificate.len == 0 && conf->ssl_crl.len == 0
        && conf->ssl_conf_commands == nullptr)
    {
        return NGX_CONF_OK;  // nothing to read or check: made on first use
    }
    std::string err;
    conf->ssl = tcp::makeSslContext(conf, cf->pool, cf->log,
                                    &cf->cycle->conf_prefix, &err);
    if (conf->ssl == nullptr) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s", err.c_str());
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}

}  // namespace luaguard::api
