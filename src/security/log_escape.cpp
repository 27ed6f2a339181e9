#include "security/log_escape.hpp"

#include <cstring>

namespace luaguard {

void appendLogEscaped(std::string &out, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";

    for (size_t i = 0; i < len; i++) {
        unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c != 0x7f) {
            out.push_back(static_cast<char>(c));
        } else if (c == '\t') {
            out.push_back('\t');
        } else if (c == '\n') {
            out.append("\\n");
        } else if (c == '\r') {
            out.append("\\r");
        } else {
            out.append("\\x");
            out.push_back(hex[c >> 4]);
            out.push_back(hex[c & 0xf]);
        }
    }
}

namespace {

void appendEscaped(std::string &out, const char *s)
{
    if (s != nullptr) {
        appendLogEscaped(out, s, std::strlen(s));
    }
}

void appendFrame(std::string &out, lua_State *co, lua_Debug *ar)
{
    lua_getinfo(co, "Snl", ar);
    out.append("\n\t");
    appendEscaped(out, ar->short_src);
    out.push_back(':');
    if (ar->currentline > 0) {
        out.append(std::to_string(ar->currentline));
        out.push_back(':');
    }
    if (ar->namewhat != nullptr && *ar->namewhat) {
        out.append(" in function '");
        appendEscaped(out, ar->name);
        out.push_back('\'');
    } else if (ar->what != nullptr && *ar->what == 'm') {
        out.append(" in main chunk");
    } else if (ar->what != nullptr && *ar->what == 'C') {
        out.append(" ?");
    } else {
        out.append(" in function <");
        appendEscaped(out, ar->short_src);
        out.push_back(':');
        out.append(std::to_string(ar->linedefined));
        out.push_back('>');
    }
}

}  // namespace

std::string escapedTraceback(lua_State *co, int level)
{
    // As luaL_traceback: the first 12 frames, "...", the last 10.
    constexpr int kHead = 12;
    constexpr int kTail = 10;
    lua_Debug ar;
    int depth = level;
    while (lua_getstack(co, depth, &ar)) {
        depth++;
    }
    std::string out = "stack traceback:";
    for (int i = level; i < depth; i++) {
        if (i - level == kHead && depth - i > kTail) {
            out.append("\n\t...");
            i = depth - kTail - 1;
            continue;
        }
        if (lua_getstack(co, i, &ar)) {
            appendFrame(out, co, &ar);
        }
    }
    return out;
}

std::string safeTraceback(const std::string &text)
{
    static const std::string head = "stack traceback:";
    std::string out;
    size_t start = 0;
    for (;;) {
        size_t nl = text.find('\n', start);
        size_t end = nl == std::string::npos ? text.size() : nl;
        if (start > 0) {
            out.push_back('\n');
        }
        bool fixed = start == 0 && text.compare(0, end, head) == 0;
        if (!fixed && (end == start || text[start] != '\t')) {
            out.push_back('\t');
        }
        appendLogEscaped(out, text.data() + start, end - start);
        if (nl == std::string::npos) {
            return out;
        }
        start = nl + 1;
    }
}

}  // namespace luaguard
