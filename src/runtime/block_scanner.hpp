// Finds the end of a `*_by_lua_block { ... }` body. nginx hands us the bytes
// after the opening brace; Lua's lexical rules decide which closing brace
// ends the block (braces inside strings, long strings and comments do not
// count). Incremental, because nginx reads its configuration in 4 KiB
// pieces and a block may span several.
#pragma once

#include <cstddef>

namespace luaguard {

class BlockScanner {
 public:
    enum class Status { NeedMore, Done };

    // Scans data[0..len). On Done, *used is the offset just past the
    // closing brace, which is not part of the Lua code. On NeedMore every
    // byte was used.
    Status feed(const char *data, size_t len, size_t *used);

    // Newlines consumed so far (nginx keeps its line counter with them).
    size_t lines() const { return lines_; }

    // What the scanner was inside of when input ended early, for the error.
    const char *context() const;

 private:
    enum class State {
        Code,
        Dash,          // '-' seen in code
        CommentStart,  // "--" seen
        LineComment,
        OpenBracket,   // '[' and maybe '='s: a long bracket may start
        LongText,      // inside a long string or long comment
        CloseBracket,  // ']' and maybe '='s inside long text
        ShortString,
        Escape,
    };

    State state_ = State::Code;
    bool long_is_comment_ = false;
    int level_ = 0;        // '=' count of the open long bracket
    int eqs_ = 0;          // '=' count seen while matching a bracket
    char quote_ = 0;
    int depth_ = 0;
    size_t lines_ = 0;
};

}  // namespace luaguard
