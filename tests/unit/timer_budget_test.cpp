#include "security/timer_budget.hpp"

#include <gtest/gtest.h>

#include <string>

using luaguard::budget::TimeBucket;
using luaguard::budget::kParkedClosureHeader;
using luaguard::budget::kParkedEntry;
using luaguard::budget::kParkedStringHeader;
using luaguard::budget::kParkedTableHeader;
using luaguard::budget::kParkedUpvalue;
using luaguard::budget::parkedSize;

namespace {

constexpr uint64_t kMs = 1'000'000;

TEST(TimeBucket, StartsFullAndEmptiesWhenSpent)
{
    TimeBucket b;
    b.start(250 * kMs, 1000 * kMs, 0);
    EXPECT_FALSE(b.empty());
    b.spend(200 * kMs);
    EXPECT_FALSE(b.empty());
    b.spend(50 * kMs);
    EXPECT_TRUE(b.empty());   // exactly zero left is empty
}

TEST(TimeBucket, RefillsAtCapPerIntervalUpToCap)
{
    TimeBucket b;
    b.start(250 * kMs, 1000 * kMs, 0);
    b.spend(250 * kMs);
    b.refill(400 * kMs);            // earns 100 ms
    EXPECT_EQ(b.balance(), static_cast<int64_t>(100 * kMs));
    b.refill(3600'000 * kMs);       // an hour idle: capped, no overflow
    EXPECT_EQ(b.balance(), static_cast<int64_t>(250 * kMs));
}

TEST(TimeBucket, DebtIsPaidBackAtTheRefillRate)
{
    TimeBucket b;
    b.start(100 * kMs, 1000 * kMs, 0);
    b.spend(1100 * kMs);            // one long callback: 1 s of debt
    EXPECT_TRUE(b.empty());
    // 1 s of debt at 100 ms per second: ten seconds.
    uint64_t wait = b.untilRefilled();
    EXPECT_GE(wait, 10'000 * kMs);
    EXPECT_LT(wait, 10'001 * kMs);
    b.refill(wait - 1000);
    EXPECT_TRUE(b.empty());
    b.refill(wait);
    EXPECT_FALSE(b.empty());
    EXPECT_EQ(b.untilRefilled(), 0u);
}

TEST(TimeBucket, OffIsNeverEmpty)
{
    TimeBucket b;
    b.start(0, 1000 * kMs, 0);
    b.spend(10'000 * kMs);
    EXPECT_FALSE(b.empty());
}

TEST(TimeBucket, TimeGoingBackEarnsNothing)
{
    TimeBucket b;
    b.start(100 * kMs, 1000 * kMs, 500 * kMs);
    b.spend(100 * kMs);
    b.refill(100 * kMs);
    EXPECT_TRUE(b.empty());
}

class Parked : public ::testing::Test {
 protected:
    void SetUp() override { L = luaL_newstate(); luaL_openlibs(L); }
    void TearDown() override { lua_close(L); }

    // Runs `code`, which returns the values to measure.
    size_t measure(const char *code, size_t limit = SIZE_MAX)
    {
        lua_settop(L, 0);
        EXPECT_EQ(luaL_dostring(L, code), 0) << lua_tostring(L, -1);
        int n = lua_gettop(L);
        size_t size = parkedSize(L, 1, n, limit, nullptr);
        EXPECT_EQ(lua_gettop(L), n);   // the stack is left as it was
        return size;
    }

    lua_State *L = nullptr;
};

TEST_F(Parked, StringsAtTheirLengthPlusAHeader)
{
    EXPECT_EQ(measure("return string.rep('x', 1000), 'ab', 42, true"),
              1000 + 2 + 2 * kParkedStringHeader);
}

TEST_F(Parked, TablesWithTheirEntriesOnce)
{
    // Two references to one table with one 100-byte string: counted once.
    size_t one = kParkedTableHeader + kParkedEntry + 100
                 + kParkedStringHeader;
    EXPECT_EQ(measure("local t = {string.rep('y', 100)} return t, t"), one);
    // Nested: the outer table, its entry and key string, then the inner.
    EXPECT_EQ(measure("return {k = {string.rep('y', 100)}}"),
              kParkedTableHeader + kParkedEntry + 1 + kParkedStringHeader
              + one);
    // A cycle ends.
    EXPECT_EQ(measure("local t = {} t.self = t return t"),
              kParkedTableHeader + kParkedEntry + 4 + kParkedStringHeader);
}

TEST_F(Parked, FunctionsWithWhatTheirUpvaluesKeepAlive)
{
    // The closure, its two upvalue slots, the string, and the table with
    // its string.
    size_t big = kParkedTableHeader + kParkedEntry + 100'000
                 + kParkedStringHeader;
    EXPECT_EQ(measure("local s = string.rep('z', 5000) "
                      "local big = {string.rep('w', 100000)} "
                      "return function() return #s + #big end"),
              kParkedClosureHeader + 2 * kParkedUpvalue + 5000
                  + kParkedStringHeader + big);
    // A closure captured by the callback: walked too; a recursive one
    // (its own upvalue) ends.
    EXPECT_EQ(measure("local s = string.rep('z', 5000) "
                      "local function inner() return s end "
                      "local function f() return inner() and f end "
                      "return f"),
              2 * kParkedClosureHeader + 3 * kParkedUpvalue + 5000
                  + kParkedStringHeader);
}

TEST_F(Parked, AClosureWithoutUpvaluesIsItsHeader)
{
    EXPECT_EQ(measure("return function(p, n) local x = n + 1 end, 1"),
              kParkedClosureHeader);
    // With an upvalue, what it keeps alive counts again.
    EXPECT_EQ(measure("local s = string.rep('z', 100) "
                      "return function() return s end"),
              kParkedClosureHeader + kParkedUpvalue + 100
                  + kParkedStringHeader);
}

TEST_F(Parked, ModulesAndGlobalsAreNotCounted)
{
    // What every timer shares: package.loaded's values and _G.
    EXPECT_EQ(measure("local ngx_, str, g = string, table, _G "
                      "return function() return ngx_, str, g end"),
              kParkedClosureHeader + 3 * kParkedUpvalue);
}

TEST_F(Parked, ManyTablesEachOnce)
{
    // Past the few tracked in place: 100 tables, each reached twice.
    size_t each = kParkedTableHeader + kParkedEntry;   // {i}
    size_t outer = kParkedTableHeader + 200 * kParkedEntry;
    EXPECT_EQ(measure("local t = {} for i = 1, 100 do "
                      "local x = {i} t[i] = x t[-i] = x end return t"),
              outer + 100 * each);
}

TEST_F(Parked, AModuleLoadedLaterIsShared)
{
    const char *code = "local m = package.loaded.later "
                       "return function() return m end";
    measure("return function() return _G end");   // the set is made
    ASSERT_EQ(luaL_dostring(L, "package.loaded.later = "
                               "{string.rep('m', 1000)}"), 0);
    EXPECT_EQ(measure(code), kParkedClosureHeader + kParkedUpvalue);
    // table.nkeys, which counts package.loaded, stays hidden as in a
    // fresh VM.
    ASSERT_EQ(luaL_dostring(L, "return table.nkeys"), 0);
    EXPECT_TRUE(lua_isnil(L, -1));
}

TEST_F(Parked, StopsPastTheLimit)
{
    // A million entries: the walk stops soon after the limit.
    size_t size = measure("local t = {} for i = 1, 1000000 do t[i] = i end "
                          "return t", 10'000);
    EXPECT_GT(size, 10'000u);
    EXPECT_LT(size, 10'000u + 2 * kParkedEntry);
}

}  // namespace
