#include "security/log_escape.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace {

std::string esc(const std::string &s)
{
    std::string out;
    luaguard::appendLogEscaped(out, s.data(), s.size());
    return out;
}

}  // namespace

TEST(LogEscape, PrintableUnchanged)
{
    EXPECT_EQ(esc("hello, world \\ \"x\"\ttab"), "hello, world \\ \"x\"\ttab");
}

TEST(LogEscape, LineBreaksCannotForgeALine)
{
    std::string forged = "x\n2026/01/01 00:00:00 [emerg] 1#1: forged\r\n";
    std::string out = esc(forged);
    EXPECT_EQ(out.find('\n'), std::string::npos);
    EXPECT_EQ(out.find('\r'), std::string::npos);
    EXPECT_EQ(out, "x\\n2026/01/01 00:00:00 [emerg] 1#1: forged\\r\\n");
}

TEST(LogEscape, OtherControlBytesAsHex)
{
    EXPECT_EQ(esc(std::string("a\0b\x1b[31m\x7f", 9)), "a\\x00b\\x1b[31m\\x7f");
}

TEST(LogEscape, HighBytesKept)
{
    EXPECT_EQ(esc("caf\xc3\xa9"), "caf\xc3\xa9");
}

namespace {

// Every line after the first starts with a tab; the first is the header.
void expectNoLineAtColumnZero(const std::string &tb)
{
    size_t start = 0;
    bool first = true;
    for (;;) {
        size_t nl = tb.find('\n', start);
        std::string line = tb.substr(start, nl == std::string::npos
                                                ? std::string::npos
                                                : nl - start);
        if (first) {
            EXPECT_EQ(line, "stack traceback:");
        } else {
            ASSERT_FALSE(line.empty());
            EXPECT_EQ(line[0], '\t') << line;
        }
        EXPECT_EQ(line.find('\r'), std::string::npos);
        first = false;
        if (nl == std::string::npos) {
            break;
        }
        start = nl + 1;
    }
}

// Runs `code` in a coroutine that stops (yields) where the traceback is
// taken, and returns escapedTraceback of it.
std::string tracebackOf(const char *code, const char *chunkname)
{
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_State *co = lua_newthread(L);
    EXPECT_EQ(luaL_loadbuffer(co, code, std::strlen(code), chunkname), 0);
    EXPECT_EQ(lua_resume(co, 0), LUA_YIELD);
    std::string tb = luaguard::escapedTraceback(co, 0);
    lua_close(L);
    return tb;
}

}  // namespace

TEST(LogEscape, TracebackEscapesChunkNames)
{
    std::string tb = tracebackOf(
        "local function f() coroutine.yield() end f()",
        "=x\n2026/01/01 00:00:00 [emerg] 1#1: forged\r\n");
    expectNoLineAtColumnZero(tb);
    EXPECT_NE(tb.find("x\\n2026/01/01 00:00:00 [emerg] 1#1: forged\\r\\n:1:"
                      " in function 'f'"), std::string::npos) << tb;
    EXPECT_NE(tb.find(" in main chunk"), std::string::npos) << tb;
}

TEST(LogEscape, TracebackEscapesFunctionNames)
{
    std::string tb = tracebackOf(
        "local t = {} t['a\\n2026/01/01 [emerg] forged'] = function() "
        "coroutine.yield() end t['a\\n2026/01/01 [emerg] forged']()",
        "=chunk");
    expectNoLineAtColumnZero(tb);
    EXPECT_EQ(tb.find("\n2026"), std::string::npos) << tb;
}

TEST(LogEscape, DeepTracebackIsElided)
{
    std::string tb = tracebackOf(
        "local function f(n) if n == 0 then coroutine.yield() end "
        "return (f(n - 1)) end f(40)", "=deep");
    expectNoLineAtColumnZero(tb);
    EXPECT_NE(tb.find("\n\t...\n"), std::string::npos) << tb;
    size_t lines = 0;
    for (char c : tb) {
        lines += c == '\n';
    }
    EXPECT_EQ(lines, 12u + 1u + 10u);
}

TEST(LogEscape, SafeTracebackIndentsEveryLine)
{
    std::string raw = "stack traceback:\n\t[C]: in function 'error'\n"
                      "2026/01/01 00:00:00 [emerg] 1#1: forged\r\n\tx";
    std::string tb = luaguard::safeTraceback(raw);
    expectNoLineAtColumnZero(tb);
    EXPECT_NE(tb.find("\n\t2026/01/01 00:00:00 [emerg] 1#1: forged\\r\n\tx"),
              std::string::npos) << tb;
    // A first line that is not the fixed header is indented too.
    EXPECT_EQ(luaguard::safeTraceback("2026 [emerg]\n\tx"),
              "\t2026 [emerg]\n\tx");
}
