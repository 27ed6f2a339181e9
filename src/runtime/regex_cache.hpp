// The compile-once ("o") regex cache policy: least recently used entries
// are evicted once `capacity` is reached (lua-resty-core's documented LRU
// behaviour). Lookups take a string_view and never allocate.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>

namespace luaguard::regex {

template <class V>
class LruCache {
 public:
    explicit LruCache(size_t capacity = 1024) : capacity_(capacity) {}

    size_t size() const { return map_.size(); }
    size_t capacity() const { return capacity_; }

    struct Node {
        std::string  pattern;   // the key: pattern bytes and flags
        uint32_t     flags;
        V            value;
    };
    using List = std::list<Node>;

    // Stable until its entry is evicted: a caller that remembers where an
    // entry is can touch() it without hashing the key again.
    using Handle = typename List::iterator;

    // Finds an entry without changing its age; end() when absent.
    Handle find(std::string_view pattern, uint32_t flags)
    {
        auto it = map_.find(Key{pattern, flags});
        return it == map_.end() ? list_.end() : it->second;
    }
    Handle end() { return list_.end(); }

    // Marks an entry most recently used.
    void touch(Handle h)
    {
        if (h != list_.begin()) {
            list_.splice(list_.begin(), list_, h);
        }
    }

    // Marks the entry most recently used and returns it, or nullptr.
    V *get(std::string_view pattern, uint32_t flags)
    {
        Handle h = find(pattern, flags);
        if (h == list_.end()) {
            return nullptr;
        }
        touch(h);
        return &h->value;
    }

    // Inserts a new entry (the key must be absent). When the cache is full
    // the least recently used entry is evicted first and handed to `evict`.
    // Returns false, storing nothing, when the capacity is 0.
    template <class Evict>
    bool put(std::string_view pattern, uint32_t flags, V value, Evict evict,
             Handle *where = nullptr)
    {
        if (capacity_ == 0) {
            return false;
        }
        while (map_.size() >= capacity_) {
            evictLast(evict);
        }
        list_.push_front(Node{std::string(pattern), flags, std::move(value)});
        Node &n = list_.front();
        map_.emplace(Key{n.pattern, n.flags}, list_.begin());
        if (where) {
            *where = list_.begin();
        }
        return true;
    }

    // Changes the capacity, evicting the least recently used as needed.
    template <class Evict>
    void setCapacity(size_t capacity, Evict evict)
    {
        capacity_ = capacity;
        while (map_.size() > capacity_) {
            evictLast(evict);
        }
    }

    template <class Evict>
    void clear(Evict evict)
    {
        while (!list_.empty()) {
            evictLast(evict);
        }
    }

    // Keys from most to least recently used (for tests).
    template <class F>
    void forEach(F f) const
    {
        for (const Node &n : list_) {
            f(n.pattern, n.flags, n.value);
        }
    }

 private:
    // Views into the nodes' own strings: list nodes never move.
    struct Key {
        std::string_view pattern;
        uint32_t flags;
        bool operator==(const Key &o) const
        {
            return flags == o.flags && pattern == o.pattern;
        }
    };
    struct Hash {
        size_t operator()(const Key &k) const
        {
            return std::hash<std::string_view>()(k.pattern)
                   ^ (static_cast<size_t>(k.flags) * 0x9e3779b97f4a7c15ull);
        }
    };
    template <class Evict>
    void evictLast(Evict &evict)
    {
        Node &n = list_.back();
        map_.erase(Key{n.pattern, n.flags});
        V v = std::move(n.value);
        list_.pop_back();
        evict(v);
    }

    size_t                                                 capacity_;
    List                                                   list_;
    std::unordered_map<Key, typename List::iterator, Hash> map_;
};

}  // namespace luaguard::regex
