#include "security/log_escape.hpp"

#include <gtest/gtest.h>

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
