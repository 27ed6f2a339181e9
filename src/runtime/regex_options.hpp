// ngx.re option strings ("jo", "ims", ...) parsed into flags. No PCRE here:
// the binding maps these bits onto PCRE2's.
#pragma once

#include <cstdint>
#include <string_view>

namespace luaguard::regex {

// Options that change the compiled pattern; together with the pattern they
// form the key of the compile-once cache.
enum CompileFlag : uint32_t {
    kAnchored = 1u << 0,     // a
    kCaseless = 1u << 1,     // i
    kDupNames = 1u << 2,     // D
    kMultiline = 1u << 3,    // m
    kDotAll = 1u << 4,       // s
    kUtf = 1u << 5,          // u, U
    kExtended = 1u << 6,     // x
    kJsCompat = 1u << 7,     // J
    kUngreedy = 1u << 8,     // reserved; no ngx.re letter maps here
    kJit = 1u << 9,          // j
    kDfa = 1u << 10,         // d
};

struct Options {
    uint32_t flags = 0;      // CompileFlag bits, the cache key part
    bool     once = false;   // o: compile once, keep in the per-worker cache
    bool     no_utf_check = false;  // U (we still validate, see regex.cpp)
};

// Parses `opts`. On an unknown letter returns false and sets *bad to it;
// the caller raises lua-nginx-module's `unknown flag "X" (flags "...")`.
bool parseOptions(std::string_view opts, Options *out, char *bad);

}  // namespace luaguard::regex
