#include "runtime/block_scanner.hpp"

namespace luaguard {

BlockScanner::Status BlockScanner::feed(const char *data, size_t len,
                                        size_t *used)
{
    size_t i = 0;

    while (i < len) {
        char ch = data[i];

        switch (state_) {
        case State::Code:
            if (ch == '{') {
                depth_++;
            } else if (ch == '}') {
                if (depth_ == 0) {
                    *used = i + 1;
                    return Status::Done;
                }
                depth_--;
            } else if (ch == '"' || ch == '\'') {
                quote_ = ch;
                state_ = State::ShortString;
            } else if (ch == '-') {
                state_ = State::Dash;
            } else if (ch == '[') {
                long_is_comment_ = false;
                eqs_ = 0;
                state_ = State::OpenBracket;
            }
            break;

        case State::Dash:
            if (ch == '-') {
                state_ = State::CommentStart;
                break;
            }
            state_ = State::Code;
            continue;  // the byte after a lone '-' is ordinary code

        case State::CommentStart:
            if (ch == '[') {
                long_is_comment_ = true;
                eqs_ = 0;
                state_ = State::OpenBracket;
                break;
            }
            state_ = State::LineComment;
            continue;

        case State::LineComment:
            if (ch == '\n') {
                state_ = State::Code;
            }
            break;

        case State::OpenBracket:
            if (ch == '=') {
                eqs_++;
                break;
            }
            if (ch == '[') {
                level_ = eqs_;
                state_ = State::LongText;
                break;
            }
            // Not a long bracket: "[" in code, or "--[" starting a line
            // comment. The current byte is looked at again in that state.
            state_ = long_is_comment_ ? State::LineComment : State::Code;
            continue;

        case State::LongText:
            if (ch == ']') {
                eqs_ = 0;
                state_ = State::CloseBracket;
            }
            break;

        case State::CloseBracket:
            if (ch == '=') {
                eqs_++;
                break;
            }
            if (ch == ']') {
                if (eqs_ == level_) {
                    state_ = State::Code;
                } else {
                    eqs_ = 0;  // "]=]" can start the real closer
                }
                break;
            }
            state_ = State::LongText;
            continue;

        case State::ShortString:
            if (ch == '\\') {
                state_ = State::Escape;
            } else if (ch == quote_) {
                state_ = State::Code;
            } else if (ch == '\n') {
                // Lua rejects this; leave the error to the compiler rather
                // than swallowing the rest of the configuration.
                state_ = State::Code;
            }
            break;

        case State::Escape:
            state_ = State::ShortString;
            break;
        }

        if (ch == '\n') {
            lines_++;
        }
        i++;
    }

    *used = len;
    return Status::NeedMore;
}

const char *BlockScanner::context() const
{
    switch (state_) {
    case State::ShortString:
    case State::Escape:
        return "a string";
    case State::LongText:
    case State::CloseBracket:
        return long_is_comment_ ? "a long comment" : "a long string";
    default:
        return "Lua code";
    }
}

}  // namespace luaguard
