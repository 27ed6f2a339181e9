// Pure encoders and parsers behind ngx.escape_uri, ngx.unescape_uri,
// ngx.encode_args / decode_args, ngx.req.get_uri_args / get_post_args,
// ngx.quote_sql_str and ngx.escape_html. No nginx, no Lua: unit-tested
// on their own.
#pragma once

#include <cstddef>
#include <functional>
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

// One argument of a query string: `has_value` is false for "key" without
// '=' (ngx.req.get_uri_args gives it the value true).
using ArgSink = std::function<void(const std::string &key, bool has_value,
                                   const std::string &value)>;

// Splits "a=1&b&c=%20" into unescaped pairs, skipping empty segments and
// segments with an empty key. Stops after `max_args` pairs when it is
// non-zero; returns true when arguments were left out for that reason.
bool parseArgs(const char *s, size_t len, size_t max_args,
               const ArgSink &sink);

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

// True for an RFC 9110 tchar: ALPHA DIGIT ! # $ % & ' * + - . ^ _ ` | ~
bool isTokenChar(unsigned char c);

// A MySQL string literal: quoted, with \0 \b \n \r \t \Z \\ \' \" escaped.
std::string quoteSqlStr(const char *s, size_t len);

// & < > " ' as HTML entities: safe to echo inside elements and quoted
// attribute values.
std::string escapeHtml(const char *s, size_t len);

}  // namespace luaguard::codec
