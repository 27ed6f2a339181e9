#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "runtime/regex_cache.hpp"

using namespace luaguard::regex;

namespace {

struct Evicted {
    std::vector<int> values;
    void operator()(int v) { values.push_back(v); }
};

std::vector<std::string> order(const LruCache<int> &c)
{
    std::vector<std::string> keys;
    c.forEach([&](const std::string &p, uint32_t f, int) {
        keys.push_back(p + "/" + std::to_string(f));
    });
    return keys;
}

}  // namespace

TEST(RegexCache, HitAndMiss)
{
    LruCache<int> c(4);
    Evicted ev;
    EXPECT_EQ(c.get("a+", 0), nullptr);
    ASSERT_TRUE(c.put("a+", 0, 1, std::ref(ev)));
    ASSERT_NE(c.get("a+", 0), nullptr);
    EXPECT_EQ(*c.get("a+", 0), 1);
    // Same pattern, other flags: a different entry.
    EXPECT_EQ(c.get("a+", 2), nullptr);
    // Lookup by a view of another buffer with the same bytes.
    std::string copy = "a+";
    EXPECT_NE(c.get(copy, 0), nullptr);
}

TEST(RegexCache, EvictsLeastRecentlyUsed)
{
    LruCache<int> c(3);
    Evicted ev;
    c.put("a", 0, 1, std::ref(ev));
    c.put("b", 0, 2, std::ref(ev));
    c.put("c", 0, 3, std::ref(ev));
    ASSERT_NE(c.get("a", 0), nullptr);   // a becomes most recent
    c.put("d", 0, 4, std::ref(ev));      // evicts b
    EXPECT_EQ(ev.values, std::vector<int>{2});
    EXPECT_EQ(c.get("b", 0), nullptr);
    EXPECT_EQ(c.size(), 3u);
    EXPECT_EQ(order(c), (std::vector<std::string>{"d/0", "a/0", "c/0"}));
}

TEST(RegexCache, ZeroCapacityStoresNothing)
{
    LruCache<int> c(0);
    Evicted ev;
    EXPECT_FALSE(c.put("a", 0, 1, std::ref(ev)));
    EXPECT_EQ(c.size(), 0u);
    EXPECT_TRUE(ev.values.empty());
}

TEST(RegexCache, ShrinkingEvicts)
{
    LruCache<int> c(4);
    Evicted ev;
    for (int i = 0; i < 4; i++) {
        c.put(std::string(1, static_cast<char>('a' + i)), 0, i,
              std::ref(ev));
    }
    c.setCapacity(1, std::ref(ev));
    EXPECT_EQ(ev.values, (std::vector<int>{0, 1, 2}));
    EXPECT_EQ(order(c), std::vector<std::string>{"d/0"});
    c.clear(std::ref(ev));
    EXPECT_EQ(c.size(), 0u);
    EXPECT_EQ(ev.values.back(), 3);
}

TEST(RegexCache, ManyEntriesStayBounded)
{
    LruCache<int> c(16);
    Evicted ev;
    for (int i = 0; i < 1000; i++) {
        std::string p = "p" + std::to_string(i);
        if (c.get(p, 0) == nullptr) {
            c.put(p, 0, i, std::ref(ev));
        }
    }
    EXPECT_EQ(c.size(), 16u);
    EXPECT_EQ(ev.values.size(), 984u);
    EXPECT_NE(c.get("p999", 0), nullptr);
    EXPECT_EQ(c.get("p0", 0), nullptr);
}

TEST(RegexCache, PatternsWithNulBytes)
{
    LruCache<int> c(4);
    Evicted ev;
    std::string a("a\0b", 3), b("a\0c", 3);
    c.put(a, 0, 1, std::ref(ev));
    EXPECT_EQ(c.get(b, 0), nullptr);
    ASSERT_NE(c.get(a, 0), nullptr);
}

TEST(RegexCache, HandlesTouchWithoutLookup)
{
    LruCache<int> c(2);
    Evicted ev;
    LruCache<int>::Handle a, b;
    ASSERT_TRUE(c.put("a", 0, 1, std::ref(ev), &a));
    ASSERT_TRUE(c.put("b", 0, 2, std::ref(ev), &b));
    EXPECT_EQ(a->value, 1);
    EXPECT_EQ(c.find("b", 0), b);
    EXPECT_EQ(c.find("zz", 0), c.end());
    c.touch(a);                           // a is now the most recent
    c.put("c", 0, 3, std::ref(ev));       // so b goes
    EXPECT_EQ(ev.values, std::vector<int>{2});
    EXPECT_EQ(order(c), (std::vector<std::string>{"c/0", "a/0"}));
    // find() does not change the order.
    c.find("a", 0);
    EXPECT_EQ(order(c), (std::vector<std::string>{"c/0", "a/0"}));
}
