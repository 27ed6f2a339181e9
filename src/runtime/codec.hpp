// Pure encoders and parsers behind ngx.escape_uri, ngx.unescape_uri,
// ngx.encode_args / decode_args, ngx.req.get_uri_args / get_post_args,
// ngx.quote_sql_str and ngx.escape_html. No nginx, no Lua: unit-tested
// on their own.
#pragma once

#include <cstddef>
#include <string>

namespace luaguard::codec {

// ngx.escape_uri's documented types.
enum class UriEscape {
    Full = 0,       // a whole URI: space # % ? controls and bytes >= 0x7f
    Component = 2,  // a URI component: all but ALPHA DIGIT - . _ ~ ! * ' ( )
};

std::string escapeUri(const char *s, size_t len, UriEscape type);

// Decodes %XX sequences (invalid ones stay as they are) and, as ngx.req
// args and ngx.unescape_uri do, '+' as a space.
std::string unescapeUri(const char *s, size_t len);

// unescapeUri into `out`, which has room for `len` bytes (decoding never
// grows the text); returns the decoded length.
size_t unescapeUriTo(const char *s, size_t len, char *out);

// One argument of a query string, decoded into the reader's buffer. `has_value` is false for "key" without '='
// (ngx.req.get_uri_args gives it the value true).
struct Arg {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
    bool has_value;
};

// Splits "a=1&b&c=%20" into unescaped pairs, skipping empty segments and
// segments with an empty key. The pairs are decoded one after the other
// into the caller's buffer (room for `len` bytes), where they all stay:
// the args tables are filled without a heap string per argument, and the
// FFI path hands them all out at once.
class ArgReader {
public:
    ArgReader(const char *s, size_t len, char *buf)
        : s_(s), len_(len), buf_(buf)
    {}
    bool next(Arg *arg);

private:
    const char *s_;
    size_t len_;
    size_t pos_ = 0;
    char *buf_;
};

// An upper bound of the arguments of `s` ('&' count + 1), for sizing.
size_t countArgs(const char *s, size_t len);

// The bytes a query string set through ngx.req.set_uri_args(string) may
// not carry raw: controls, space and DEL, percent-encoded. Everything
// else stays, so pre-encoded strings keep their meaning.
std::string escapeArgsString(const char *s, size_t len);

// Index of the first byte set_uri and ngx.redirect refuse (controls other
// than TAB, DEL), or npos when the URI is safe to put in a request line
// or a Location header.
size_t unsafeUriByte(const char *s, size_t len);

// The text shown for a refused URI in an error message: the bytes below
// 0x20, from 0x7f and the backslash as \xHH, stopping once `max` bytes
// are shown (lua-nginx-module's rendering).
std::string showUnsafeUri(const char *s, size_t len, size_t max = 512);

// Header integrity: every header written from Lua (ngx.header,
// ngx.req.set_header) and every Lua-written nginx variable (which
// add_header or proxy_set_header may put in a header) goes through these
// two, so Lua data can never end a header line or start one of its own.
//
// A header name: every byte that is not an RFC 9110 token character
// (controls, space, separators such as ':' ';' '=' '/', DEL and bytes
// from 0x80) percent-encoded, as lua-nginx-module does.
std::string escapeHeaderName(const char *s, size_t len);

// A header value: the bytes RFC 9110 forbids in a field value (controls
// other than TAB, and DEL) percent-encoded, as lua-nginx-module does;
// bytes from 0x80 stay.
std::string escapeHeaderValue(const char *s, size_t len);

// The first byte escapeHeaderName / escapeHeaderValue would change, or
// len when there is none: the usual header is copied as it is.
size_t headerNameClean(const char *s, size_t len);
size_t headerValueClean(const char *s, size_t len);

// True for an RFC 9110 tchar: ALPHA DIGIT ! # $ % & ' * + - . ^ _ ` | ~
struct TokenChars {
    bool is[256];
};
extern const TokenChars kTokenChars;
inline bool isTokenChar(unsigned char c)
{
    return kTokenChars.is[c];
}

// A MySQL string literal: quoted, with \0 \b \n \r \t \Z \\ \' \" escaped.
std::string quoteSqlStr(const char *s, size_t len);

// & < > " ' as HTML entities: safe to echo inside elements and quoted
// attribute values.
std::string escapeHtml(const char *s, size_t len);

}  // namespace luaguard::codec
