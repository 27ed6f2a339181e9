#include "runtime/package_path.hpp"

#include <gtest/gtest.h>

using luaguard::expandPackagePath;

TEST(PackagePath, DoubleSemicolonAtEndAppendsDefaults)
{
    EXPECT_EQ(expandPackagePath("/a/?.lua;;", "./?.lua;/usr/?.lua", "/p/"),
              "/a/?.lua;./?.lua;/usr/?.lua");
}

TEST(PackagePath, DoubleSemicolonAtStartPrependsDefaults)
{
    EXPECT_EQ(expandPackagePath(";;/a/?.lua", "D", "/p/"), "D;/a/?.lua");
}

TEST(PackagePath, DoubleSemicolonInMiddle)
{
    EXPECT_EQ(expandPackagePath("/a/?.lua;;/b/?.lua", "D", "/p/"),
              "/a/?.lua;D;/b/?.lua");
}

TEST(PackagePath, PrefixBothSpellings)
{
    EXPECT_EQ(expandPackagePath("$prefix/lua/?.lua;${prefix}x/?.lua", "D",
                                "/srv/"),
              "/srv//lua/?.lua;/srv/x/?.lua");
}

TEST(PackagePath, NoDefaultsWithoutDoubleSemicolon)
{
    EXPECT_EQ(expandPackagePath("/a/?.lua", "D", "/p/"), "/a/?.lua");
}
