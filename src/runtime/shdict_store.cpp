#include "runtime/shdict_store.hpp"

#include <cstdlib>
#include <cstring>

namespace luaguard::shdict {

namespace {

constexpr uint32_t kMagic = 0x6c677364;   // "lgsd"
// How many entries one allocation may evict before giving up with
// "no memory": a value too large for the zone must not wipe it.
constexpr int kMaxEvictions = 30;
// Expired entries reclaimed from the LRU tail on each write, so a busy
// dictionary does not fill up with dead entries.
constexpr int kExpireOnWrite = 2;

}  // namespace

// One entry: the node, then the key bytes, then the value bytes (a double
// for numbers, one byte for booleans, the bytes of a string, or a ListHead
// for lists). Numbers are copied with memcpy: the value is not aligned.
struct Node {
    Node      *hnext;
    Node      *lru_prev;
    Node      *lru_next;
    uint64_t   expires;       // absolute ms, 0: never
    uint64_t   vlen;          // string bytes, or list length
    uint32_t   hash;
    int32_t    flags;
    uint16_t   klen;
    VType      type;

    char *key() { return reinterpret_cast<char *>(this + 1); }
    char *val() { return key() + klen; }
};
static_assert(std::is_trivially_copyable<Node>::value,
              "shared memory structs must be trivially copyable");

struct ListItem {
    ListItem  *prev;
    ListItem  *next;
    uint64_t   len;
    VType      type;

    char *val() { return reinterpret_cast<char *>(this + 1); }
};
static_assert(std::is_trivially_copyable<ListItem>::value,
              "shared memory structs must be trivially copyable");

struct ListHead {
    ListItem  *head;
    ListItem  *tail;
};
static_assert(std::is_trivially_copyable<ListHead>::value,
              "shared memory structs must be trivially copyable");

namespace {

class Locked {
 public:
    explicit Locked(Memory *m) : m_(m) { m_->lock(); }
    ~Locked() { m_->unlock(); }
    Locked(const Locked &) = delete;
    Locked &operator=(const Locked &) = delete;

 private:
    Memory *m_;
};

bool expired(const Node *n, uint64_t now)
{
    return n->expires != 0 && n->expires <= now;
}

size_t valueSize(const Value &v)
{
    switch (v.type) {
    case VType::Boolean:
        return 1;
    case VType::Number:
        return sizeof(double);
    case VType::String:
        return v.len;
    case VType::List:
        return sizeof(ListHead);
    default:
        return 0;
    }
}

void writeValue(char *dst, const Value &v)
{
    switch (v.type) {
    case VType::Boolean:
        *dst = v.boolean ? 1 : 0;
        break;
    case VType::Number:
        std::memcpy(dst, &v.number, sizeof(double));
        break;
    case VType::String:
        if (v.len) {
            std::memcpy(dst, v.str, v.len);
        }
        break;
    default:
        break;
    }
}

// Reads a scalar value; strings are copied into buf.
bool readValue(VType t, const char *src, uint64_t len, Value *out,
               Buffer *buf)
{
    out->type = t;
    switch (t) {
    case VType::Boolean:
        out->boolean = *src != 0;
        return true;
    case VType::Number:
        std::memcpy(&out->number, src, sizeof(double));
        return true;
    case VType::String:
        buf->clear();
        if (!buf->append(src, len)) {
            return false;
        }
        out->str = buf->data();
        out->len = len;
        return true;
    default:
        return true;
    }
}

ListHead getList(Node *n)
{
    ListHead lh;
    std::memcpy(&lh, n->val(), sizeof(lh));
    return lh;
}

void putList(Node *n, const ListHead &lh)
{
    std::memcpy(n->val(), &lh, sizeof(lh));
}

}  // namespace

// ---- Buffer ----

Buffer::~Buffer()
{
    std::free(data_);
}

bool Buffer::reserve(size_t n)
{
    if (n <= cap_) {
        return true;
    }
    size_t cap = cap_ ? cap_ : 256;
    while (cap < n) {
        cap *= 2;
    }
    void *p = std::realloc(data_, cap);
    if (p == nullptr) {
        return false;
    }
    data_ = static_cast<char *>(p);
    cap_ = cap;
    return true;
}

bool Buffer::append(const void *p, size_t n)
{
    if (!reserve(size_ + n)) {
        return false;
    }
    if (n) {
        std::memcpy(data_ + size_, p, n);
    }
    size_ += n;
    return true;
}

const char *statusText(Status s)
{
    switch (s) {
    case Status::Ok:
        return nullptr;
    case Status::NotFound:
        return "not found";
    case Status::Exists:
        return "exists";
    case Status::NoMemory:
        return "no memory";
    case Status::NotANumber:
        return "not a number";
    case Status::NotAList:
        return "value not a list";
    case Status::IsList:
        return "value is a list";
    }
    return "unknown error";
}

// FNV-1a: keys are short, and the hash must be the same in every process.
uint32_t hashKey(const char *key, size_t len)
{
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < len; i++) {
        h ^= static_cast<unsigned char>(key[i]);
        h *= 16777619u;
    }
    return h;
}

// ---- Store ----

Header *Store::create(Memory *mem, size_t region_size)
{
    Locked lock(mem);
    // About one bucket per 512 bytes of zone: chains stay short for the
    // small entries dictionaries mostly hold.
    uint32_t nbuckets = 16;
    while (nbuckets < region_size / 512 && nbuckets < (1u << 24)) {
        nbuckets <<= 1;
    }
    auto *h = static_cast<Header *>(mem->alloc(sizeof(Header)));
    if (h == nullptr) {
        return nullptr;
    }
    auto **b = static_cast<Node **>(mem->alloc(nbuckets * sizeof(Node *)));
    if (b == nullptr) {
        mem->free(h);
        return nullptr;
    }
    std::memset(b, 0, nbuckets * sizeof(Node *));
    h->magic = kMagic;
    h->nbuckets = nbuckets;
    h->buckets = b;
    h->lru_head = nullptr;
    h->lru_tail = nullptr;
    h->count = 0;
    return h;
}

Node *Store::find(const char *key, size_t klen, uint32_t hash, Node ***link)
{
    Node **pp = &h_->buckets[hash & (h_->nbuckets - 1)];
    for (Node *n = *pp; n; pp = &n->hnext, n = n->hnext) {
        if (n->hash == hash && n->klen == klen
            && std::memcmp(n->key(), key, klen) == 0)
        {
            if (link) {
                *link = pp;
            }
            return n;
        }
    }
    if (link) {
        *link = pp;
    }
    return nullptr;
}

void Store::lruRemove(Node *n)
{
    if (n->lru_prev) {
        n->lru_prev->lru_next = n->lru_next;
    } else {
        h_->lru_head = n->lru_next;
    }
    if (n->lru_next) {
        n->lru_next->lru_prev = n->lru_prev;
    } else {
        h_->lru_tail = n->lru_prev;
    }
    n->lru_prev = n->lru_next = nullptr;
}

void Store::lruPush(Node *n)
{
    n->lru_prev = nullptr;
    n->lru_next = h_->lru_head;
    if (h_->lru_head) {
        h_->lru_head->lru_prev = n;
    } else {
        h_->lru_tail = n;
    }
    h_->lru_head = n;
}

void Store::touch(Node *n)
{
    if (h_->lru_head != n) {
        lruRemove(n);
        lruPush(n);
    }
}

void Store::freeNode(Node *n)
{
    if (n->type == VType::List) {
        ListHead lh = getList(n);
        for (ListItem *it = lh.head; it;) {
            ListItem *next = it->next;
            mem_->free(it);
            it = next;
        }
    }
    mem_->free(n);
}

// Removes n from its bucket (`link` points at the pointer to it, or null
// to look it up), the LRU list, and frees it.
void Store::unlinkNode(Node *n, Node **link)
{
    if (link == nullptr) {
        Node **pp = &h_->buckets[n->hash & (h_->nbuckets - 1)];
        while (*pp != n) {
            pp = &(*pp)->hnext;
        }
        link = pp;
    }
    *link = n->hnext;
    lruRemove(n);
    h_->count--;
    freeNode(n);
}

// Frees the least recently used entry other than `keep`; with
// expired_only, only when it has expired. True when one was freed.
bool Store::evictOne(Node *keep, bool expired_only, uint64_t now)
{
    Node *n = h_->lru_tail;
    if (n == keep && n) {
        n = n->lru_prev;
    }
    if (n == nullptr || (expired_only && !expired(n, now))) {
        return false;
    }
    unlinkNode(n, nullptr);
    return true;
}

void Store::expireSome(uint64_t now, int max)
{
    for (int i = 0; i < max; i++) {
        if (!evictOne(nullptr, true, now)) {
            return;
        }
    }
}

void *Store::allocEvicting(size_t size, bool safe, bool *forcible,
                           Node *keep, uint64_t now)
{
    void *p = mem_->alloc(size);
    for (int i = 0; p == nullptr && i < kMaxEvictions; i++) {
        if (!evictOne(keep, true, now)) {
            if (safe || !evictOne(keep, false, now)) {
                return nullptr;
            }
            *forcible = true;
        }
        p = mem_->alloc(size);
    }
    return p;
}

Node *Store::insertNode(const char *key, size_t klen, uint32_t hash, VType t,
                        size_t vlen, bool safe, bool *forcible, uint64_t now)
{
    size_t size = sizeof(Node) + klen + vlen;
    if (size < vlen) {
        return nullptr;
    }
    auto *n = static_cast<Node *>(allocEvicting(size, safe, forcible, nullptr,
                                                now));
    if (n == nullptr) {
        return nullptr;
    }
    n->hash = hash;
    n->klen = static_cast<uint16_t>(klen);
    n->type = t;
    n->vlen = 0;
    n->flags = 0;
    n->expires = 0;
    std::memcpy(n->key(), key, klen);
    // Evictions may have changed the chain: link at the bucket head.
    Node **bucket = &h_->buckets[hash & (h_->nbuckets - 1)];
    n->hnext = *bucket;
    *bucket = n;
    lruPush(n);
    h_->count++;
    return n;
}

Status Store::get(const char *key, size_t klen, uint64_t now,
                  bool allow_stale, Value *out, int32_t *flags, bool *stale,
                  Buffer *buf)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    if (n == nullptr) {
        return Status::NotFound;
    }
    bool dead = expired(n, now);
    if (dead && !allow_stale) {
        // get frees an expired entry it finds (a later get_stale no longer
        // sees it), as the reference implementation does.
        unlinkNode(n, link);
        return Status::NotFound;
    }
    if (n->type == VType::List) {
        return Status::IsList;
    }
    if (!readValue(n->type, n->val(), n->vlen, out, buf)) {
        return Status::NoMemory;
    }
    *flags = n->flags;
    *stale = dead;
    if (!dead) {
        touch(n);
    }
    return Status::Ok;
}

Status Store::store(StoreOp op, const char *key, size_t klen, const Value &v,
                    uint64_t exptime, int32_t flags, bool safe, uint64_t now,
                    bool *forcible)
{
    uint32_t hash = hashKey(key, klen);
    size_t vlen = valueSize(v);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    bool live = n && !expired(n, now);

    if (op == StoreOp::Add && live) {
        return Status::Exists;
    }
    if (op == StoreOp::Replace && !live) {
        return Status::NotFound;
    }
    if (v.type == VType::None) {
        if (n) {
            unlinkNode(n, link);
        }
        return Status::Ok;
    }

    // Same type and size: rewrite in place (the common counter/flag case).
    if (n && n->type == v.type && n->type != VType::List && n->vlen == vlen
        && valueSize(v) == vlen)
    {
        writeValue(n->val(), v);
        n->flags = flags;
        n->expires = exptime;
        touch(n);
        return Status::Ok;
    }
    if (n) {
        unlinkNode(n, link);
    }
    expireSome(now, kExpireOnWrite);

    n = insertNode(key, klen, hash, v.type, vlen, safe, forcible, now);
    if (n == nullptr) {
        return Status::NoMemory;
    }
    n->vlen = vlen;
    n->flags = flags;
    n->expires = exptime;
    writeValue(n->val(), v);
    return Status::Ok;
}

Status Store::remove(const char *key, size_t klen)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    if (n) {
        unlinkNode(n, link);
    }
    return Status::Ok;
}

Status Store::incr(const char *key, size_t klen, double delta, bool has_init,
                   double init, uint64_t init_exptime, uint64_t now,
                   double *out, bool *forcible)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    if (n && !expired(n, now)) {
        if (n->type != VType::Number) {
            return Status::NotANumber;
        }
        double v;
        std::memcpy(&v, n->val(), sizeof(v));
        v += delta;
        std::memcpy(n->val(), &v, sizeof(v));
        touch(n);
        *out = v;
        return Status::Ok;
    }
    if (!has_init) {
        return Status::NotFound;
    }
    if (n) {
        unlinkNode(n, link);
    }
    expireSome(now, kExpireOnWrite);
    n = insertNode(key, klen, hash, VType::Number, sizeof(double), false,
                   forcible, now);
    if (n == nullptr) {
        return Status::NoMemory;
    }
    double v = init + delta;
    n->vlen = sizeof(double);
    n->expires = init_exptime;
    std::memcpy(n->val(), &v, sizeof(v));
    *out = v;
    return Status::Ok;
}

Status Store::push(const char *key, size_t klen, bool left, const Value &v,
                   uint64_t now, uint64_t *len)
{
    uint32_t hash = hashKey(key, klen);
    size_t vlen = valueSize(v);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    bool forcible = false;

    if (n && expired(n, now)) {
        unlinkNode(n, link);
        n = nullptr;
    }
    if (n && n->type != VType::List) {
        return Status::NotAList;
    }
    bool created = false;
    if (n == nullptr) {
        expireSome(now, kExpireOnWrite);
        n = insertNode(key, klen, hash, VType::List, sizeof(ListHead), false,
                       &forcible, now);
        if (n == nullptr) {
            return Status::NoMemory;
        }
        putList(n, ListHead{nullptr, nullptr});
        created = true;
    }
    auto *it = static_cast<ListItem *>(
        allocEvicting(sizeof(ListItem) + vlen, false, &forcible, n, now));
    if (it == nullptr) {
        if (created) {
            unlinkNode(n, nullptr);
        }
        return Status::NoMemory;
    }
    it->type = v.type;
    it->len = vlen;
    writeValue(it->val(), v);

    ListHead lh = getList(n);
    if (left) {
        it->prev = nullptr;
        it->next = lh.head;
        if (lh.head) {
            lh.head->prev = it;
        } else {
            lh.tail = it;
        }
        lh.head = it;
    } else {
        it->next = nullptr;
        it->prev = lh.tail;
        if (lh.tail) {
            lh.tail->next = it;
        } else {
            lh.head = it;
        }
        lh.tail = it;
    }
    putList(n, lh);
    n->vlen++;
    touch(n);
    *len = n->vlen;
    return Status::Ok;
}

Status Store::pop(const char *key, size_t klen, bool left, uint64_t now,
                  Value *out, Buffer *buf)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node **link;
    Node *n = find(key, klen, hash, &link);
    if (n == nullptr || expired(n, now)) {
        return Status::NotFound;
    }
    if (n->type != VType::List) {
        return Status::NotAList;
    }
    ListHead lh = getList(n);
    ListItem *it = left ? lh.head : lh.tail;
    if (it == nullptr) {
        return Status::NotFound;
    }
    if (!readValue(it->type, it->val(), it->len, out, buf)) {
        return Status::NoMemory;
    }
    if (left) {
        lh.head = it->next;
        if (lh.head) {
            lh.head->prev = nullptr;
        } else {
            lh.tail = nullptr;
        }
    } else {
        lh.tail = it->prev;
        if (lh.tail) {
            lh.tail->next = nullptr;
        } else {
            lh.head = nullptr;
        }
    }
    mem_->free(it);
    putList(n, lh);
    n->vlen--;
    if (n->vlen == 0) {
        // An emptied list is gone, as in lua-nginx-module.
        unlinkNode(n, link);
    } else {
        touch(n);
    }
    return Status::Ok;
}

Status Store::llen(const char *key, size_t klen, uint64_t now, uint64_t *len)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node *n = find(key, klen, hash, nullptr);
    *len = 0;
    if (n == nullptr || expired(n, now)) {
        return Status::Ok;
    }
    if (n->type != VType::List) {
        return Status::NotAList;
    }
    *len = n->vlen;
    return Status::Ok;
}

Status Store::ttl(const char *key, size_t klen, uint64_t now, int64_t *ms)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node *n = find(key, klen, hash, nullptr);
    if (n == nullptr) {
        return Status::NotFound;
    }
    *ms = n->expires == 0 ? 0
                          : static_cast<int64_t>(n->expires)
                                - static_cast<int64_t>(now);
    return Status::Ok;
}

Status Store::expire(const char *key, size_t klen, uint64_t exptime)
{
    uint32_t hash = hashKey(key, klen);
    Locked lock(mem_);
    Node *n = find(key, klen, hash, nullptr);
    if (n == nullptr) {
        return Status::NotFound;
    }
    n->expires = exptime;
    return Status::Ok;
}

void Store::flushAll()
{
    Locked lock(mem_);
    // Observably the reference's flushed entries are gone: get_stale and
    // ttl no longer find them and flush_expired does not count them. So
    // they are freed at once.
    while (h_->lru_head) {
        unlinkNode(h_->lru_head, nullptr);
    }
}

uint64_t Store::flushExpired(uint64_t now, uint64_t max_count)
{
    Locked lock(mem_);
    uint64_t freed = 0;
    for (Node *n = h_->lru_tail; n;) {
        Node *prev = n->lru_prev;
        if (expired(n, now)) {
            unlinkNode(n, nullptr);
            if (++freed == max_count) {
                break;
            }
        }
        n = prev;
    }
    return freed;
}

bool Store::keys(uint64_t now, uint64_t max_count, Buffer *buf, uint64_t *nk)
{
    Locked lock(mem_);
    buf->clear();
    uint64_t count = 0;
    for (Node *n = h_->lru_head; n; n = n->lru_next) {
        if (expired(n, now)) {
            continue;
        }
        uint16_t klen = n->klen;
        if (!buf->append(&klen, sizeof(klen))
            || !buf->append(n->key(), klen))
        {
            return false;
        }
        if (++count == max_count) {
            break;
        }
    }
    *nk = count;
    return true;
}

size_t Store::freeSpace()
{
    Locked lock(mem_);
    return mem_->freeSpace();
}

}  // namespace luaguard::shdict
