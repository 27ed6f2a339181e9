// require "ngx.ssl": the downstream TLS connection from Lua, chiefly in
// ssl_certificate_by_lua (ngx/tls.cpp) where the certificate and key of
// the handshake are chosen. Parsed certificates and keys are userdata of
// their own type (never cdata: they reach strict code as luaguard
// objects), freed when collected. Key material never appears in an error
// message or a log line: errors name the OpenSSL call that failed.

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <string>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/tls.hpp"

namespace luaguard::api {

namespace {

const char kCertMeta[] = "luaguard.ssl.cert";    // STACK_OF(X509) *
const char kKeyMeta[] = "luaguard.ssl.pkey";     // EVP_PKEY *

SSL *requireSsl(lua_State *L, ngx_connection_t **c = nullptr)
{
    if (g_run == nullptr || g_run->ctx == nullptr) {
        luaL_error(L, "no request found");
    }
    ngx_connection_t *conn = nullptr;
    SSL *ssl = tls::currentSsl(&conn);
    if (c) {
        *c = conn;
    }
    return ssl;
}

// nil plus the failing call, with OpenSSL's queue emptied (its entries
// may quote the input).
int failed(lua_State *L, const char *what)
{
    ERR_clear_error();
    return pushNilErr(L, what);
}

int noSsl(lua_State *L)
{
    return pushNilErr(L, "bad request");
}

BIO *memBio(lua_State *L, int idx)
{
    size_t len;
    const char *s = luaL_checklstring(L, idx, &len);
    return BIO_new_mem_buf(s, static_cast<int>(len));
}

// Every certificate in PEM text, in order; null when there is none.
STACK_OF(X509) *readPemChain(BIO *bio)
{
    STACK_OF(X509) *chain = sk_X509_new_null();
    if (chain == nullptr) {
        return nullptr;
    }
    while (X509 *x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr)) {
        if (!sk_X509_push(chain, x)) {
            X509_free(x);
            break;
        }
    }
    ERR_clear_error();   // the end of the text reads as an error
    if (sk_X509_num(chain) == 0) {
        sk_X509_free(chain);
        return nullptr;
    }
    return chain;
}

// The leaf and its chain onto the handshake's SSL.
bool useChain(SSL *ssl, STACK_OF(X509) *chain)
{
    if (SSL_use_certificate(ssl, sk_X509_value(chain, 0)) != 1) {
        return false;
    }
    SSL_clear_chain_certs(ssl);
    for (int i = 1; i < sk_X509_num(chain); i++) {
        if (SSL_add1_chain_cert(ssl, sk_X509_value(chain, i)) != 1) {
            return false;
        }
    }
    return true;
}

int clearCerts(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    SSL_certs_clear(ssl);
    lua_pushboolean(L, 1);
    return 1;
}

int setDerCert(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    size_t len;
    const char *der = luaL_checklstring(L, 1, &len);
    auto *p = reinterpret_cast<const unsigned char *>(der);
    const unsigned char *end = p + len;
    STACK_OF(X509) *chain = sk_X509_new_null();
    while (chain && p < end) {
        X509 *x = d2i_X509(nullptr, &p, static_cast<long>(end - p));
        if (x == nullptr || !sk_X509_push(chain, x)) {
            X509_free(x);
            sk_X509_pop_free(chain, X509_free);
            return failed(L, "d2i_X509() failed");
        }
    }
    if (chain == nullptr || sk_X509_num(chain) == 0) {
        sk_X509_free(chain);
        return failed(L, "d2i_X509() failed");
    }
    bool ok = useChain(ssl, chain);
    sk_X509_pop_free(chain, X509_free);
    if (!ok) {
        return failed(L, "SSL_use_certificate() failed");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int setDerPrivKey(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    size_t len;
    const char *der = luaL_checklstring(L, 1, &len);
    auto *p = reinterpret_cast<const unsigned char *>(der);
    EVP_PKEY *key = d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(len));
    if (key == nullptr) {
        return failed(L, "d2i_AutoPrivateKey() failed");
    }
    int rc = SSL_use_PrivateKey(ssl, key);
    EVP_PKEY_free(key);
    if (rc != 1) {
        return failed(L, "SSL_use_PrivateKey() failed");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int certPemToDer(lua_State *L)
{
    BIO *bio = memBio(L, 1);
    STACK_OF(X509) *chain = bio ? readPemChain(bio) : nullptr;
    BIO_free(bio);
    if (chain == nullptr) {
        return failed(L, "PEM_read_bio_X509_AUX() failed");
    }
    std::string out;
    for (int i = 0; i < sk_X509_num(chain); i++) {
        unsigned char *der = nullptr;
        int n = i2d_X509(sk_X509_value(chain, i), &der);
        if (n <= 0) {
            sk_X509_pop_free(chain, X509_free);
            return failed(L, "i2d_X509() failed");
        }
        out.append(reinterpret_cast<char *>(der), static_cast<size_t>(n));
        OPENSSL_free(der);
    }
    sk_X509_pop_free(chain, X509_free);
    lua_pushlstring(L, out.data(), out.size());
    return 1;
}

int passphraseCb(char *buf, int size, int, void *u)
{
    auto *pass = static_cast<const std::string *>(u);
    if (pass == nullptr || pass->size() > static_cast<size_t>(size)) {
        return 0;
    }
    memcpy(buf, pass->data(), pass->size());
    return static_cast<int>(pass->size());
}

// The key in PEM text at `idx`, the passphrase (if any) after it.
EVP_PKEY *readPemKey(lua_State *L, int idx)
{
    BIO *bio = memBio(L, idx);
    std::string pass;
    bool has_pass = lua_type(L, idx + 1) == LUA_TSTRING;
    if (has_pass) {
        size_t n;
        const char *p = lua_tolstring(L, idx + 1, &n);
        pass.assign(p, n);
    }
    EVP_PKEY *key = bio ? PEM_read_bio_PrivateKey(
        bio, nullptr, passphraseCb, has_pass ? &pass : nullptr) : nullptr;
    BIO_free(bio);
    OPENSSL_cleanse(pass.data(), pass.size());
    return key;
}

int privKeyPemToDer(lua_State *L)
{
    EVP_PKEY *key = readPemKey(L, 1);
    if (key == nullptr) {
        return failed(L, "PEM_read_bio_PrivateKey() failed");
    }
    unsigned char *der = nullptr;
    int n = i2d_PrivateKey(key, &der);
    EVP_PKEY_free(key);
    if (n <= 0) {
        return failed(L, "i2d_PrivateKey() failed");
    }
    lua_pushlstring(L, reinterpret_cast<char *>(der), static_cast<size_t>(n));
    OPENSSL_clear_free(der, static_cast<size_t>(n));
    return 1;
}

int certGc(lua_State *L)
{
    auto **p = static_cast<STACK_OF(X509) **>(luaL_checkudata(L, 1, kCertMeta));
    if (*p) {
        sk_X509_pop_free(*p, X509_free);
        *p = nullptr;
    }
    return 0;
}

int keyGc(lua_State *L)
{
    auto **p = static_cast<EVP_PKEY **>(luaL_checkudata(L, 1, kKeyMeta));
    if (*p) {
        EVP_PKEY_free(*p);
        *p = nullptr;
    }
    return 0;
}

int parsePemCert(lua_State *L)
{
    auto **slot = static_cast<STACK_OF(X509) **>(
        lua_newuserdata(L, sizeof(STACK_OF(X509) *)));
    *slot = nullptr;
    luaL_getmetatable(L, kCertMeta);
    lua_setmetatable(L, -2);
    BIO *bio = memBio(L, 1);
    *slot = bio ? readPemChain(bio) : nullptr;
    BIO_free(bio);
    if (*slot == nullptr) {
        return failed(L, "PEM_read_bio_X509_AUX() failed");
    }
    return 1;
}

int parsePemPrivKey(lua_State *L)
{
    luaL_checkstring(L, 1);
    auto **slot = static_cast<EVP_PKEY **>(
        lua_newuserdata(L, sizeof(EVP_PKEY *)));
    *slot = nullptr;
    luaL_getmetatable(L, kKeyMeta);
    lua_setmetatable(L, -2);
    *slot = readPemKey(L, 1);
    if (*slot == nullptr) {
        return failed(L, "PEM_read_bio_PrivateKey() failed");
    }
    return 1;
}

int setCert(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    auto **p = static_cast<STACK_OF(X509) **>(luaL_checkudata(L, 1, kCertMeta));
    if (ssl == nullptr) {
        return noSsl(L);
    }
    if (*p == nullptr || !useChain(ssl, *p)) {
        return failed(L, "SSL_use_certificate() failed");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int setPrivKey(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    auto **p = static_cast<EVP_PKEY **>(luaL_checkudata(L, 1, kKeyMeta));
    if (ssl == nullptr) {
        return noSsl(L);
    }
    if (*p == nullptr || SSL_use_PrivateKey(ssl, *p) != 1) {
        return failed(L, "SSL_use_PrivateKey() failed");
    }
    lua_pushboolean(L, 1);
    return 1;
}

int acceptAny(int, X509_STORE_CTX *)
{
    // The verdict is read later (nginx's $ssl_client_verify); the
    // handshake goes on, as with `ssl_verify_client optional_no_ca`.
    return 1;
}

int verifyClient(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    STACK_OF(X509) *cas = nullptr;
    if (!lua_isnoneornil(L, 1)) {
        cas = *static_cast<STACK_OF(X509) **>(luaL_checkudata(L, 1, kCertMeta));
    }
    lua_Integer depth = luaL_optinteger(L, 2, 1);
    if (cas) {
        X509_STORE *store = X509_STORE_new();
        STACK_OF(X509_NAME) *names = sk_X509_NAME_new_null();
        bool ok = store && names;
        for (int i = 0; ok && i < sk_X509_num(cas); i++) {
            X509 *x = sk_X509_value(cas, i);
            X509_NAME *n = X509_NAME_dup(X509_get_subject_name(x));
            ok = X509_STORE_add_cert(store, x) == 1 && n
                 && sk_X509_NAME_push(names, n);
            if (!ok) {
                X509_NAME_free(n);
            }
        }
        if (!ok || SSL_set0_verify_cert_store(ssl, store) != 1) {
            X509_STORE_free(store);
            sk_X509_NAME_pop_free(names, X509_NAME_free);
            return failed(L, "failed to set the client CA certificates");
        }
        SSL_set_client_CA_list(ssl, names);
    }
    SSL_set_verify(ssl, SSL_VERIFY_PEER, acceptAny);
    SSL_set_verify_depth(ssl, static_cast<int>(depth));
    lua_pushboolean(L, 1);
    return 1;
}

// The address and its kind, as lua-nginx-module returns them.
int pushRawAddr(lua_State *L, struct sockaddr *sa)
{
    switch (sa->sa_family) {
    case AF_INET: {
        auto *in = reinterpret_cast<struct sockaddr_in *>(sa);
        lua_pushlstring(L, reinterpret_cast<char *>(&in->sin_addr), 4);
        lua_pushliteral(L, "inet");
        return 2;
    }
    case AF_INET6: {
        auto *in6 = reinterpret_cast<struct sockaddr_in6 *>(sa);
        lua_pushlstring(L, reinterpret_cast<char *>(&in6->sin6_addr), 16);
        lua_pushliteral(L, "inet6");
        return 2;
    }
    case AF_UNIX: {
        auto *un = reinterpret_cast<struct sockaddr_un *>(sa);
        lua_pushstring(L, un->sun_path);
        lua_pushliteral(L, "unix");
        return 2;
    }
    }
    lua_pushnil(L);
    lua_pushnil(L);
    lua_pushfstring(L, "unknown address type: %d", sa->sa_family);
    return 3;
}

int rawServerAddr(lua_State *L)
{
    ngx_connection_t *c;
    if (requireSsl(L, &c) == nullptr) {
        return noSsl(L);
    }
    if (ngx_connection_local_sockaddr(c, nullptr, 0) != NGX_OK) {
        lua_pushnil(L);
        lua_pushnil(L);
        lua_pushliteral(L, "failed to fetch server address");
        return 3;
    }
    return pushRawAddr(L, c->local_sockaddr);
}

int rawClientAddr(lua_State *L)
{
    ngx_connection_t *c;
    if (requireSsl(L, &c) == nullptr) {
        return noSsl(L);
    }
    return pushRawAddr(L, c->sockaddr);
}

int serverPort(lua_State *L)
{
    ngx_connection_t *c;
    if (requireSsl(L, &c) == nullptr) {
        return noSsl(L);
    }
    if (ngx_connection_local_sockaddr(c, nullptr, 0) != NGX_OK) {
        return failed(L, "failed to fetch server port");
    }
    lua_pushinteger(L, ngx_inet_get_port(c->local_sockaddr));
    return 1;
}

int serverName(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name == nullptr) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushstring(L, name);
    return 1;
}

int getTls1Version(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    lua_pushinteger(L, SSL_version(ssl));
    return 1;
}

int getTls1VersionStr(lua_State *L)
{
    SSL *ssl = requireSsl(L);
    if (ssl == nullptr) {
        return noSsl(L);
    }
    switch (SSL_version(ssl)) {
    case SSL3_VERSION: lua_pushliteral(L, "SSLv3"); return 1;
    case TLS1_VERSION: lua_pushliteral(L, "TLSv1"); return 1;
    case TLS1_1_VERSION: lua_pushliteral(L, "TLSv1.1"); return 1;
    case TLS1_2_VERSION: lua_pushliteral(L, "TLSv1.2"); return 1;
    case TLS1_3_VERSION: lua_pushliteral(L, "TLSv1.3"); return 1;
    }
    lua_pushnil(L);
    lua_pushliteral(L, "unknown version");
    return 2;
}

int openModule(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"clear_certs", clearCerts},
        {"set_der_cert", setDerCert},
        {"set_der_priv_key", setDerPrivKey},
        {"cert_pem_to_der", certPemToDer},
        {"priv_key_pem_to_der", privKeyPemToDer},
        {"parse_pem_cert", parsePemCert},
        {"parse_pem_priv_key", parsePemPrivKey},
        {"set_cert", setCert},
        {"set_priv_key", setPrivKey},
        {"verify_client", verifyClient},
        {"raw_server_addr", rawServerAddr},
        {"raw_client_addr", rawClientAddr},
        {"server_port", serverPort},
        {"server_name", serverName},
        {"get_tls1_version", getTls1Version},
        {"get_tls1_version_str", getTls1VersionStr},
        {nullptr, nullptr}};
    pushRestyModule(L, fns);
    static const std::pair<const char *, int> versions[] = {
        {"SSL3_VERSION", SSL3_VERSION}, {"TLS1_VERSION", TLS1_VERSION},
        {"TLS1_1_VERSION", TLS1_1_VERSION}, {"TLS1_2_VERSION", TLS1_2_VERSION},
        {"TLS1_3_VERSION", TLS1_3_VERSION}};
    for (const auto &v : versions) {
        lua_pushinteger(L, v.second);
        lua_setfield(L, -2, v.first);
    }
    return 1;
}

}  // namespace

bool sslPemArg(lua_State *L, int idx, bool key, std::string *out)
{
    if (lua_type(L, idx) == LUA_TSTRING) {
        size_t len;
        const char *p = lua_tolstring(L, idx, &len);
        out->assign(p, len);
        return true;
    }
    void *ud = luaL_testudata(L, idx, key ? kKeyMeta : kCertMeta);
    if (ud == nullptr) {
        return false;
    }
    BIO *bio = BIO_new(BIO_s_mem());
    bool ok = bio != nullptr;
    if (ok && key) {
        EVP_PKEY *k = *static_cast<EVP_PKEY **>(ud);
        ok = k && PEM_write_bio_PrivateKey(bio, k, nullptr, nullptr, 0,
                                           nullptr, nullptr) == 1;
    } else if (ok) {
        STACK_OF(X509) *chain = *static_cast<STACK_OF(X509) **>(ud);
        for (int i = 0; ok && chain && i < sk_X509_num(chain); i++) {
            ok = PEM_write_bio_X509(bio, sk_X509_value(chain, i)) == 1;
        }
        ok = ok && chain;
    }
    char *data = nullptr;
    long n = ok ? BIO_get_mem_data(bio, &data) : 0;
    if (ok && n > 0) {
        out->assign(data, static_cast<size_t>(n));
    }
    if (bio) {
        // The buffer may hold a private key.
        BUF_MEM *mem = nullptr;
        BIO_get_mem_ptr(bio, &mem);
        if (mem && mem->data) {
            OPENSSL_cleanse(mem->data, mem->max);
        }
        BIO_free(bio);
    }
    ERR_clear_error();
    return ok && n > 0;
}

void openSsl(lua_State *L)
{
    // Registered with the VM (not on first require): the sandbox knows
    // luaguard's object types by their "luaguard." registry names.
    luaL_newmetatable(L, kCertMeta);
    lua_pushcfunction(L, certGc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "luaguard.ssl.cert");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
    luaL_newmetatable(L, kKeyMeta);
    lua_pushcfunction(L, keyGc);
    lua_setfield(L, -2, "__gc");
    lua_pushliteral(L, "luaguard.ssl.pkey");
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
    preload(L, "ngx.ssl", openModule);
}

}  // namespace luaguard::api
