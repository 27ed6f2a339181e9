#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

#include "runtime/regex_heap.hpp"

using luaguard::regex::PcreHeap;

namespace {

void *alloc(PcreHeap &h, size_t n)
{
    void *p = PcreHeap::alloc(n, &h);
    std::memset(p, 0xab, n);  // the block is usable (ASan checks)
    return p;
}

void release(PcreHeap &h, void *p)
{
    PcreHeap::release(p, &h);
}

}  // namespace

TEST(PcreHeap, OutsideAMatchFreesAtOnce)
{
    PcreHeap h;
    void *a = alloc(h, 100);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a) % 16, 0u);
    EXPECT_EQ(h.live(), 1u);
    release(h, a);
    EXPECT_EQ(h.live(), 0u);
    release(h, nullptr);
}

TEST(PcreHeap, MatchDefersFreesUntilItEnds)
{
    PcreHeap h;
    void *md = alloc(h, 64);        // the match data, before the match
    void *frames = alloc(h, 1000);
    h.begin();
    void *bigger = alloc(h, 2000);  // the frames grow: new, copy, free old
    release(h, frames);
    EXPECT_EQ(h.live(), 3u);        // still readable until the match ends
    EXPECT_FALSE(h.busy());
    h.end();
    EXPECT_EQ(h.live(), 2u);
    // What the match kept is an ordinary block now.
    release(h, bigger);
    release(h, md);
    EXPECT_EQ(h.live(), 0u);
}

TEST(PcreHeap, AbandonAfterNewBlockBeforeItIsStored)
{
    // The jump lands after the old frames were freed but before the match
    // data points at the new ones: the match data frees the old (stale)
    // pointer a second time, the new block is referenced by nothing.
    PcreHeap h;
    void *md = alloc(h, 64);
    void *frames = alloc(h, 1000);
    h.begin();
    alloc(h, 2000);
    release(h, frames);
    release(h, frames);             // pcre2_match_data_free, stale pointer
    release(h, md);
    h.abandon();
    EXPECT_EQ(h.live(), 0u);
}

TEST(PcreHeap, AbandonAfterNewBlockWasStored)
{
    PcreHeap h;
    void *md = alloc(h, 64);
    void *frames = alloc(h, 1000);
    h.begin();
    void *bigger = alloc(h, 2000);
    release(h, frames);
    void *biggest = alloc(h, 4000);
    release(h, bigger);
    release(h, biggest);            // pcre2_match_data_free
    release(h, md);
    h.abandon();
    EXPECT_EQ(h.live(), 0u);
    // The heap is usable for the next match.
    void *again = alloc(h, 10);
    h.begin();
    h.end();
    release(h, again);
    EXPECT_EQ(h.live(), 0u);
}
