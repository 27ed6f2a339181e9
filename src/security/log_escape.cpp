#include "security/log_escape.hpp"

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

}  // namespace luaguard
