// The unwinding contract ngx/entry.hpp relies on, checked against the
// LuaJIT the module links: Lua errors unwind C++ frames (destructors run),
// a catch (...) outside any protected call catches a Lua error with its
// message on the stack, and a C++ exception thrown in a lua_CFunction is
// caught by lua_pcall.

#include <gtest/gtest.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "runtime/lua.hpp"

namespace {

int g_destroyed = 0;

struct Guard {
    std::string held = std::string(64, 'x');  // a heap-owning member
    ~Guard() { g_destroyed++; }
};

int raisesThroughRaii(lua_State *L)
{
    Guard g;
    std::string local = "kept in a C++ frame";
    luaL_error(L, "raised with %d guard alive", 1);
    return 0;
}

int throwsCpp(lua_State *)
{
    Guard g;
    throw std::runtime_error("from C++");
}

int g_panics = 0;

int countPanic(lua_State *)
{
    g_panics++;
    return 0;
}

class Unwind : public ::testing::Test {
 protected:
    void SetUp() override
    {
        L = luaL_newstate();
        luaL_openlibs(L);
        lua_atpanic(L, countPanic);
        g_destroyed = 0;
        g_panics = 0;
    }
    void TearDown() override { lua_close(L); }
    lua_State *L = nullptr;
};

TEST_F(Unwind, LuaErrorRunsDestructorsOfCppFrames)
{
    lua_pushcfunction(L, raisesThroughRaii);
    ASSERT_EQ(lua_pcall(L, 0, 0, 0), LUA_ERRRUN);
    EXPECT_EQ(g_destroyed, 1);
    EXPECT_STREQ(lua_tostring(L, -1), "raised with 1 guard alive");
}

TEST_F(Unwind, LuaErrorThroughLuaFramesRunsDestructors)
{
    // C++ frame -> Lua function -> C++ frame that raises.
    lua_register(L, "raises", raisesThroughRaii);
    ASSERT_EQ(luaL_loadstring(L, "local x = 1; raises(); return x"), 0);
    ASSERT_EQ(lua_pcall(L, 0, 0, 0), LUA_ERRRUN);
    EXPECT_EQ(g_destroyed, 1);
}

TEST_F(Unwind, CatchAllCatchesLuaErrorOutsideProtectedCalls)
{
    int top = lua_gettop(L);
    bool caught = false;
    {
        Guard outer;
        try {
            Guard inner;
            // Unprotected: without external unwinding this would reach
            // the panic function and exit the process.
            lua_pushcfunction(L, raisesThroughRaii);
            lua_call(L, 0, 0);
        } catch (...) {
            caught = true;
        }
        EXPECT_EQ(g_destroyed, 2);  // raisesThroughRaii's and inner
    }
    EXPECT_TRUE(caught);
    EXPECT_EQ(g_panics, 0);
    ASSERT_GT(lua_gettop(L), top);
    EXPECT_STREQ(lua_tostring(L, -1), "raised with 1 guard alive");
    lua_settop(L, top);
    // The state is usable afterwards.
    ASSERT_EQ(luaL_dostring(L, "return 40 + 2"), 0);
    EXPECT_EQ(lua_tointeger(L, -1), 42);
}

bool g_refuse = false;

void *refusingAlloc(void *, void *ptr, size_t, size_t nsize)
{
    if (nsize == 0) {
        std::free(ptr);
        return nullptr;
    }
    if (g_refuse && nsize > 4096) {
        return nullptr;
    }
    return std::realloc(ptr, nsize);
}

TEST(UnwindAlloc, RefusedAllocationOfAnApiCallIsCatchable)
{
    // What entry::protect meets when the glue pushes a value and the
    // allocator refuses: an error raised by a lua_* call itself.
    lua_State *S = lua_newstate(refusingAlloc, nullptr);
    ASSERT_NE(S, nullptr);
    lua_atpanic(S, countPanic);
    g_panics = 0;
    int top = lua_gettop(S);
    std::string big(1 << 20, 'b');
    bool caught = false;
    g_refuse = true;
    try {
        lua_pushlstring(S, big.data(), big.size());
    } catch (...) {
        caught = true;
    }
    g_refuse = false;
    EXPECT_TRUE(caught);
    EXPECT_EQ(g_panics, 0);
    ASSERT_GT(lua_gettop(S), top);
    EXPECT_STREQ(lua_tostring(S, -1), "not enough memory");
    lua_settop(S, top);
    lua_pushlstring(S, big.data(), big.size());  // works again
    EXPECT_EQ(lua_objlen(S, -1), big.size());
    lua_close(S);
}

TEST_F(Unwind, CppExceptionIsCaughtByPcall)
{
    lua_pushcfunction(L, throwsCpp);
    EXPECT_NE(lua_pcall(L, 0, 0, 0), 0);
    EXPECT_EQ(g_destroyed, 1);
}

}  // namespace
