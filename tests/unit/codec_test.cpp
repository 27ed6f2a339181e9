#include "runtime/codec.hpp"

#include <gtest/gtest.h>

#include <cctype>
#include <cstring>
#include <string>
#include <vector>

using namespace luaguard::codec;

namespace {

std::string S(const char *s, size_t n) { return std::string(s, n); }

struct Parsed {
    std::string key;
    bool has_value;
    std::string value;
};

std::vector<Parsed> parse(const std::string &q, size_t max, bool *trunc)
{
    std::vector<Parsed> out;
    std::string buf(q.size(), '\0');
    ArgReader reader(q.data(), q.size(), buf.data());
    Arg a;
    *trunc = false;
    while (reader.next(&a)) {
        if (max && out.size() == max) {
            *trunc = true;
            break;
        }
        out.push_back({S(a.key, a.key_len), a.has_value,
                       S(a.value, a.value_len)});
    }
    return out;
}

}  // namespace

TEST(Codec, EscapeUriComponent)
{
    std::string in = "a b/c?d=e&f+g~h_i.j-k!*'();:@$,[]#%";
    in.push_back('\0');
    in.push_back('\xff');
    EXPECT_EQ(escapeUri(in.data(), in.size(), UriEscape::Component),
              "a%20b%2Fc%3Fd%3De%26f%2Bg~h_i.j-k!*'()%3B%3A%40%24%2C%5B%5D"
              "%23%25%00%FF");
}

TEST(Codec, EscapeUriFull)
{
    std::string in = "a b/c?d=e&f+g~h_i.j-k!*'();:@$,[]#%\t\x7f\x80";
    EXPECT_EQ(escapeUri(in.data(), in.size(), UriEscape::Full),
              "a%20b/c%3Fd=e&f+g~h_i.j-k!*'();:@$,[]%23%25%09%7F%80");
}

TEST(Codec, UnescapeUri)
{
    std::string in = "a%20b+c%zz%4%e4%";
    EXPECT_EQ(unescapeUri(in.data(), in.size()), "a b c%zz%4\xe4%");
    EXPECT_EQ(unescapeUri("%00x", 4), S("\0x", 2));
    EXPECT_EQ(unescapeUri("%", 1), "%");
    EXPECT_EQ(unescapeUri("%4", 2), "%4");
    EXPECT_EQ(unescapeUri("%4g", 3), "%4g");
    EXPECT_EQ(unescapeUri("", 0), "");
}

TEST(Codec, ParseArgsShapes)
{
    bool trunc;
    auto a = parse("a=1&b&c=&&=x&%41=%20&d=a+b", 0, &trunc);
    EXPECT_FALSE(trunc);
    ASSERT_EQ(a.size(), 5u);
    EXPECT_EQ(a[0].key, "a");
    EXPECT_EQ(a[0].value, "1");
    EXPECT_FALSE(a[1].has_value);
    EXPECT_EQ(a[1].key, "b");
    EXPECT_TRUE(a[2].has_value);
    EXPECT_EQ(a[2].value, "");
    EXPECT_EQ(a[3].key, "A");
    EXPECT_EQ(a[3].value, " ");
    EXPECT_EQ(a[4].value, "a b");
}

TEST(Codec, ParseArgsTruncation)
{
    bool trunc;
    auto a = parse("a=1&b=2&c=3", 2, &trunc);
    EXPECT_TRUE(trunc);
    EXPECT_EQ(a.size(), 2u);
    a = parse("a=1&b=2", 2, &trunc);
    EXPECT_FALSE(trunc);
    a = parse("a=1&b=2&&", 2, &trunc);
    EXPECT_FALSE(trunc);  // empty segments are not arguments
    a = parse("", 1, &trunc);
    EXPECT_FALSE(trunc);
    EXPECT_TRUE(a.empty());
}

TEST(Codec, ParseArgsNulBytes)
{
    bool trunc;
    std::string q("a%00b=c\0d", 9);
    auto a = parse(q, 0, &trunc);
    ASSERT_EQ(a.size(), 1u);
    EXPECT_EQ(a[0].key, S("a\0b", 3));
    EXPECT_EQ(a[0].value, S("c\0d", 3));
}

TEST(Codec, EscapeArgsString)
{
    std::string in("a b#\0=\r\n%41", 11);
    EXPECT_EQ(escapeArgsString(in.data(), in.size()),
              "a%20b#%00=%0D%0A%41");
}

TEST(Codec, UnsafeUriByte)
{
    EXPECT_EQ(unsafeUriByte("/a b\t\xff", 6), std::string::npos);
    EXPECT_EQ(unsafeUriByte("/a\r\n", 4), 2u);
    EXPECT_EQ(unsafeUriByte("/a\x7f", 3), 2u);
    EXPECT_EQ(unsafeUriByte("\0", 1), 0u);
}

TEST(Codec, EscapeHeaderValue)
{
    // CR, LF, the other controls and DEL encoded; TAB and 0x80+ kept.
    EXPECT_EQ(escapeHeaderValue("v\r\nZ: 1\t\x01\x7f\xc3\xa9", 12),
              "v%0D%0AZ: 1\t%01%7F\xc3\xa9");
    std::string nul("a\0b", 3);
    EXPECT_EQ(escapeHeaderValue(nul.data(), nul.size()), "a%00b");
}

TEST(Codec, EscapeHeaderNameKeepsOnlyTokens)
{
    EXPECT_EQ(escapeHeaderName("X-Ok_1!#$%&'*+.^`|~", 19),
              "X-Ok_1!#$%&'*+.^`|~");
    EXPECT_EQ(escapeHeaderName("Set-Cookie: s=1; x", 18),
              "Set-Cookie%3A%20s%3D1%3B%20x");
    EXPECT_EQ(escapeHeaderName("X\tA\x7f\r\n\xc3\xa9", 8),
              "X%09A%7F%0D%0A%C3%A9");
    // Every byte: what stays is exactly the RFC 9110 token set.
    for (int c = 0; c < 256; c++) {
        char b = static_cast<char>(c);
        std::string out = escapeHeaderName(&b, 1);
        bool token = std::isalnum(c) && c < 0x80;
        token = token || (c != 0 && std::strchr("!#$%&'*+-.^_`|~", c));
        EXPECT_EQ(out.size(), token ? 1u : 3u) << c;
    }
    for (char c : std::string("\"(),/:;<=>?@[\\]{} ")) {
        EXPECT_FALSE(isTokenChar(static_cast<unsigned char>(c))) << c;
    }
}

TEST(Codec, ShowUnsafeUri)
{
    EXPECT_EQ(showUnsafeUri("/x\r\nA: b\t\\\xff", 11),
              "/x\\x0D\\x0AA: b\\x09\\x5C\\xFF");
    EXPECT_EQ(showUnsafeUri("abcdef", 6, 3), "abc");
}

TEST(Codec, QuoteSqlStr)
{
    std::string in("a'b\"c\\d\0e\n\r\t\x1a\b", 14);
    EXPECT_EQ(quoteSqlStr(in.data(), in.size()),
              "'a\\'b\\\"c\\\\d\\0e\\n\\r\\t\\Z\\b'");
    EXPECT_EQ(quoteSqlStr("", 0), "''");
}

TEST(Codec, EscapeHtml)
{
    std::string in = "<a href=\"x\" title='y'>&amp;</a>";
    EXPECT_EQ(escapeHtml(in.data(), in.size()),
              "&lt;a href=&quot;x&quot; title=&#39;y&#39;&gt;&amp;amp;"
              "&lt;/a&gt;");
    EXPECT_EQ(escapeHtml("plain", 5), "plain");
}
