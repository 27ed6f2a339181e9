// sub/gsub replacement templates: "$0", "$12", "${1}", "$$". Compiled once
// into literal and group pieces, then expanded per match without parsing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace luaguard::regex {

// An unset capture in an ovector (same value as PCRE2_UNSET).
constexpr size_t kUnset = ~static_cast<size_t>(0);

class ReplTemplate {
 public:
    // False when `src` is not a valid template: a "$" not followed by a
    // digit, "{digits}" or "$" (lua-nginx-module then reports "failed to
    // compile the replacement template"); `err` then gets the reason in
    // the words lua-nginx-module logs.
    bool compile(std::string_view src, std::string *err = nullptr);

    // Appends the expansion for one match. `ovector` holds `npairs`
    // (start, end) pairs for groups 0..npairs-1; a missing or unset group
    // expands to nothing.
    void expand(const char *subject, const size_t *ovector, uint32_t npairs,
                std::string *out) const;

    bool literal() const { return literal_; }
    const std::string &text() const { return text_; }

 private:
    static constexpr uint32_t kText = ~static_cast<uint32_t>(0);
    struct Piece {
        uint32_t group;      // kText for literal text
        uint32_t off, len;   // the literal's place in text_
    };
    std::string         text_;
    std::vector<Piece>  pieces_;
    bool                literal_ = true;
};

}  // namespace luaguard::regex
