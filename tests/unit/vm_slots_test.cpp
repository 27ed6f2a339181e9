#include "runtime/vm.hpp"

#include <gtest/gtest.h>

#include <set>
#include <vector>

using namespace luaguard;

// A slot given back to Vm::release is reused by Vm::anchor and never
// handed out by luaL_ref meanwhile: the registry's other users (threads,
// code caches) and ngx.ctx tables cannot end up sharing one.
TEST(VmSlots, ReleasedSlotsAreReusedAndNeverLent)
{
    Vm vm;
    std::string err;
    ASSERT_TRUE(vm.open(&err)) << err;
    lua_State *L = vm.L();
    int top = lua_gettop(L);

    std::vector<int> mine;
    for (int i = 0; i < 50; i++) {
        lua_newtable(L);
        mine.push_back(vm.anchor(L));
    }
    std::set<int> released;
    for (size_t i = 0; i < mine.size(); i += 2) {
        int r = mine[i];
        vm.release(&mine[i]);
        EXPECT_EQ(mine[i], LUA_NOREF);
        released.insert(r);
    }
    // Other registry users get fresh slots, not the released ones.
    for (int i = 0; i < 200; i++) {
        lua_newtable(L);
        int other = luaL_ref(L, LUA_REGISTRYINDEX);
        EXPECT_EQ(released.count(other), 0u) << other;
    }
    // anchor() takes the released ones back, holding what it was given.
    for (size_t n = 0; n < released.size(); n++) {
        lua_pushinteger(L, static_cast<lua_Integer>(n) + 1000);
        int r = vm.anchor(L);
        EXPECT_EQ(released.count(r), 1u) << r;
        lua_rawgeti(L, LUA_REGISTRYINDEX, r);
        EXPECT_EQ(lua_tointeger(L, -1), static_cast<lua_Integer>(n) + 1000);
        lua_pop(L, 1);
    }
    // nil is not anchored in a slot (it would leave a hole).
    lua_pushnil(L);
    EXPECT_EQ(vm.anchor(L), LUA_REFNIL);
    int none = LUA_NOREF;
    vm.release(&none);
    EXPECT_EQ(lua_gettop(L), top);
}
