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

// Index of the first byte set_uri refuses (controls other than TAB, DEL),
// or npos when the URI is safe to put in a request line.
size_t unsafeUriByte(const char *s, size_t len);

// Percent-encodes the bytes RFC 7230 forbids in a header field (controls
// except TAB, DEL; TAB too when `name`), so the text can never start a
// header line of its own.
std::string escapeHeaderBytes(const char *s, size_t len, bool name);

// A MySQL string literal: quoted, with \0 \b \n \r \t \Z \\ \' \" escaped.
std::string quoteSqlStr(const char *s, size_t len);

// & < > " ' as HTML entities: safe to echo inside elements and quoted
// attribute values.
std::string escapeHtml(const char *s, size_t len);

}  // namespace luaguard::codec
