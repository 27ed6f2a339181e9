#include "security/sandbox.hpp"

#include <gtest/gtest.h>

#include <string>

using namespace luaguard::sandbox;

namespace {

Policy parsed(std::vector<std::string> args)
{
    Policy p;
    std::string err;
    EXPECT_TRUE(parse(args, &p, &err)) << err;
    return p;
}

const Policy *g_test_policy = nullptr;
int g_env_ref = LUA_NOREF;

const Policy *testPolicy()
{
    return g_test_policy;
}

bool testEnv(lua_State *L)
{
    if (g_env_ref == LUA_NOREF) {
        return false;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, g_env_ref);
    return true;
}

// A VM with the sandbox installed and one "request" environment.
class SandboxVm : public ::testing::Test {
 protected:
    void SetUp() override
    {
        L = luaL_newstate();
        luaL_openlibs(L);
        lua_newtable(L);
        lua_setglobal(L, "ngx");
        setHooks(testPolicy, testEnv);
        std::string err;
        ASSERT_TRUE(install(L, &err)) << err;
    }

    void TearDown() override
    {
        g_test_policy = nullptr;
        g_env_ref = LUA_NOREF;
        lua_close(L);
    }

    void enter(const Policy *p)
    {
        g_test_policy = p;
        pushNewEnv(L, p);
        g_env_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    }

    // Runs `code` in the request environment; returns its string result
    // or "ERR <message>".
    std::string run(const char *code)
    {
        if (luaL_loadstring(L, code) != 0) {
            std::string e = lua_tostring(L, -1);
            lua_pop(L, 1);
            return "COMPILE " + e;
        }
        lua_rawgeti(L, LUA_REGISTRYINDEX, g_env_ref);
        lua_setfenv(L, -2);
        if (lua_pcall(L, 0, 1, 0) != 0) {
            std::string e = lua_tostring(L, -1) ? lua_tostring(L, -1) : "?";
            lua_pop(L, 1);
            return "ERR " + e;
        }
        std::string out = lua_tostring(L, -1) ? lua_tostring(L, -1) : "nil";
        lua_pop(L, 1);
        return out;
    }

    lua_State *L = nullptr;
};

}  // namespace

TEST(SandboxParse, Profiles)
{
    Policy d = parsed({"default"});
    EXPECT_TRUE(d.isolate);
    EXPECT_TRUE(d.allows(Capability::Io));
    EXPECT_TRUE(d.allows(Capability::Ffi));
    EXPECT_FALSE(d.allows(Capability::Bytecode));
    EXPECT_FALSE(d.allows(Capability::Loadlib));

    Policy s = parsed({"strict"});
    for (auto c : {Capability::Io, Capability::Os, Capability::Ffi,
                   Capability::Debug, Capability::Bytecode,
                   Capability::Loadlib, Capability::Cmodule,
                   Capability::Shared}) {
        EXPECT_FALSE(s.allows(c)) << capabilityName(c);
    }
    EXPECT_TRUE(s.allows(Capability::Socket));
    EXPECT_TRUE(s.allows(Capability::Exec));

    Policy o = parsed({"off"});
    EXPECT_FALSE(o.isolate);
    EXPECT_TRUE(o.allows(Capability::Bytecode));
}

TEST(SandboxParse, ChangesAndLabel)
{
    Policy p = parsed({"strict", "+io", "-exec", "+shared=a,b"});
    EXPECT_TRUE(p.allows(Capability::Io));
    EXPECT_FALSE(p.allows(Capability::Exec));
    EXPECT_TRUE(p.allows(Capability::Shared));
    EXPECT_EQ(p.shared_dicts, (std::vector<std::string>{"a", "b"}));
    EXPECT_EQ(p.label, "strict +io -exec +shared=a,b");
}

TEST(SandboxParse, Errors)
{
    Policy p;
    std::string err;
    EXPECT_FALSE(parse({"nope"}, &p, &err));
    EXPECT_FALSE(parse({"off", "+io"}, &p, &err));
    EXPECT_FALSE(parse({"strict", "io"}, &p, &err));
    EXPECT_FALSE(parse({"strict", "+wat"}, &p, &err));
    EXPECT_NE(err.find("unknown capability \"wat\""), std::string::npos);
    EXPECT_FALSE(parse({"strict", "-shared=a"}, &p, &err));
    EXPECT_FALSE(parse({"strict", "+shared=a,,b"}, &p, &err));
}

TEST_F(SandboxVm, RequireRaisesCountsAndNamesProfile)
{
    Policy strict = parsed({"strict"});
    g_test_policy = &strict;
    uint64_t before = refusals(Capability::Socket);
    uint64_t total = totalRefusals();

    lua_pushcfunction(L, [](lua_State *S) -> int {
        require(S, Capability::Socket);
        return 0;
    });
    strict.allowed &= ~(1u << static_cast<int>(Capability::Socket));
    ASSERT_NE(lua_pcall(L, 0, 0, 0), 0);
    EXPECT_STREQ(lua_tostring(L, -1), "capability 'socket' is not allowed "
                                      "in this location (lua_sandbox strict)");
    lua_pop(L, 1);
    EXPECT_EQ(refusals(Capability::Socket), before + 1);
    EXPECT_EQ(totalRefusals(), total + 1);

    // Outside a request nothing is refused.
    g_test_policy = nullptr;
    lua_pushcfunction(L, [](lua_State *S) -> int {
        require(S, Capability::Socket);
        return 0;
    });
    EXPECT_EQ(lua_pcall(L, 0, 0, 0), 0);
}

TEST_F(SandboxVm, SharedDictList)
{
    Policy p = parsed({"strict", "+shared=cache"});
    g_test_policy = &p;
    auto call = [&](const char *dict) {
        lua_pushcfunction(L, [](lua_State *S) -> int {
            requireShared(S, lua_tostring(S, 1));
            return 0;
        });
        lua_pushstring(L, dict);
        int rc = lua_pcall(L, 1, 0, 0);
        std::string msg = rc ? lua_tostring(L, -1) : "";
        lua_settop(L, 0);
        return msg;
    };
    EXPECT_EQ(call("cache"), "");
    EXPECT_EQ(call("other"), "shared dict 'other' is not allowed in this "
                             "location (lua_sandbox strict +shared=cache)");
}

TEST_F(SandboxVm, GlobalsArePrivateAndLibrariesReadOnly)
{
    Policy d = parsed({"default"});
    enter(&d);
    EXPECT_EQ(run("x = 1 return tostring(x)"), "1");
    EXPECT_EQ(run("return string.format('%d', 5)"), "5");
    // default: a patch of a library is the request's own
    EXPECT_EQ(run("string.format = nil return type(string.format)"), "nil");

    lua_getglobal(L, "x");
    EXPECT_TRUE(lua_isnil(L, -1));  // the worker's _G never saw it
    lua_pop(L, 1);
    lua_getglobal(L, "string");
    lua_getfield(L, -1, "format");
    EXPECT_TRUE(lua_isfunction(L, -1));  // nor the real string table
    lua_pop(L, 2);

    // A second request starts clean.
    enter(&d);
    EXPECT_EQ(run("return tostring(x)"), "nil");
    EXPECT_EQ(run("return type(string.format)"), "function");

    // strict refuses the write
    Policy s = parsed({"strict"});
    enter(&s);
    std::string e = run("string.format = nil");
    EXPECT_NE(e.find("attempt to modify read-only table 'string' "
                     "(field 'format')"), std::string::npos) << e;
}

TEST_F(SandboxVm, StrictViewRefusesStaticCapabilities)
{
    Policy s = parsed({"strict"});
    enter(&s);
    EXPECT_NE(run("return require('ffi')").find("capability 'ffi'"),
              std::string::npos);
    EXPECT_NE(run("return debug.getregistry()").find("capability 'debug'"),
              std::string::npos);
    EXPECT_EQ(run("return type(debug.traceback)"), "function");
    EXPECT_NE(run("return io.open('/etc/hostname')").find("capability 'io'"),
              std::string::npos);
    // no string.dump in strict: a hand-made binary chunk is refused
    EXPECT_EQ(run("return tostring(string.dump)"), "nil");
    EXPECT_NE(run("return loadstring('\\27LJ\\2')")
                  .find("capability 'bytecode'"),
              std::string::npos);
    // the allowlist: what LuaJIT has and strict does not
    EXPECT_EQ(run("return tostring(newproxy) .. tostring(gcinfo) .. "
                  "tostring(package.preload) .. tostring(os.setlocale)"),
              "nilnilnilnil");
    EXPECT_NE(run("return require('string.buffer')")
                  .find("capability 'ffi'"),
              std::string::npos);
    EXPECT_NE(run("return collectgarbage('stop')")
                  .find("collectgarbage('stop') is not allowed"),
              std::string::npos);
    EXPECT_EQ(run("return type(collectgarbage('count'))"), "number");
    EXPECT_EQ(run("return tostring({})"), "table: 0x00000001");
    EXPECT_EQ(run("return tostring(getfenv(0) == _G)"), "true");
    EXPECT_EQ(run("local n = 0 for _ in pairs(math) do n = n + 1 end "
                  "return tostring(n > 20)"),
              "true");
}

TEST_F(SandboxVm, OneViewPerPolicyIsReused)
{
    Policy d = parsed({"default"});
    pushNewEnv(L, &d);
    pushNewEnv(L, &d);
    ASSERT_TRUE(lua_getmetatable(L, -1));
    ASSERT_TRUE(lua_getmetatable(L, -3));
    EXPECT_TRUE(lua_rawequal(L, -1, -2));
    EXPECT_FALSE(lua_rawequal(L, -3, -4));  // but two env tables
    lua_settop(L, 0);
}

TEST_F(SandboxVm, SameCapabilitiesShareAView)
{
    Policy a = parsed({"strict", "+shared=a"});
    Policy b = parsed({"strict", "+shared=b"});
    Policy c = parsed({"default"});
    pushNewEnv(L, &a);
    pushNewEnv(L, &b);
    pushNewEnv(L, &c);
    lua_getmetatable(L, 1);
    lua_getmetatable(L, 2);
    lua_getmetatable(L, 3);
    EXPECT_TRUE(lua_rawequal(L, -3, -2));
    EXPECT_FALSE(lua_rawequal(L, -3, -1));
    lua_settop(L, 0);
}
