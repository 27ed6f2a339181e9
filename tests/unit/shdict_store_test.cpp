#include "runtime/shdict_store.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

using namespace luaguard::shdict;

namespace {

// malloc with a byte budget, so "no memory" and eviction can be tested.
class TestMemory : public Memory {
 public:
    explicit TestMemory(size_t budget) : budget_(budget) {}
    ~TestMemory() override
    {
        for (auto &kv : sizes_) {
            std::free(kv.first);
        }
    }
    void *alloc(size_t size) override
    {
        EXPECT_TRUE(locked_);
        if (used_ + size > budget_) {
            return nullptr;
        }
        void *p = std::malloc(size);
        sizes_[p] = size;
        used_ += size;
        return p;
    }
    void free(void *p) override
    {
        EXPECT_TRUE(locked_);
        auto it = sizes_.find(p);
        ASSERT_NE(it, sizes_.end());
        used_ -= it->second;
        sizes_.erase(it);
        std::free(p);
    }
    size_t freeSpace() override { return budget_ - used_; }
    void lock() override
    {
        EXPECT_FALSE(locked_);
        locked_ = true;
    }
    void unlock() override { locked_ = false; }
    size_t used() const { return used_; }

 private:
    size_t budget_;
    size_t used_ = 0;
    bool locked_ = false;
    std::map<void *, size_t> sizes_;
};

Value str(const std::string &s)
{
    Value v;
    v.type = VType::String;
    v.str = s.data();
    v.len = s.size();
    return v;
}

Value num(double d)
{
    Value v;
    v.type = VType::Number;
    v.number = d;
    return v;
}

struct Fixture {
    explicit Fixture(size_t budget = 1 << 20)
        : mem(budget), store(Store::create(&mem, budget), &mem)
    {
    }
    Status set(const std::string &k, const Value &v, uint64_t exp = 0,
               bool safe = false, bool *forcible = nullptr)
    {
        bool f = false;
        Status s = store.store(StoreOp::Set, k.data(), k.size(), v, exp, 0,
                               safe, now, &f);
        if (forcible) {
            *forcible = f;
        }
        return s;
    }
    std::string getStr(const std::string &k, bool stale = false)
    {
        Value v;
        int32_t flags;
        bool st;
        Status s = store.get(k.data(), k.size(), now, stale, &v, &flags, &st,
                             &buf);
        if (s != Status::Ok) {
            return "<" + std::to_string(static_cast<int>(s)) + ">";
        }
        if (v.type == VType::Number) {
            return std::to_string(v.number);
        }
        return std::string(v.str, v.len);
    }
    TestMemory mem;
    Store store;
    Buffer buf;
    uint64_t now = 1000000;
};

}  // namespace

TEST(ShdictStore, SetGetReplaceAddDelete)
{
    Fixture f;
    EXPECT_EQ(f.set("a", str("x")), Status::Ok);
    EXPECT_EQ(f.getStr("a"), "x");
    bool forc = false;
    EXPECT_EQ(f.store.store(StoreOp::Add, "a", 1, str("y"), 0, 0, false,
                            f.now, &forc), Status::Exists);
    EXPECT_EQ(f.store.store(StoreOp::Replace, "b", 1, str("y"), 0, 0, false,
                            f.now, &forc), Status::NotFound);
    EXPECT_EQ(f.store.store(StoreOp::Replace, "a", 1, str("longer"), 0, 7,
                            false, f.now, &forc), Status::Ok);
    EXPECT_EQ(f.getStr("a"), "longer");
    EXPECT_EQ(f.store.remove("a", 1), Status::Ok);
    EXPECT_EQ(f.getStr("a"), "<1>");
}

TEST(ShdictStore, ExpiryAndStale)
{
    Fixture f;
    f.set("k", str("v"), f.now + 10);
    EXPECT_EQ(f.getStr("k"), "v");
    f.now += 10;
    EXPECT_EQ(f.getStr("k", true), "v");
    int64_t ms;
    EXPECT_EQ(f.store.ttl("k", 1, f.now, &ms), Status::Ok);
    EXPECT_EQ(ms, 0);
    EXPECT_EQ(f.store.flushExpired(f.now, 0), 1u);
    EXPECT_EQ(f.getStr("k", true), "<1>");
}

TEST(ShdictStore, IncrAndLists)
{
    Fixture f;
    double out;
    bool forc = false;
    EXPECT_EQ(f.store.incr("n", 1, 1, false, 0, 0, f.now, &out, &forc),
              Status::NotFound);
    EXPECT_EQ(f.store.incr("n", 1, 1, true, 10, 0, f.now, &out, &forc),
              Status::Ok);
    EXPECT_EQ(out, 11);
    EXPECT_EQ(f.store.incr("n", 1, 2.5, false, 0, 0, f.now, &out, &forc),
              Status::Ok);
    EXPECT_EQ(out, 13.5);
    f.set("s", str("x"));
    EXPECT_EQ(f.store.incr("s", 1, 1, false, 0, 0, f.now, &out, &forc),
              Status::NotANumber);

    uint64_t len;
    EXPECT_EQ(f.store.push("l", 1, true, num(1), f.now, &len), Status::Ok);
    EXPECT_EQ(f.store.push("l", 1, false, str("two"), f.now, &len),
              Status::Ok);
    EXPECT_EQ(len, 2u);
    EXPECT_EQ(f.store.push("s", 1, false, num(1), f.now, &len),
              Status::NotAList);
    EXPECT_EQ(f.getStr("l"), "<6>");
    Value v;
    EXPECT_EQ(f.store.pop("l", 1, false, f.now, &v, &f.buf), Status::Ok);
    EXPECT_EQ(std::string(v.str, v.len), "two");
    EXPECT_EQ(f.store.pop("l", 1, false, f.now, &v, &f.buf), Status::Ok);
    EXPECT_EQ(v.number, 1);
    EXPECT_EQ(f.store.pop("l", 1, false, f.now, &v, &f.buf),
              Status::NotFound);
    EXPECT_EQ(f.store.llen("l", 1, f.now, &len), Status::Ok);
    EXPECT_EQ(len, 0u);
}

TEST(ShdictStore, EvictsLeastRecentlyUsedWhenFull)
{
    Fixture f(64 * 1024);
    std::string big(1000, 'v');
    bool forcible = false;
    int i = 0;
    for (; i < 1000 && !forcible; i++) {
        ASSERT_EQ(f.set("k" + std::to_string(i), str(big), 0, false,
                        &forcible), Status::Ok);
        if (i == 5) {
            f.getStr("k0");   // k0 becomes recently used
        }
    }
    EXPECT_TRUE(forcible);
    EXPECT_EQ(f.getStr("k0"), big);       // was touched, survived
    EXPECT_EQ(f.getStr("k1"), "<1>");     // least recently used: evicted
    EXPECT_EQ(f.set("safe", str(big), 0, true, &forcible), Status::NoMemory);
    EXPECT_FALSE(forcible);
    std::string huge(1 << 20, 'h');
    EXPECT_EQ(f.set("huge", str(huge), 0, false, &forcible),
              Status::NoMemory);
}

TEST(ShdictStore, NoLeakAfterDeletes)
{
    Fixture f;
    size_t base = f.mem.used();
    uint64_t len;
    for (int i = 0; i < 100; i++) {
        std::string k = "k" + std::to_string(i);
        f.set(k, str(std::string(i, 'x')));
        f.store.push(("l" + k).data(), k.size() + 1, true, num(i), f.now,
                     &len);
    }
    f.set("exp", str("x"), f.now + 1);
    f.now += 1;
    EXPECT_EQ(f.store.flushExpired(f.now, 0), 1u);
    f.store.flushAll();
    EXPECT_EQ(f.store.flushExpired(f.now, 0), 0u);
    EXPECT_EQ(f.mem.used(), base);
}
