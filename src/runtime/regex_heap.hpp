// PCRE2's memory, kept so that a match can be abandoned half-way.
//
// A regex match that outlives its CPU budget is left by a jump out of the
// budget's signal handler (api/regex.cpp): nothing inside one pcre2 call
// would ever reach the Lua hook otherwise. The interpreter grows its
// backtracking frames during the match (allocate the new vector, copy,
// free the old one, then store the new pointer in the match data), so a
// jump can leave the match data pointing at a block already freed, or a
// new block referenced by nothing. PcreHeap makes that safe:
//
// - while a match runs (begin() .. end()), frees are deferred and every
//   allocation is recorded;
// - after a normal return, end() performs the deferred frees;
// - after a jump, the caller first frees the match data (its pointers
//   may be stale: a second free of a deferred block is ignored), then
//   abandon() frees everything the match allocated or freed.
//
// busy() is true inside alloc/release: the signal handler must not jump
// then (malloc's locks, the lists here).
#pragma once

#include <csignal>
#include <cstddef>

namespace luaguard::regex {

class PcreHeap {
 public:
    // pcre2_general_context_create's signatures; `self` is the PcreHeap.
    static void *alloc(size_t size, void *self);
    static void release(void *p, void *self);

    void begin();
    void end();
    void abandon();

    bool busy() const { return busy_ != 0; }
    // Blocks still allocated, for tests and leak checks.
    size_t live() const { return live_; }

    struct alignas(16) Header {
        Header  *prev;
        Header  *next;
        int      state;     // kPlain, kFresh or kDeferred
    };

 private:
    static void link(Header **list, Header *h);
    static void unlink(Header **list, Header *h);
    void freeAll(Header **list);

    Header *fresh_ = nullptr;       // allocated during the match
    Header *deferred_ = nullptr;    // freed during the match
    bool in_match_ = false;
    volatile sig_atomic_t busy_ = 0;
    size_t live_ = 0;
};

}  // namespace luaguard::regex
