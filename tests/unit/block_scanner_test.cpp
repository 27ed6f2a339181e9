#include "runtime/block_scanner.hpp"

#include <gtest/gtest.h>

#include <string>

using luaguard::BlockScanner;

namespace {

// Feeds `text` in pieces of `step` bytes; returns the code before the
// closing brace, or "<more>" when the block never closed.
std::string scan(const std::string &text, size_t step, size_t *lines = nullptr)
{
    BlockScanner s;
    for (size_t off = 0; off < text.size(); off += step) {
        size_t n = std::min(step, text.size() - off);
        size_t used = 0;
        if (s.feed(text.data() + off, n, &used)
            == BlockScanner::Status::Done)
        {
            if (lines) {
                *lines = s.lines();
            }
            return text.substr(0, off + used - 1);
        }
    }
    return "<more>";
}

void expectAllSplits(const std::string &code, const std::string &after = "")
{
    for (size_t step = 1; step <= code.size() + 1; step++) {
        EXPECT_EQ(scan(code + "}" + after, step), code) << "step " << step;
    }
}

}  // namespace

TEST(BlockScanner, PlainCodeEndsAtFirstUnmatchedBrace)
{
    expectAllSplits(" ngx.say('hi') ", " location / {}");
}

TEST(BlockScanner, NestedTableBraces)
{
    expectAllSplits(" local t = {a = {1, 2}, b = {}} ngx.say(#t) ");
}

TEST(BlockScanner, BracesInShortStrings)
{
    expectAllSplits(" ngx.say(\"}\", '}', \"{\") ");
}

TEST(BlockScanner, EscapedQuotesDoNotEndStrings)
{
    expectAllSplits(" ngx.say(\"a\\\"}\", 'b\\'}') ");
}

TEST(BlockScanner, LongStringsAtAnyLevel)
{
    expectAllSplits(" local s = [[ } ]] local t = [==[ ]] } ]=] ]==] ");
}

TEST(BlockScanner, LineCommentsHideBraces)
{
    expectAllSplits(" -- } not the end\n ngx.say(1) ");
}

TEST(BlockScanner, LongCommentsHideBraces)
{
    expectAllSplits(" --[[ } ]] --[=[ } ]] } ]=] x = 1 ");
}

TEST(BlockScanner, CommentStartingWithBracketButNotLong)
{
    // "--[ }" is a line comment: the brace is hidden until the newline.
    expectAllSplits(" --[ }\n x = 1 ");
}

TEST(BlockScanner, IndexingIsNotALongBracket)
{
    expectAllSplits(" local a = t[1] local b = t[ [[}]] ] ");
}

TEST(BlockScanner, MinusAloneIsCode)
{
    expectAllSplits(" local x = 1 - 2 local y = -{}[1] ");
}

TEST(BlockScanner, CountsLines)
{
    size_t lines = 0;
    EXPECT_EQ(scan("\n a = 1\n --[[\n]]\n}", 3, &lines),
              "\n a = 1\n --[[\n]]\n");
    EXPECT_EQ(lines, 4u);
}

TEST(BlockScanner, UnclosedLongStringNeedsMore)
{
    EXPECT_EQ(scan(" local s = [[ } ", 4), "<more>");
    BlockScanner s;
    size_t used;
    s.feed(" x = [==[ }", 11, &used);
    EXPECT_STREQ(s.context(), "a long string");
}

TEST(BlockScanner, NewlineEndsAnUnterminatedShortString)
{
    // Lua rejects it; the scanner must not swallow the configuration.
    EXPECT_EQ(scan(" x = 'abc\n}", 2), " x = 'abc\n");
}
