#include "runtime/regex_template.hpp"

namespace luaguard::regex {

namespace {

bool isDigit(char c) { return c >= '0' && c <= '9'; }

// Group numbers too large for any pattern (PCRE2 allows 65535 groups) are
// kept as "no such group": they expand to nothing, as in the reference.
constexpr uint32_t kTooBig = 1u << 20;

uint32_t parseGroup(std::string_view s, size_t *i)
{
    uint32_t n = 0;
    while (*i < s.size() && isDigit(s[*i])) {
        if (n < kTooBig) {
            n = n * 10 + static_cast<uint32_t>(s[*i] - '0');
        }
        ++*i;
    }
    return n < kTooBig ? n : kTooBig;
}

}  // namespace

bool ReplTemplate::compile(std::string_view src, std::string *err)
{
    auto invalid = [&] {
        if (err) {
            *err = "lua script: invalid capturing variable name found in \"";
            err->append(src);
            err->push_back('"');
        }
        return false;
    };
    auto isName = [](char c) {
        return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
               || isDigit(c);
    };
    auto named = [&](size_t from) {
        size_t end = from;
        while (end < src.size() && isName(src[end])) {
            end++;
        }
        if (err) {
            *err = "attempt to use named capturing variable \"";
            err->append(src.substr(from, end - from));
            err->append("\" (named captures not supported yet)");
        }
        return false;
    };
    text_.clear();
    pieces_.clear();
    literal_ = true;
    size_t i = 0;
    auto addText = [this](std::string_view t) {
        if (t.empty()) {
            return;
        }
        if (!pieces_.empty() && pieces_.back().group == kText) {
            pieces_.back().len += static_cast<uint32_t>(t.size());
        } else {
            pieces_.push_back({kText, static_cast<uint32_t>(text_.size()),
                               static_cast<uint32_t>(t.size())});
        }
        text_.append(t);
    };
    while (i < src.size()) {
        size_t dollar = src.find('$', i);
        if (dollar == std::string_view::npos) {
            addText(src.substr(i));
            break;
        }
        addText(src.substr(i, dollar - i));
        i = dollar + 1;
        if (i >= src.size()) {
            return invalid();
        }
        char c = src[i];
        if (c == '$') {
            addText("$");
            i++;
        } else if (isDigit(c)) {
            pieces_.push_back({parseGroup(src, &i), 0, 0});
            literal_ = false;
        } else if (c == '{') {
            i++;
            if (i < src.size() && isName(src[i]) && !isDigit(src[i])) {
                return named(i);
            }
            if (i >= src.size() || !isDigit(src[i])) {
                return invalid();
            }
            size_t from = i;
            uint32_t g = parseGroup(src, &i);
            if (i >= src.size() || src[i] != '}') {
                if (err) {
                    *err = "the closing bracket in \"";
                    err->append(src.substr(from, i - from));
                    err->append("\" variable is missing");
                }
                return false;
            }
            i++;
            pieces_.push_back({g, 0, 0});
            literal_ = false;
        } else if (isName(c)) {
            return named(i);
        } else {
            return invalid();
        }
    }
    return true;
}

void ReplTemplate::expand(const char *subject, const size_t *ovector,
                          uint32_t npairs, std::string *out) const
{
    for (const Piece &p : pieces_) {
        if (p.group == kText) {
            out->append(text_, p.off, p.len);
            continue;
        }
        if (p.group >= npairs) {
            continue;
        }
        size_t from = ovector[2 * p.group];
        size_t to = ovector[2 * p.group + 1];
        if (from == kUnset || to < from) {
            continue;
        }
        out->append(subject + from, to - from);
    }
}

}  // namespace luaguard::regex
