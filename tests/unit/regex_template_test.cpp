#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/regex_template.hpp"

using namespace luaguard::regex;

namespace {

// Subject "hello world" with group 0 = "hello", 1 = "he", 2 = unset,
// 3 = "world".
const char kSubj[] = "hello world";
const size_t kOv[] = {0, 5, 0, 2, kUnset, kUnset, 6, 11};

std::string run(const char *tpl, uint32_t npairs = 4)
{
    ReplTemplate t;
    EXPECT_TRUE(t.compile(tpl)) << tpl;
    std::string out;
    t.expand(kSubj, kOv, npairs, &out);
    return out;
}

bool valid(const char *tpl)
{
    ReplTemplate t;
    return t.compile(tpl);
}

}  // namespace

TEST(RegexTemplate, Literal)
{
    ReplTemplate t;
    ASSERT_TRUE(t.compile("plain text"));
    EXPECT_TRUE(t.literal());
    EXPECT_EQ(t.text(), "plain text");
    EXPECT_EQ(run(""), "");
}

TEST(RegexTemplate, GroupForms)
{
    EXPECT_EQ(run("[$0]"), "[hello]");
    EXPECT_EQ(run("$1-${1}-${3}"), "he-he-world");
    EXPECT_EQ(run("${0}x$3y"), "hellox" "worldy");
    EXPECT_EQ(run("$1$3"), "heworld");
}

TEST(RegexTemplate, DollarEscape)
{
    EXPECT_EQ(run("$$"), "$");
    EXPECT_EQ(run("a$$1b"), "a$1b");
    ReplTemplate t;
    ASSERT_TRUE(t.compile("cost: $$5"));
    EXPECT_TRUE(t.literal());
}

TEST(RegexTemplate, UnsetOrMissingGroupsAreEmpty)
{
    EXPECT_EQ(run("<$2>"), "<>");
    EXPECT_EQ(run("<$9>"), "<>");
    EXPECT_EQ(run("<$10>"), "<>");       // digits are greedy: group 10
    EXPECT_EQ(run("<${123456789012}>"), "<>");
    EXPECT_EQ(run("<$3>", 2), "<>");     // beyond the pairs given
}

TEST(RegexTemplate, LeadingZeros)
{
    EXPECT_EQ(run("${01}"), "he");
    EXPECT_EQ(run("$01"), "he");
}

TEST(RegexTemplate, InvalidTemplates)
{
    // Each of these makes lua-nginx-module return "failed to compile the
    // replacement template" (checked against the reference).
    for (const char *bad : {"$", "x$", "${", "${1", "${}", "${ 1}", "${1x}",
                            "$a", "$ ", "${n}", "$-"}) {
        EXPECT_FALSE(valid(bad)) << bad;
    }
}

TEST(RegexTemplate, Recompile)
{
    ReplTemplate t;
    ASSERT_TRUE(t.compile("$1"));
    EXPECT_FALSE(t.literal());
    ASSERT_TRUE(t.compile("abc"));
    EXPECT_TRUE(t.literal());
    std::string out;
    t.expand(kSubj, kOv, 4, &out);
    EXPECT_EQ(out, "abc");
}

TEST(RegexTemplate, EmbeddedNul)
{
    ReplTemplate t;
    ASSERT_TRUE(t.compile(std::string_view("a\0$1", 4)));
    std::string out;
    t.expand(kSubj, kOv, 4, &out);
    EXPECT_EQ(out, std::string("a\0he", 4));
}
