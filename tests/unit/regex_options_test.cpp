#include <gtest/gtest.h>

#include "runtime/regex_options.hpp"

using namespace luaguard::regex;

TEST(RegexOptions, EmptyIsNoFlags)
{
    Options o;
    char bad = 0;
    ASSERT_TRUE(parseOptions("", &o, &bad));
    EXPECT_EQ(o.flags, 0u);
    EXPECT_FALSE(o.once);
}

TEST(RegexOptions, EveryDocumentedLetter)
{
    Options o;
    char bad = 0;
    ASSERT_TRUE(parseOptions("adDijJmosux", &o, &bad));
    EXPECT_EQ(o.flags, kAnchored | kDfa | kDupNames | kCaseless | kJit
                           | kJsCompat | kMultiline | kDotAll | kUtf
                           | kExtended);
    EXPECT_TRUE(o.once);
    EXPECT_FALSE(o.no_utf_check);
}

TEST(RegexOptions, BigUIsUtfWithoutCheckRequest)
{
    Options o;
    char bad = 0;
    ASSERT_TRUE(parseOptions("U", &o, &bad));
    EXPECT_EQ(o.flags, static_cast<uint32_t>(kUtf));
    EXPECT_TRUE(o.no_utf_check);
}

TEST(RegexOptions, OnceIsNotPartOfTheCacheKey)
{
    Options a, b;
    char bad = 0;
    ASSERT_TRUE(parseOptions("jo", &a, &bad));
    ASSERT_TRUE(parseOptions("j", &b, &bad));
    EXPECT_EQ(a.flags, b.flags);
}

TEST(RegexOptions, UnknownLetterReported)
{
    Options o;
    o.flags = 123;
    char bad = 0;
    EXPECT_FALSE(parseOptions("ojxyz", &o, &bad));
    EXPECT_EQ(bad, 'y');
    EXPECT_EQ(o.flags, 123u);  // untouched on failure
    EXPECT_FALSE(parseOptions("i ", &o, &bad));
    EXPECT_EQ(bad, ' ');
}
