#include "runtime/regex_heap.hpp"

#include <atomic>
#include <cstdlib>

namespace luaguard::regex {

namespace {

enum : int { kPlain, kFresh, kDeferred };

// The handler reads busy_ on the same thread: keep the compiler from
// moving list updates outside the busy window.
void fence()
{
    std::atomic_signal_fence(std::memory_order_seq_cst);
}

}  // namespace

void PcreHeap::link(Header **list, Header *h)
{
    h->prev = nullptr;
    h->next = *list;
    if (*list) {
        (*list)->prev = h;
    }
    *list = h;
}

void PcreHeap::unlink(Header **list, Header *h)
{
    if (h->prev) {
        h->prev->next = h->next;
    } else {
        *list = h->next;
    }
    if (h->next) {
        h->next->prev = h->prev;
    }
}

void *PcreHeap::alloc(size_t size, void *self)
{
    auto *heap = static_cast<PcreHeap *>(self);
    heap->busy_ = 1;
    fence();
    void *mem = std::malloc(sizeof(Header) + size);
    void *user = nullptr;
    if (mem) {
        auto *h = static_cast<Header *>(mem);
        h->state = kPlain;
        h->prev = h->next = nullptr;
        if (heap->in_match_) {
            h->state = kFresh;
            link(&heap->fresh_, h);
        }
        heap->live_++;
        user = h + 1;
    }
    fence();
    heap->busy_ = 0;
    return user;
}

void PcreHeap::release(void *p, void *self)
{
    if (p == nullptr) {
        return;
    }
    auto *heap = static_cast<PcreHeap *>(self);
    Header *h = static_cast<Header *>(p) - 1;
    heap->busy_ = 1;
    fence();
    if (heap->in_match_) {
        // Deferred: the match data may still point here if the match is
        // abandoned before it stores the block's successor.
        if (h->state == kFresh) {
            unlink(&heap->fresh_, h);
        }
        if (h->state != kDeferred) {
            h->state = kDeferred;
            link(&heap->deferred_, h);
        }
    } else {
        if (h->state == kFresh) {
            unlink(&heap->fresh_, h);
        } else if (h->state == kDeferred) {
            unlink(&heap->deferred_, h);
        }
        heap->live_--;
        std::free(h);
    }
    fence();
    heap->busy_ = 0;
}

void PcreHeap::freeAll(Header **list)
{
    while (*list) {
        Header *h = *list;
        *list = h->next;
        live_--;
        std::free(h);
    }
}

void PcreHeap::begin()
{
    in_match_ = true;
}

void PcreHeap::end()
{
    in_match_ = false;
    freeAll(&deferred_);
    // What the match allocated and kept belongs to the match data now.
    while (fresh_) {
        Header *h = fresh_;
        fresh_ = h->next;
        h->state = kPlain;
        h->prev = h->next = nullptr;
    }
}

// The caller has freed the match data first, while still in the match.
void PcreHeap::abandon()
{
    in_match_ = false;
    freeAll(&deferred_);
    freeAll(&fresh_);
}

}  // namespace luaguard::regex
