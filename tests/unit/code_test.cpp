#include "runtime/code.hpp"
#include "runtime/vm.hpp"

#include <gtest/gtest.h>

#include <string>

using namespace luaguard;

namespace {

std::string run(Vm &vm, const std::string &code, std::string *err)
{
    lua_State *L = vm.L();
    if (!compileFactory(L, code.data(), code.size(), "=test", err)) {
        return "<syntax>";
    }
    instantiate(L, -1);
    lua_remove(L, -2);
    if (lua_pcall(L, 0, 1, 0) != 0) {
        *err = lua_tostring(L, -1);
        lua_pop(L, 1);
        return "<runtime>";
    }
    std::string out = lua_tostring(L, -1) ? lua_tostring(L, -1) : "nil";
    lua_pop(L, 1);
    return out;
}

}  // namespace

TEST(Code, FactoryRunsTheChunk)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    EXPECT_EQ(run(vm, "return 1 + 2", &err), "3");
}

TEST(Code, LineNumbersMatchTheSource)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    EXPECT_EQ(run(vm, "local a = 1\nlocal b = 2\nerror('boom')", &err),
              "<runtime>");
    EXPECT_EQ(err, "test:3: boom");
    EXPECT_EQ(run(vm, "local a = 1\nlocal = 2", &err), "<syntax>");
    EXPECT_NE(err.find("test:2:"), std::string::npos) << err;
}

TEST(Code, TrailingCommentWithoutNewline)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    EXPECT_EQ(run(vm, "return 'ok' -- done", &err), "ok");
}

TEST(Code, EachInstanceIsAFreshClosure)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    lua_State *L = vm.L();
    std::string code = "return x";
    ASSERT_TRUE(compileFactory(L, code.data(), code.size(), "=t", &err));
    instantiate(L, -1);
    instantiate(L, -2);
    EXPECT_NE(lua_topointer(L, -1), lua_topointer(L, -2));
}

TEST(Code, VarargsReachTheChunk)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    lua_State *L = vm.L();
    std::string code = "return select('#', ...)";
    ASSERT_TRUE(compileFactory(L, code.data(), code.size(), "=t", &err));
    instantiate(L, -1);
    lua_pushnil(L);
    lua_pushnil(L);
    ASSERT_EQ(lua_pcall(L, 2, 1, 0), 0);
    EXPECT_EQ(lua_tointeger(L, -1), 2);
}

TEST(Code, MemoryCeilingRefusesAndRecovers)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    vm.memory().ceiling = vm.memory().in_use + 4 * 1024 * 1024;
    EXPECT_EQ(run(vm, "local t = {} for i = 1, 1e7 do t[i] = i end", &err),
              "<runtime>");
    EXPECT_NE(err.find("not enough memory"), std::string::npos) << err;
    lua_gc(vm.L(), LUA_GCCOLLECT, 0);
    EXPECT_EQ(run(vm, "return 'alive'", &err), "alive");
}
