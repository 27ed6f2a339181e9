// require "ngx.ssl.session": the downstream TLS session in
// ssl_session_fetch_by_lua and ssl_session_store_by_lua (ngx/tls.cpp).
// A serialized session holds the session's master secret: it is handed
// to Lua as a string (the code's to store) and never written to a log
// line or an error message.

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/tls.hpp"

namespace luaguard::api {

namespace {

// The running session phase's handshake; raises lua-nginx-module's error
// elsewhere (after the handshake too: a timer made there finds none).
tls::Handshake *handshake(lua_State *L, PhaseMask allowed)
{
    if (g_run == nullptr || g_run->ctx == nullptr) {
        luaL_error(L, "no request found");
    }
    glue::checkPhase(L, allowed);
    tls::Handshake *hs = tls::current();
    if (hs == nullptr) {
        luaL_error(L, "no request found");
    }
    return hs;
}

int pushHex(lua_State *L, const unsigned char *p, unsigned len)
{
    static const char digits[] = "0123456789abcdef";
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (unsigned i = 0; i < len; i++) {
        luaL_addchar(&b, digits[p[i] >> 4]);
        luaL_addchar(&b, digits[p[i] & 0xf]);
    }
    luaL_pushresult(&b);
    return 1;
}

// The TLS phases with no session of their own to give: lua-nginx-module
// answers with an error value there, not a raised one.
constexpr PhaseMask kTlsPhases = mask(Phase::SslCert, Phase::SslClientHello,
                                      Phase::SslSessionFetch,
                                      Phase::SslSessionStore);

int getSessionId(lua_State *L)
{
    tls::Handshake *hs = handshake(L, kTlsPhases);
    if (g_run->phase == Phase::SslSessionFetch) {
        return pushHex(L, hs->sess_id, hs->sess_id_len);
    }
    unsigned len = 0;
    const unsigned char *id = hs->session
        ? SSL_SESSION_get_id(hs->session, &len) : nullptr;
    if (id == nullptr || len == 0) {
        return pushNilErr(L, "uninitialized session id len in lua context");
    }
    return pushHex(L, id, len);
}

int getSerializedSession(lua_State *L)
{
    tls::Handshake *hs = handshake(L, kTlsPhases);
    if (g_run->phase != Phase::SslSessionStore) {
        return pushNilErr(L, "bad session in lua context");
    }
    int n = hs->session ? i2d_SSL_SESSION(hs->session, nullptr) : 0;
    if (n <= 0) {
        ERR_clear_error();
        return pushNilErr(L, "i2d_SSL_SESSION() failed");
    }
    auto *buf = static_cast<unsigned char *>(OPENSSL_malloc(n));
    if (buf == nullptr) {
        return pushNilErr(L, "no memory");
    }
    unsigned char *p = buf;
    i2d_SSL_SESSION(hs->session, &p);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), static_cast<size_t>(n));
    OPENSSL_clear_free(buf, static_cast<size_t>(n));
    return 1;
}

int setSerializedSession(lua_State *L)
{
    tls::Handshake *hs = handshake(L, kTlsPhases);
    size_t len;
    const char *data = luaL_checklstring(L, 1, &len);
    auto *p = reinterpret_cast<const unsigned char *>(data);
    SSL_SESSION *sess = d2i_SSL_SESSION(nullptr, &p, static_cast<long>(len));
    if (sess == nullptr) {
        ERR_clear_error();
        return pushNilErr(L, "failed to de-serialize session");
    }
    if (g_run->phase != Phase::SslSessionFetch) {
        // Nothing in this phase would resume it.
        SSL_SESSION_free(sess);
        return pushNilErr(L, "bad session in lua context");
    }
    if (hs->session) {
        SSL_SESSION_free(hs->session);
    }
    hs->session = sess;
    lua_pushboolean(L, 1);
    return 1;
}

int openModule(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"get_session_id", getSessionId},
        {"get_serialized_session", getSerializedSession},
        {"set_serialized_session", setSerializedSession},
        {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

void openSslSession(lua_State *L)
{
    preload(L, "ngx.ssl.session", openModule);
}

}  // namespace luaguard::api
