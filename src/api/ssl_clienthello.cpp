// require "ngx.ssl.clienthello": the client's hello, read in
// ssl_client_hello_by_lua (ngx/tls.cpp) before OpenSSL acts on it, and the
// protocol versions this handshake may settle on.

#include <openssl/ssl.h>

#include <cstring>
#include <vector>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/tls.hpp"

namespace luaguard::api {

namespace {

SSL *helloSsl(lua_State *L)
{
    if (g_run == nullptr || g_run->ctx == nullptr) {
        luaL_error(L, "no request found");
    }
    // lua-nginx-module's words in every other context.
    tls::Handshake *hs = tls::current();
    if (g_run->phase != Phase::SslClientHello || hs == nullptr) {
        luaL_error(L, "API disabled in the current context");
    }
    return hs->ssl;
}

// Reads a big-endian length of `n` bytes at *p, within [*p, end).
bool readLen(const unsigned char **p, const unsigned char *end, int n,
             size_t *out)
{
    if (end - *p < n) {
        return false;
    }
    size_t v = 0;
    for (int i = 0; i < n; i++) {
        v = (v << 8) | (*p)[i];
    }
    *p += n;
    *out = v;
    return v <= static_cast<size_t>(end - *p);
}

int getServerName(lua_State *L)
{
    SSL *ssl = helloSsl(L);
    const unsigned char *p;
    size_t len;
    if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_server_name, &p, &len)) {
        lua_pushnil(L);
        return 1;
    }
    // server_name_list: the first host_name entry.
    const unsigned char *end = p + len;
    size_t list;
    if (!readLen(&p, end, 2, &list)) {
        return pushNilErr(L, "bad SSL Client Hello Extension");
    }
    end = p + list;
    while (p < end) {
        unsigned type = *p++;
        size_t n;
        if (!readLen(&p, end, 2, &n)) {
            break;
        }
        if (type == TLSEXT_NAMETYPE_host_name) {
            lua_pushlstring(L, reinterpret_cast<const char *>(p), n);
            return 1;
        }
        p += n;
    }
    return pushNilErr(L, "bad SSL Client Hello Extension");
}

int getExt(lua_State *L)
{
    SSL *ssl = helloSsl(L);
    lua_Integer type = luaL_checkinteger(L, 1);
    const unsigned char *p;
    size_t len;
    if (type < 0 || type > 0xffff
        || !SSL_client_hello_get0_ext(ssl, static_cast<unsigned>(type), &p,
                                      &len))
    {
        lua_pushnil(L);
        return 1;
    }
    lua_pushlstring(L, reinterpret_cast<const char *>(p), len);
    return 1;
}

const char *versionName(unsigned v)
{
    switch (v) {
    case SSL3_VERSION: return "SSLv3";
    case TLS1_VERSION: return "TLSv1";
    case TLS1_1_VERSION: return "TLSv1.1";
    case TLS1_2_VERSION: return "TLSv1.2";
    case TLS1_3_VERSION: return "TLSv1.3";
    }
    return nullptr;
}

int getSupportedVersions(lua_State *L)
{
    SSL *ssl = helloSsl(L);
    const unsigned char *p;
    size_t len;
    if (!SSL_client_hello_get0_ext(ssl, TLSEXT_TYPE_supported_versions, &p,
                                   &len))
    {
        lua_pushnil(L);
        return 1;
    }
    const unsigned char *end = p + len;
    size_t n;
    if (!readLen(&p, end, 1, &n) || n % 2 != 0) {
        return pushNilErr(L, "bad SSL Client Hello Extension");
    }
    std::vector<const char *> names;
    for (size_t i = 0; i < n; i += 2) {
        // GREASE and unknown versions are left out.
        if (const char *name = versionName((p[i] << 8) | p[i + 1])) {
            names.push_back(name);
        }
    }
    // lua-nginx-module lists them oldest first.
    lua_createtable(L, static_cast<int>(names.size()), 0);
    int k = 1;
    for (auto it = names.rbegin(); it != names.rend(); ++it) {
        lua_pushstring(L, *it);
        lua_rawseti(L, -2, k++);
    }
    return 1;
}

int setProtocols(lua_State *L)
{
    SSL *ssl = helloSsl(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    static const std::pair<const char *, uint64_t> all[] = {
        {"SSLv2", 0}, {"SSLv3", SSL_OP_NO_SSLv3}, {"TLSv1", SSL_OP_NO_TLSv1},
        {"TLSv1.1", SSL_OP_NO_TLSv1_1}, {"TLSv1.2", SSL_OP_NO_TLSv1_2},
        {"TLSv1.3", SSL_OP_NO_TLSv1_3}};
    uint64_t allowed = 0;
    size_t n = lua_objlen(L, 1);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, 1, static_cast<int>(i));
        const char *v = lua_tostring(L, -1);
        bool known = false;
        for (const auto &e : all) {
            if (v && strcmp(v, e.first) == 0) {
                allowed |= e.second;
                known = true;
            }
        }
        lua_pop(L, 1);
        if (!known) {
            return luaL_error(L, "invalid protocol: %s", v ? v : "?");
        }
    }
    uint64_t off = 0;
    for (const auto &e : all) {
        off |= e.second & ~allowed;
    }
    SSL_clear_options(ssl, allowed);
    SSL_set_options(ssl, off);
    lua_pushboolean(L, 1);
    return 1;
}

int openModule(lua_State *L)
{
    static const luaL_Reg fns[] = {
        {"get_client_hello_server_name", getServerName},
        {"get_client_hello_ext", getExt},
        {"get_supported_versions", getSupportedVersions},
        {"set_protocols", setProtocols},
        {nullptr, nullptr}};
    pushRestyModule(L, fns);
    return 1;
}

}  // namespace

void openSslClientHello(lua_State *L)
{
    preload(L, "ngx.ssl.clienthello", openModule);
}

}  // namespace luaguard::api
