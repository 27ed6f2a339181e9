// The server side of TLS run from Lua: ssl_certificate_by_lua, whose code
// runs in a fake request of its own during the handshake and may yield
// (Debian's nginx carries the patch that lets OpenSSL's certificate
// callback suspend the handshake). api/ssl.cpp is its Lua API.
//
// ssl_session_fetch_by_lua, ssl_session_store_by_lua and
// ssl_client_hello_by_lua run in a fake request too, but to their end
// inside OpenSSL's callback: stock OpenSSL 3 has no way to suspend the
// session lookup, and nginx 1.22 treats SSL_ERROR_WANT_CLIENT_HELLO_CB as
// a failed handshake, so none of them may yield (api/ssl_session.cpp,
// api/ssl_clienthello.cpp are their Lua API).
#pragma once

#include <openssl/ssl.h>

#include "ngx/module.hpp"

namespace luaguard::tls {

// One handshake's run of Lua code: ssl_certificate_by_lua's in the
// client connection's pool, the other phases' on the callback's stack.
struct Handshake {
    ngx_connection_t  *c;       // the client's connection
    SSL               *ssl;
    RequestCtx        *ctx;     // the fake request while the code runs
    bool               done;
    bool               ok;
    // ssl_session_fetch_by_lua: the session ID the client offers, and
    // the session set_serialized_session made (owned until handed to
    // OpenSSL). ssl_session_store_by_lua: the new session (OpenSSL's).
    const unsigned char *sess_id;
    unsigned             sess_id_len;
    SSL_SESSION         *session;
};

// The handshake of the running code, or null (not in a TLS phase).
Handshake *current();

// The client connection's SSL for ngx.ssl: the handshake's, or that of
// the running request when it came over TLS. Null otherwise.
SSL *currentSsl(ngx_connection_t **c);

// At configuration merge: hooks the server's SSL_CTX for the phases it
// has (ssl_certificate_by_lua, ssl_client_hello_by_lua, the http-level
// session fetch/store code). False (logged) on failure.
bool installHooks(ngx_conf_t *cf, SrvConf *srv);

}  // namespace luaguard::tls
