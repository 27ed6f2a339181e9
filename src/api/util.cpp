// Encoding and hashing helpers: ngx.escape_uri, unescape_uri, encode_args,
// decode_args, encode_base64, decode_base64, md5, md5_bin, sha1_bin,
// hmac_sha1, crc32_short, crc32_long, quote_sql_str, escape_html, and the
// "ngx.base64" module. Hashes come from libcrypto, CRC from zlib.

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/md5.h>
#include <openssl/sha.h>
#include <zlib.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "api/api.hpp"
#include "api/util.hpp"
#include "ngx/glue.hpp"
#include "runtime/codec.hpp"

namespace luaguard::api {

namespace {

// The text of argument `idx` for the string helpers: nil is the empty
// string and numbers convert, as lua-nginx-module does; anything else is
// API misuse.
const char *stringArg(lua_State *L, int idx, const char *fname, size_t *len)
{
    int t = lua_type(L, idx);
    if (t == LUA_TNIL || t == LUA_TNONE) {
        *len = 0;
        return "";
    }
    if (t == LUA_TSTRING || t == LUA_TNUMBER) {
        return lua_tolstring(L, idx, len);
    }
    luaL_error(L, "bad argument #%d to '%s' (string expected, got %s)", idx,
               fname, luaL_typename(L, idx));
    return nullptr;
}

void pushStd(lua_State *L, const std::string &s)
{
    lua_pushlstring(L, s.data(), s.size());
}

int escapeUri(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "escape_uri", &len);
    lua_Integer type = 2;
    if (!lua_isnoneornil(L, 2)) {
        if (lua_type(L, 2) != LUA_TNUMBER) {
            return luaL_error(L, "\"type\" is not a number");
        }
        type = static_cast<lua_Integer>(lua_tonumber(L, 2));
        if (type < 0 || type > 6) {
            return luaL_error(L, "\"type\" %d out of range",
                              static_cast<int>(type));
        }
    }
    if (type == 0 || type == 2) {
        pushStd(L, codec::escapeUri(s, len,
                                    static_cast<codec::UriEscape>(type)));
        return 1;
    }
    // The other nginx escape tables are not documented for Lua but
    // accepted by lua-nginx-module: nginx's own function does them.
    auto *src = reinterpret_cast<u_char *>(const_cast<char *>(s));
    size_t extra = 2 * ngx_escape_uri(nullptr, src, len, type);
    std::string out(len + extra, '\0');
    ngx_escape_uri(reinterpret_cast<u_char *>(&out[0]), src, len, type);
    pushStd(L, out);
    return 1;
}

int unescapeUri(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "unescape_uri", &len);
    pushStd(L, codec::unescapeUri(s, len));
    return 1;
}

int encodeArgs(lua_State *L)
{
    if (lua_gettop(L) != 1) {
        return luaL_error(L, "expecting 1 argument but seen %d",
                          lua_gettop(L));
    }
    luaL_checktype(L, 1, LUA_TTABLE);
    std::string out;
    if (!encodeArgsTable(L, 1, &out)) {
        return lua_error(L);
    }
    pushStd(L, out);
    return 1;
}

int decodeArgs(lua_State *L)
{
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_Integer max = luaL_optinteger(L, 2, 100);
    bool truncated = pushArgsTable(L, s, len, max > 0 ? max : 0);
    if (truncated) {
        lua_pushliteral(L, "truncated");
        return 2;
    }
    return 1;
}

int encodeBase64(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "encode_base64", &len);
    bool no_padding = false;
    if (!lua_isnoneornil(L, 2)) {
        if (!lua_isboolean(L, 2)) {
            return luaL_error(L, "bad no_padding: boolean expected, got %s",
                              luaL_typename(L, 2));
        }
        no_padding = lua_toboolean(L, 2);
    }
    std::string out(ngx_base64_encoded_length(len), '\0');
    ngx_str_t src = {len, reinterpret_cast<u_char *>(const_cast<char *>(s))};
    ngx_str_t dst = {0, reinterpret_cast<u_char *>(&out[0])};
    ngx_encode_base64(&dst, &src);
    out.resize(dst.len);
    if (no_padding) {
        while (!out.empty() && out.back() == '=') {
            out.pop_back();
        }
    }
    pushStd(L, out);
    return 1;
}

int decodeWith(lua_State *L, ngx_int_t (*decode)(ngx_str_t *, ngx_str_t *),
               bool with_err)
{
    if (lua_type(L, 1) != LUA_TSTRING) {
        return luaL_error(L, "string argument only");
    }
    size_t len;
    const char *s = lua_tolstring(L, 1, &len);
    std::string out(ngx_base64_decoded_length(len) + 1, '\0');
    ngx_str_t src = {len, reinterpret_cast<u_char *>(const_cast<char *>(s))};
    ngx_str_t dst = {0, reinterpret_cast<u_char *>(&out[0])};
    if (decode(&dst, &src) != NGX_OK) {
        lua_pushnil(L);
        if (with_err) {
            lua_pushliteral(L, "invalid input");
            return 2;
        }
        return 1;
    }
    lua_pushlstring(L, out.data(), dst.len);
    return 1;
}

int decodeBase64(lua_State *L)
{
    return decodeWith(L, ngx_decode_base64, false);
}

int encodeBase64url(lua_State *L)
{
    if (lua_type(L, 1) != LUA_TSTRING) {
        return luaL_error(L, "string argument only");
    }
    size_t len;
    const char *s = lua_tolstring(L, 1, &len);
    std::string out(ngx_base64_encoded_length(len), '\0');
    ngx_str_t src = {len, reinterpret_cast<u_char *>(const_cast<char *>(s))};
    ngx_str_t dst = {0, reinterpret_cast<u_char *>(&out[0])};
    ngx_encode_base64url(&dst, &src);
    lua_pushlstring(L, out.data(), dst.len);
    return 1;
}

int decodeBase64url(lua_State *L)
{
    return decodeWith(L, ngx_decode_base64url, true);
}

int md5Hex(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "md5", &len);
    unsigned char md[MD5_DIGEST_LENGTH];
    EVP_Digest(s, len, md, nullptr, EVP_md5(), nullptr);
    u_char hex[2 * MD5_DIGEST_LENGTH];
    ngx_hex_dump(hex, md, sizeof(md));
    lua_pushlstring(L, reinterpret_cast<char *>(hex), sizeof(hex));
    return 1;
}

int md5Bin(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "md5_bin", &len);
    unsigned char md[MD5_DIGEST_LENGTH];
    EVP_Digest(s, len, md, nullptr, EVP_md5(), nullptr);
    lua_pushlstring(L, reinterpret_cast<char *>(md), sizeof(md));
    return 1;
}

int sha1Bin(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "sha1_bin", &len);
    unsigned char md[SHA_DIGEST_LENGTH];
    EVP_Digest(s, len, md, nullptr, EVP_sha1(), nullptr);
    lua_pushlstring(L, reinterpret_cast<char *>(md), sizeof(md));
    return 1;
}

int hmacSha1(lua_State *L)
{
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "expecting 2 arguments, but got %d",
                          lua_gettop(L));
    }
    size_t klen, dlen;
    const char *key = luaL_checklstring(L, 1, &klen);
    const char *data = luaL_checklstring(L, 2, &dlen);
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (HMAC(EVP_sha1(), key, static_cast<int>(klen),
             reinterpret_cast<const unsigned char *>(data), dlen, md, &mdlen)
        == nullptr)
    {
        return luaL_error(L, "HMAC-SHA1 failed");
    }
    lua_pushlstring(L, reinterpret_cast<char *>(md), mdlen);
    return 1;
}

int crc32Common(lua_State *L, const char *fname)
{
    size_t len;
    const char *s = stringArg(L, 1, fname, &len);
    uLong crc = crc32(0L, Z_NULL, 0);
    // zlib takes a uInt length: feed long strings in slices.
    while (len > 0) {
        uInt n = len > 0x40000000 ? 0x40000000 : static_cast<uInt>(len);
        crc = crc32(crc, reinterpret_cast<const Bytef *>(s), n);
        s += n;
        len -= n;
    }
    lua_pushnumber(L, static_cast<lua_Number>(crc));
    return 1;
}

int crc32Short(lua_State *L)
{
    return crc32Common(L, "crc32_short");
}

int crc32Long(lua_State *L)
{
    return crc32Common(L, "crc32_long");
}

int quoteSqlStr(lua_State *L)
{
    if (lua_gettop(L) != 1) {
        return luaL_error(L, "expecting one argument");
    }
    size_t len;
    const char *s = luaL_checklstring(L, 1, &len);
    pushStd(L, codec::quoteSqlStr(s, len));
    return 1;
}

int escapeHtml(lua_State *L)
{
    size_t len;
    const char *s = stringArg(L, 1, "escape_html", &len);
    pushStd(L, codec::escapeHtml(s, len));
    return 1;
}

int openBase64Module(lua_State *L)
{
    const luaL_Reg fns[] = {{"encode_base64url", encodeBase64url},
                            {"decode_base64url", decodeBase64url},
                            {nullptr, nullptr}};
    lua_createtable(L, 0, 3);
    setFuncs(L, fns);
    lua_pushliteral(L, "0.1.0");
    lua_setfield(L, -2, "version");
    return 1;
}

// Appends "key" or "key=value" for one value of encode_args' table. Returns
// false with an error message pushed for a value that has no query form.
bool addArg(lua_State *L, std::string *out, const std::string &key, int vidx)
{
    switch (lua_type(L, vidx)) {
    case LUA_TBOOLEAN:
        if (!lua_toboolean(L, vidx)) {
            return true;
        }
        if (!out->empty()) {
            out->push_back('&');
        }
        *out += key;
        return true;
    case LUA_TSTRING:
    case LUA_TNUMBER: {
        size_t len;
        const char *s = lua_tolstring(L, vidx, &len);
        if (!out->empty()) {
            out->push_back('&');
        }
        *out += key;
        out->push_back('=');
        *out += codec::escapeUri(s, len, codec::UriEscape::Component);
        return true;
    }
    default:
        // Tables nested in a value's array land here too.
        lua_pushfstring(L, "attempt to use %s as query arg value",
                        luaL_typename(L, vidx));
        return false;
    }
}

// `len` bytes to write into: on the stack when they fit in N, else on the
// heap (a header name, a query string: nearly always the stack).
template <size_t N>
class Scratch {
 public:
    explicit Scratch(size_t len)
    {
        if (len > N) {
            heap_.resize(len);
            buf_ = heap_.data();
        }
    }
    Scratch(const Scratch &) = delete;
    Scratch &operator=(const Scratch &) = delete;
    char *data() { return buf_; }

 private:
    char stack_[N];
    std::string heap_;
    char *buf_ = stack_;
};

}  // namespace

bool encodeArgsTable(lua_State *L, int idx, std::string *out)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    int base = lua_gettop(L);
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 2);
            lua_pushliteral(L, "attempt to use a non-string key in the "
                               "\"args\" option table");
            return false;
        }
        size_t klen;
        const char *k = lua_tolstring(L, -2, &klen);
        std::string key = codec::escapeUri(k, klen,
                                           codec::UriEscape::Component);
        int vidx = lua_gettop(L);
        if (lua_istable(L, vidx)) {
            size_t n = lua_objlen(L, vidx);
            for (size_t i = 1; i <= n; i++) {
                lua_rawgeti(L, vidx, static_cast<int>(i));
                if (!addArg(L, out, key, lua_gettop(L))) {
                    lua_replace(L, base + 1);
                    lua_settop(L, base + 1);
                    return false;
                }
                lua_pop(L, 1);
            }
        } else if (!addArg(L, out, key, vidx)) {
            lua_replace(L, base + 1);
            lua_settop(L, base + 1);
            return false;
        }
        lua_pop(L, 1);
    }
    return true;
}

void addMultiValue(lua_State *L, int t)
{
    lua_pushvalue(L, -2);
    lua_rawget(L, t);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_rawset(L, t);
    } else if (lua_istable(L, -1)) {
        lua_insert(L, -2);
        lua_rawseti(L, -2, static_cast<int>(lua_objlen(L, -2) + 1));
        lua_pop(L, 2);
    } else {
        // key value old -> key {old, value}
        lua_createtable(L, 4, 0);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 1);
        lua_insert(L, -2);
        lua_rawseti(L, -2, 2);
        lua_rawset(L, t);
    }
}

MultiTable::MultiTable(lua_State *L, size_t expected) : L_(L)
{
    // At most half full: probes stay short.
    unsigned slots = 16;
    while (slots < kSlots && slots < 2 * expected) {
        slots *= 2;
    }
    mask_ = slots - 1;
    left_ = slots / 2;
    std::memset(seen_, 0, slots * sizeof(seen_[0]));
    lua_createtable(L, 0, static_cast<int>(expected < 1024 ? expected : 1024));
    t_ = lua_gettop(L);
}

void MultiTable::add()
{
    if (left_ == 0) {
        addMultiValue(L_, t_);
        return;
    }
    // LuaJIT interns strings, and lua_topointer gives a string's object:
    // equal keys have equal pointers. The table anchors every key, so no
    // pointer is reused while the set lives.
    const void *key = lua_topointer(L_, -2);
    auto h = reinterpret_cast<uintptr_t>(key) >> 3;
    unsigned i = static_cast<unsigned>(h * 0x9E3779B97F4A7C15ull >> 40)
                 & mask_;
    while (seen_[i] != nullptr) {
        if (seen_[i] == key) {
            addMultiValue(L_, t_);
            return;
        }
        i = (i + 1) & mask_;
    }
    seen_[i] = key;
    left_--;
    lua_rawset(L_, t_);
}

void pushLower(lua_State *L, const char *s, size_t len, bool dashes)
{
    Scratch<128> scratch(len);
    char *buf = scratch.data();
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        buf[i] = c >= 'A' && c <= 'Z' ? static_cast<char>(c | 0x20)
                 : dashes && c == '_' ? '-' : c;
    }
    lua_pushlstring(L, buf, len);
}

bool pushArgsTable(lua_State *L, const char *s, size_t len, size_t max_args)
{
    size_t n = codec::countArgs(s, len);
    MultiTable t(L, max_args && n > max_args ? max_args : n);
    Scratch<512> scratch(len);
    codec::ArgReader reader(s, len, scratch.data());
    codec::Arg a;
    size_t count = 0;
    while (reader.next(&a)) {
        if (max_args && count == max_args) {
            return true;
        }
        count++;
        lua_pushlstring(L, a.key, a.key_len);
        if (a.has_value) {
            lua_pushlstring(L, a.value, a.value_len);
        } else {
            lua_pushboolean(L, 1);
        }
        t.add();
    }
    return false;
}

void openUtil(lua_State *L)
{
    const luaL_Reg fns[] = {{"escape_uri", escapeUri},
                            {"unescape_uri", unescapeUri},
                            {"encode_args", encodeArgs},
                            {"decode_args", decodeArgs},
                            {"encode_base64", encodeBase64},
                            {"decode_base64", decodeBase64},
                            {"md5", md5Hex},
                            {"md5_bin", md5Bin},
                            {"sha1_bin", sha1Bin},
                            {"hmac_sha1", hmacSha1},
                            {"crc32_short", crc32Short},
                            {"crc32_long", crc32Long},
                            {"quote_sql_str", quoteSqlStr},
                            {"escape_html", escapeHtml},
                            {nullptr, nullptr}};
    setFuncs(L, fns);

    preload(L, "ngx.base64", openBase64Module);
}

int unsafeUriError(lua_State *L, const char *uri, size_t len, size_t bad,
                   const char *what, const char *hint)
{
    std::string shown = codec::showUnsafeUri(uri, len);
    char byte[4];
    std::snprintf(byte, sizeof(byte), "%02x",
                  static_cast<unsigned char>(uri[bad]));
    return luaL_error(L, "unsafe byte \"0x%s\" in %s \"%s\"%s", byte, what,
                      shown.c_str(), hint);
}

ngx_http_request_t *ffiRequest(int max)
{
    Run *run = g_run;
    if (run == nullptr || run->ctx == nullptr
        || !(mask(run->phase) & kRequest) || max < 0)
    {
        return nullptr;
    }
    return run->ctx->r;
}

}  // namespace luaguard::api
