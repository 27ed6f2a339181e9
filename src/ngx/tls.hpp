// The server side of TLS run from Lua: ssl_certificate_by_lua, whose code
// runs in a fake request of its own during the handshake and may yield
// (Debian's nginx carries the patch that lets OpenSSL's certificate
// callback suspend the handshake). api/ssl.cpp is its Lua API.
#pragma once

#include <openssl/ssl.h>

#include "ngx/module.hpp"

namespace luaguard::tls {

// One handshake's run of ssl_certificate_by_lua, in the client
// connection's pool.
struct Handshake {
    ngx_connection_t  *c;       // the client's connection
    SSL               *ssl;
    RequestCtx        *ctx;     // the fake request while the code runs
    bool               done;
    bool               ok;
};

// The handshake of the running code, or null (not in a TLS phase).
Handshake *current();

// The client connection's SSL for ngx.ssl: the handshake's, or that of
// the running request when it came over TLS. Null otherwise.
SSL *currentSsl(ngx_connection_t **c);

// At configuration merge: hooks the server's SSL_CTX when it has
// ssl_certificate_by_lua. False (logged) when the server has no TLS.
bool installCertHook(ngx_conf_t *cf, SrvConf *srv);

}  // namespace luaguard::tls
