// The shared dictionary store: a hash table of entries with an LRU list,
// expiry, and list values, laid out in one shared memory region. No nginx
// here: memory and locking come through `Memory`, so the logic is unit
// tested with malloc and a plain mutex, and runs in nginx over the zone's
// slab pool and its ngx_shmtx.
//
// Everything reachable from `Header` lives in the shared region and holds
// raw pointers into it: nginx maps a zone at the same address in every
// worker (the mapping is inherited from the master), as its own modules
// rely on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace luaguard::shdict {

// Value types; the numbers are Lua's type tags so the binding can switch
// on lua_type directly.
enum class VType : uint8_t {
    None = 0,      // no value: get of a missing key
    Boolean = 1,
    Number = 3,
    String = 4,
    List = 5,
};

constexpr size_t kMaxKeyLen = 65535;

// The region's allocator and lock. alloc/free/freeSpace are only called
// with the lock held.
class Memory {
 public:
    virtual ~Memory() = default;
    virtual void *alloc(size_t size) = 0;
    virtual void free(void *p) = 0;
    virtual size_t freeSpace() = 0;
    virtual void lock() = 0;
    virtual void unlock() = 0;
};

// A value going in or out. For strings, `str`/`len` point at the caller's
// bytes (in) or at the output buffer (out).
struct Value {
    VType        type = VType::None;
    bool         boolean = false;
    double       number = 0;
    const char  *str = nullptr;
    size_t       len = 0;
};

// A growable byte buffer owned by the caller (one per worker), where
// values and keys are copied while the lock is held, so that pushing them
// to Lua (which may raise) happens after unlocking.
class Buffer {
 public:
    Buffer() = default;
    ~Buffer();
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;

    bool reserve(size_t n);     // false when out of memory
    char *data() { return data_; }
    size_t size() const { return size_; }
    void clear() { size_ = 0; }
    bool append(const void *p, size_t n);

 private:
    char   *data_ = nullptr;
    size_t  size_ = 0;
    size_t  cap_ = 0;
};

enum class Status {
    Ok,
    NotFound,       // "not found" (or nil where the API returns nil)
    Exists,         // "exists"
    NoMemory,       // "no memory"
    NotANumber,     // "not a number"
    NotAList,       // "value not a list"
    IsList,         // "value is a list"
};

const char *statusText(Status s);

struct Node;

// The root of a store, at the start of the shared region's data.
struct Header {
    uint32_t   magic;
    uint32_t   nbuckets;      // a power of two
    Node     **buckets;
    Node      *lru_head;      // most recently used
    Node      *lru_tail;      // least recently used
    uint64_t   count;
};
static_assert(std::is_trivially_copyable<Header>::value,
              "shared memory structs must be trivially copyable");

enum class StoreOp { Set, Add, Replace };

// Operations on one store. `now` is the current time in milliseconds;
// exptimes are absolute milliseconds, 0 for "never". All methods take the
// lock themselves.
class Store {
 public:
    Store(Header *h, Memory *mem) : h_(h), mem_(mem) {}

    // Points the store at a header (the zone is mapped after the
    // configuration is read, and a reload reuses the previous header).
    void attach(Header *h) { h_ = h; }
    Header *header() const { return h_; }

    // Builds an empty store's header (allocating its bucket array) in a
    // fresh region. Null when the region is too small.
    static Header *create(Memory *mem, size_t region_size);

    // get / get_stale: copies a string into *buf. *stale tells an expired
    // value returned by get_stale.
    Status get(const char *key, size_t klen, uint64_t now, bool allow_stale,
               Value *out, int32_t *flags, bool *stale, Buffer *buf);

    // set / safe_set / add / safe_add / replace; a None value deletes (Set
    // only). `safe` forbids evicting live entries to make room.
    Status store(StoreOp op, const char *key, size_t klen, const Value &v,
                 uint64_t exptime, int32_t flags, bool safe, uint64_t now,
                 bool *forcible);

    Status remove(const char *key, size_t klen);

    // incr: with has_init, a missing (or expired) key starts at init and
    // gets init_exptime.
    Status incr(const char *key, size_t klen, double delta, bool has_init,
                double init, uint64_t init_exptime, uint64_t now,
                double *out, bool *forcible);

    Status push(const char *key, size_t klen, bool left, const Value &v,
                uint64_t now, uint64_t *len);
    Status pop(const char *key, size_t klen, bool left, uint64_t now,
               Value *out, Buffer *buf);
    Status llen(const char *key, size_t klen, uint64_t now, uint64_t *len);

    // ttl: remaining milliseconds (negative once expired but not yet
    // freed), 0 for no expiry.
    Status ttl(const char *key, size_t klen, uint64_t now, int64_t *ms);
    Status expire(const char *key, size_t klen, uint64_t exptime);

    void flushAll();
    uint64_t flushExpired(uint64_t now, uint64_t max_count);

    // Copies up to max_count (0: all) live keys into *buf as
    // [uint16 len][bytes] records; *n receives the number of keys.
    bool keys(uint64_t now, uint64_t max_count, Buffer *buf, uint64_t *n);

    size_t freeSpace();

 private:
    Node *find(const char *key, size_t klen, uint32_t hash, Node ***link);
    void unlinkNode(Node *n, Node **link);
    void freeNode(Node *n);
    void touch(Node *n);
    void lruPush(Node *n);
    void lruRemove(Node *n);
    void *allocEvicting(size_t size, bool safe, bool *forcible,
                        Node *keep, uint64_t now);
    bool evictOne(Node *keep, bool expired_only, uint64_t now);
    void expireSome(uint64_t now, int max);
    Node *insertNode(const char *key, size_t klen, uint32_t hash, VType t,
                     size_t vlen, bool safe, bool *forcible, uint64_t now);

    Header *h_;
    Memory *mem_;
};

uint32_t hashKey(const char *key, size_t len);

}  // namespace luaguard::shdict
