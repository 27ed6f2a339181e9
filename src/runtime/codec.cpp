#include "runtime/codec.hpp"

#include <cstring>

namespace luaguard::codec {

namespace {

const char kHex[] = "0123456789ABCDEF";

void addEscaped(std::string &out, unsigned char c)
{
    out.push_back('%');
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 0xf]);
}

bool isAlnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z')
           || (c >= 'A' && c <= 'Z');
}

bool keepFull(unsigned char c)
{
    if (c <= 0x20 || c >= 0x7f) {
        return false;
    }
    return c != '#' && c != '%' && c != '?';
}

bool keepComponent(unsigned char c)
{
    if (isAlnum(c)) {
        return true;
    }
    switch (c) {
    case '-': case '.': case '_': case '~':
    case '!': case '*': case '\'': case '(': case ')':
        return true;
    default:
        return false;
    }
}

int hexValue(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c |= 0x20;
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

}  // namespace

std::string escapeUri(const char *s, size_t len, UriEscape type)
{
    std::string out;
    out.reserve(len);
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        bool keep = type == UriEscape::Full ? keepFull(c) : keepComponent(c);
        if (keep) {
            out.push_back(static_cast<char>(c));
        } else {
            addEscaped(out, c);
        }
    }
    return out;
}

size_t unescapeUriTo(const char *s, size_t len, char *out)
{
    char *o = out;
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if (c == '+') {
            *o++ = ' ';
            continue;
        }
        if (c == '%' && len - i > 2) {
            int hi = hexValue(static_cast<unsigned char>(s[i + 1]));
            int lo = hexValue(static_cast<unsigned char>(s[i + 2]));
            if (hi >= 0 && lo >= 0) {
                *o++ = static_cast<char>(hi << 4 | lo);
                i += 2;
                continue;
            }
        }
        *o++ = static_cast<char>(c);
    }
    return static_cast<size_t>(o - out);
}

std::string unescapeUri(const char *s, size_t len)
{
    std::string out(len, '\0');
    out.resize(unescapeUriTo(s, len, out.data()));
    return out;
}

bool ArgReader::next(Arg *arg)
{
    while (pos_ < len_) {
        size_t i = pos_;
        auto *amp = static_cast<const char *>(
            std::memchr(s_ + i, '&', len_ - i));
        size_t end = amp ? static_cast<size_t>(amp - s_) : len_;
        pos_ = end + 1;
        size_t eq = i;
        while (eq < end && s_[eq] != '=') {
            eq++;
        }
        // "" (from "&&") and "=value" carry no key: skipped.
        if (eq == i) {
            continue;
        }
        arg->key = buf_;
        arg->key_len = unescapeUriTo(s_ + i, eq - i, buf_);
        arg->has_value = eq < end;
        arg->value = buf_ + arg->key_len;
        arg->value_len = arg->has_value
                             ? unescapeUriTo(s_ + eq + 1, end - eq - 1,
                                             buf_ + arg->key_len)
                             : 0;
        buf_ += arg->key_len + arg->value_len;
        return true;
    }
    return false;
}

size_t countArgs(const char *s, size_t len)
{
    size_t n = 1;
    for (size_t i = 0; i < len; i++) {
        n += s[i] == '&';
    }
    return n;
}

std::string escapeArgsString(const char *s, size_t len)
{
    std::string out;
    out.reserve(len);
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if (c <= 0x20 || c == 0x7f) {
            addEscaped(out, c);
        } else {
            out.push_back(static_cast<char>(c));
        }
    }
    return out;
}

size_t unsafeUriByte(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if ((c < 0x20 && c != '\t') || c == 0x7f) {
            return i;
        }
    }
    return std::string::npos;
}

std::string showUnsafeUri(const char *s, size_t len, size_t max)
{
    std::string shown;
    for (size_t i = 0; i < len && shown.size() < max; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if (c < 0x20 || c >= 0x7f || c == '\\') {
            shown += "\\x";
            shown.push_back(kHex[c >> 4]);
            shown.push_back(kHex[c & 0xf]);
        } else {
            shown.push_back(static_cast<char>(c));
        }
    }
    return shown;
}

namespace {

constexpr TokenChars makeTokenChars()
{
    TokenChars t{};
    for (int c = '0'; c <= '9'; c++) {
        t.is[c] = true;
    }
    for (int c = 'A'; c <= 'Z'; c++) {
        t.is[c] = true;
        t.is[c - 'A' + 'a'] = true;
    }
    for (const char *p = "!#$%&'*+-.^_`|~"; *p; p++) {
        t.is[static_cast<unsigned char>(*p)] = true;
    }
    return t;
}

bool valueByteEscaped(unsigned char c)
{
    return (c < 0x20 && c != '\t') || c == 0x7f;
}

}  // namespace

constexpr TokenChars kTokenChars = makeTokenChars();

size_t headerNameClean(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len && isTokenChar(static_cast<unsigned char>(s[i]))) {
        i++;
    }
    return i;
}

size_t headerValueClean(const char *s, size_t len)
{
    size_t i = 0;
    while (i < len && !valueByteEscaped(static_cast<unsigned char>(s[i]))) {
        i++;
    }
    return i;
}

std::string escapeHeaderName(const char *s, size_t len)
{
    std::string out;
    out.reserve(len);
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if (isTokenChar(c)) {
            out.push_back(static_cast<char>(c));
        } else {
            addEscaped(out, c);
        }
    }
    return out;
}

std::string escapeHeaderValue(const char *s, size_t len)
{
    std::string out;
    out.reserve(len);
    for (size_t i = 0; i < len; i++) {
        auto c = static_cast<unsigned char>(s[i]);
        if (valueByteEscaped(c)) {
            addEscaped(out, c);
        } else {
            out.push_back(static_cast<char>(c));
        }
    }
    return out;
}

std::string quoteSqlStr(const char *s, size_t len)
{
    std::string out;
    out.reserve(len + 2);
    out.push_back('\'');
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        switch (c) {
        case '\0': out += "\\0"; break;
        case '\b': out += "\\b"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\x1a': out += "\\Z"; break;
        case '\\': out += "\\\\"; break;
        case '\'': out += "\\'"; break;
        case '"': out += "\\\""; break;
        default: out.push_back(c);
        }
    }
    out.push_back('\'');
    return out;
}

std::string escapeHtml(const char *s, size_t len)
{
    std::string out;
    out.reserve(len);
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        switch (c) {
        case '&': out += "&amp;"; break;
        case '<': out += "&lt;"; break;
        case '>': out += "&gt;"; break;
        case '"': out += "&quot;"; break;
        case '\'': out += "&#39;"; break;
        default: out.push_back(c);
        }
    }
    return out;
}

}  // namespace luaguard::codec
