#include "security/script_path.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

using namespace luaguard::script;

namespace {

// A scratch tree: base/top/mid/lua/x.lua, all 0755, removed afterwards.
class ScriptTree : public ::testing::Test {
 protected:
    void SetUp() override
    {
        char tmpl[] = "/tmp/lg-script-XXXXXX";
        ASSERT_NE(mkdtemp(tmpl), nullptr);
        base_ = tmpl;
        chmod(base_.c_str(), 0755);
        for (const char *d : {"/top", "/top/mid", "/top/mid/lua"}) {
            ASSERT_EQ(mkdir((base_ + d).c_str(), 0755), 0);
        }
        script_ = base_ + "/top/mid/lua/x.lua";
        std::ofstream(script_) << "return 1\n";
        chmod(script_.c_str(), 0644);
        policy_.root = base_ + "/top/mid/lua";
    }

    void TearDown() override
    {
        std::string cmd = "rm -rf '" + base_ + "'";
        ASSERT_EQ(std::system(cmd.c_str()), 0);
    }

    Verdict loadFixed(std::string *why)
    {
        std::string code;
        return load(script_, "", false, policy_, &code, why);
    }

    Verdict loadConfined(std::string *why)
    {
        std::string code;
        return load(script_, "x.lua", true, policy_, &code, why);
    }

    std::string base_;
    std::string script_;
    Policy policy_;
};

TEST_F(ScriptTree, SafeTreeLoads)
{
    std::string why;
    EXPECT_EQ(loadFixed(&why), Verdict::Ok) << why;
    EXPECT_EQ(loadConfined(&why), Verdict::Ok) << why;
}

TEST_F(ScriptTree, WorldWritableGrandparentRefusesBothKinds)
{
    ASSERT_EQ(chmod((base_ + "/top").c_str(), 0777), 0);
    std::string why;
    EXPECT_EQ(loadFixed(&why), Verdict::Unsafe);
    EXPECT_EQ(why, "directory \"" + base_ + "/top\" is world-writable");
    why.clear();
    // Above the lua_file_root as well.
    EXPECT_EQ(loadConfined(&why), Verdict::Unsafe);
    EXPECT_EQ(why, "directory \"" + base_ + "/top\" is world-writable");
}

TEST_F(ScriptTree, StickyBitExemptsADirectory)
{
    ASSERT_EQ(chmod((base_ + "/top").c_str(), 01777), 0);
    std::string why;
    EXPECT_EQ(loadFixed(&why), Verdict::Ok) << why;
    EXPECT_EQ(loadConfined(&why), Verdict::Ok) << why;
}

TEST_F(ScriptTree, GroupWritableAncestorCountsUnderGroupPolicy)
{
    ASSERT_EQ(chmod((base_ + "/top/mid").c_str(), 0775), 0);
    std::string why;
    EXPECT_EQ(loadFixed(&why), Verdict::Ok) << why;
    policy_.writable = Writable::Group;
    EXPECT_EQ(loadFixed(&why), Verdict::Unsafe);
    EXPECT_NE(why.find("group-writable"), std::string::npos) << why;
    policy_.writable = Writable::Off;
    EXPECT_EQ(loadFixed(&why), Verdict::Ok) << why;
}

TEST_F(ScriptTree, SymlinkTargetDirectoriesAreChecked)
{
    // A symlink in a safe directory to a script under a world-writable
    // one: the directories of the real file count.
    ASSERT_EQ(mkdir((base_ + "/open").c_str(), 0777), 0);
    ASSERT_EQ(chmod((base_ + "/open").c_str(), 0777), 0);
    std::string real = base_ + "/open/y.lua";
    std::ofstream(real) << "return 2\n";
    chmod(real.c_str(), 0644);
    std::string link = base_ + "/top/mid/lua/y.lua";
    ASSERT_EQ(symlink(real.c_str(), link.c_str()), 0);
    std::string code, why;
    EXPECT_EQ(load(link, "", false, policy_, &code, &why), Verdict::Unsafe);
    EXPECT_EQ(why, "directory \"" + base_ + "/open\" is world-writable");
}

TEST_F(ScriptTree, OwnersListCoversDirectories)
{
    // Directories must belong to root or a listed owner.
    if (geteuid() != 0) {
        GTEST_SKIP() << "chown needs root";
    }
    ASSERT_EQ(chown((base_ + "/top").c_str(), 65534, 0), 0);
    std::string why;
    policy_.owners = {0};
    EXPECT_EQ(loadFixed(&why), Verdict::Unsafe);
    EXPECT_NE(why.find("belongs to uid 65534"), std::string::npos) << why;
    policy_.owners = {0, 65534};
    EXPECT_EQ(loadFixed(&why), Verdict::Ok) << why;
}

TEST(ScriptConfine, RefusesNulAndDotDot)
{
    Policy policy;
    policy.root = "/srv/lua";
    std::string rel, why;
    EXPECT_EQ(confine(std::string("/srv/lua/a.lua\0.txt", 19), policy, &rel,
                      &why), Verdict::Refused);
    EXPECT_EQ(why, "NUL byte in the path");
    EXPECT_EQ(confine("/srv/lua/a/../../x.lua", policy, &rel, &why),
              Verdict::Refused);
    EXPECT_EQ(confine("/srv/luax/a.lua", policy, &rel, &why),
              Verdict::Refused);
    EXPECT_EQ(confine("/srv/lua/a/b.lua", policy, &rel, &why), Verdict::Ok);
    EXPECT_EQ(rel, "a/b.lua");
}

}  // namespace
