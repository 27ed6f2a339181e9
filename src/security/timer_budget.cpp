#include "security/timer_budget.hpp"

namespace luaguard::budget {

void TimeBucket::start(uint64_t cap_ns, uint64_t interval_ns,
                       uint64_t now_ns)
{
    cap_ = cap_ns;
    interval_ = interval_ns ? interval_ns : 1;
    refilled_ = now_ns;
    balance_ = static_cast<int64_t>(cap_ns);   // a new location starts full
}

void TimeBucket::refill(uint64_t now_ns)
{
    if (cap_ == 0 || now_ns <= refilled_) {
        refilled_ = now_ns > refilled_ ? now_ns : refilled_;
        return;
    }
    // In double: elapsed * cap overflows 64 bits after hours of idleness.
    double earned = static_cast<double>(now_ns - refilled_)
                    * static_cast<double>(cap_)
                    / static_cast<double>(interval_);
    double balance = static_cast<double>(balance_) + earned;
    double cap = static_cast<double>(cap_);
    balance_ = static_cast<int64_t>(balance < cap ? balance : cap);
    refilled_ = now_ns;
}

uint64_t TimeBucket::untilRefilled() const
{
    if (!empty()) {
        return 0;
    }
    // Just past the debt: one more nanosecond of earnings than it owes.
    double debt = static_cast<double>(-balance_) + 1;
    return static_cast<uint64_t>(debt * static_cast<double>(interval_)
                                 / static_cast<double>(cap_)) + 1;
}

namespace {

char kCacheKey;

// The per-VM cache, in the registry: {shared set, package.loaded's size
// when it was made, the queue, table.nkeys}.
enum Cache { kSet = 1, kLoadedSize = 2, kQueue = 3, kNkeys = 4 };

// The number of entries of package.loaded (at `loaded`): table.nkeys
// counts them in one C loop where lua_next costs ~100 instructions per
// entry.
lua_Integer loadedSize(lua_State *L, int cache, int loaded)
{
    if (!lua_istable(L, loaded)) {
        return 0;
    }
    lua_rawgeti(L, cache, kNkeys);
    if (lua_isfunction(L, -1)) {
        lua_pushvalue(L, loaded);
        lua_call(L, 1, 1);
        lua_Integer n = lua_tointeger(L, -1);
        lua_pop(L, 1);
        return n;
    }
    lua_pop(L, 1);
    lua_Integer n = 0;
    lua_pushnil(L);
    while (lua_next(L, loaded) != 0) {
        lua_pop(L, 1);
        n++;
    }
    return n;
}

// Pushes the cache, made on first use, with table.nkeys taken from its
// preload loader when this LuaJIT has one (the loader also stores it as
// `table.nkeys`, which scripts only see after require "table.nkeys":
// that is undone).
void pushCache(lua_State *L)
{
    lua_pushlightuserdata(L, &kCacheKey);
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_istable(L, -1)) {
        return;
    }
    lua_pop(L, 1);
    lua_createtable(L, 4, 0);
    int cache = lua_gettop(L);
    lua_createtable(L, 16, 0);
    lua_rawseti(L, cache, kQueue);
    lua_getfield(L, LUA_REGISTRYINDEX, "_PRELOAD");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "table.nkeys");
        if (lua_iscfunction(L, -1)) {
            int loader = lua_gettop(L);
            lua_getfenv(L, loader);              // the table library
            int lib = lua_gettop(L);
            lua_getfield(L, lib, "nkeys");
            bool had = !lua_isnil(L, -1);
            lua_pushvalue(L, loader);
            lua_call(L, 0, 1);
            if (lua_iscfunction(L, -1)) {
                lua_rawseti(L, cache, kNkeys);
            }
            if (!had && lua_istable(L, lib)) {
                lua_pushnil(L);
                lua_setfield(L, lib, "nkeys");
            }
        }
    }
    lua_settop(L, cache);
    lua_pushlightuserdata(L, &kCacheKey);
    lua_pushvalue(L, cache);
    lua_rawset(L, LUA_REGISTRYINDEX);
}

// Pushes the set of the tables and functions every module shares (the
// globals, the values of package.loaded), kept in the cache and made
// again only when package.loaded has another number of entries: building
// it for every ngx.timer.at cost ~13k instructions.
void pushShared(lua_State *L, int cache)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    int loaded = lua_gettop(L);
    lua_Integer n = loadedSize(L, cache, loaded);
    lua_rawgeti(L, cache, kLoadedSize);
    bool fresh = lua_isnumber(L, -1) && lua_tointeger(L, -1) == n;
    lua_pop(L, 1);
    if (fresh) {
        lua_rawgeti(L, cache, kSet);
        lua_replace(L, loaded);
        return;
    }
    lua_createtable(L, 0, static_cast<int>(n) + 2);
    int set = lua_gettop(L);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    lua_pushboolean(L, 1);
    lua_rawset(L, set);
    if (lua_istable(L, loaded)) {
        lua_pushvalue(L, loaded);
        lua_pushboolean(L, 1);
        lua_rawset(L, set);
        lua_pushnil(L);
        while (lua_next(L, loaded) != 0) {
            int t = lua_type(L, -1);
            if (t == LUA_TTABLE || t == LUA_TFUNCTION) {
                lua_pushboolean(L, 1);
                lua_rawset(L, set);    // value -> true; the key stays
                continue;
            }
            lua_pop(L, 1);
        }
    }
    lua_pushvalue(L, set);
    lua_rawseti(L, cache, kSet);
    lua_pushinteger(L, n);
    lua_rawseti(L, cache, kLoadedSize);
    lua_replace(L, loaded);
}

// Tables and functions already queued: the first kFew by address in
// place (a timer's callback reaches a handful), the rest in a table keyed
// by light userdata. Addresses are stable: everything queued stays
// reachable from the values measured while the walk runs.
constexpr int kFew = 32;

struct Walk {
    explicit Walk(lua_State *l) : L(l) {}   // `few` left unset: filled
                                             // before it is read
    lua_State  *L;
    int         cache = 0;     // pushCache's table
    int         shared = 0;    // pushShared's set
    int         queue = 0;     // the cache's array: still to walk
    int         more = 0;      // the seen table past kFew (nil until
    bool        more_made = false;  // needed: its slot is kept for it)
    int         queued = 0;
    size_t      total = 0;
    const void *few[kFew];

    // Made on the first table or function with upvalues: strings and
    // plain callbacks (the usual arguments) need none of it. What every
    // module shares is uncounted: a callback that captures `ngx` or a
    // module parks none of it.
    void prepare()
    {
        pushCache(L);
        cache = lua_gettop(L);
        pushShared(L, cache);
        shared = lua_gettop(L);
        lua_rawgeti(L, cache, kQueue);
        queue = lua_gettop(L);
        // The slot of the seen table past kFew: when it is made, values
        // are being walked above the slots pushed here.
        lua_pushnil(L);
        more = lua_gettop(L);
    }

    // True when `p` was seen before; marks it seen otherwise.
    bool seen(const void *p)
    {
        int n = queued < kFew ? queued : kFew;
        for (int i = 0; i < n; i++) {
            if (few[i] == p) {
                return true;
            }
        }
        if (queued < kFew) {
            few[queued] = p;
            return false;
        }
        if (!more_made) {
            lua_createtable(L, 0, 2 * kFew);
            lua_replace(L, more);
            more_made = true;
        }
        lua_pushlightuserdata(L, const_cast<void *>(p));
        lua_rawget(L, more);
        bool known = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (!known) {
            lua_pushlightuserdata(L, const_cast<void *>(p));
            lua_pushboolean(L, 1);
            lua_rawset(L, more);
        }
        return known;
    }

    void add(int idx)
    {
        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
            total += lua_objlen(L, idx) + kParkedStringHeader;
            break;
        case LUA_TFUNCTION:
            // A closure without upvalues keeps nothing else alive: its
            // header is all it costs, shared or not, so the usual callback
            // (`function(premature, ...)` over its arguments) needs no
            // sets.
            if (lua_getupvalue(L, idx, 1) == nullptr) {
                total += kParkedClosureHeader;
                break;
            }
            lua_pop(L, 1);
            [[fallthrough]];
        case LUA_TTABLE: {
            if (cache == 0) {
                prepare();
            }
            lua_pushvalue(L, idx);
            lua_rawget(L, shared);
            bool known = lua_toboolean(L, -1);
            lua_pop(L, 1);
            if (known || seen(lua_topointer(L, idx))) {
                break;
            }
            lua_pushvalue(L, idx);
            lua_rawseti(L, queue, ++queued);
            total += lua_type(L, idx) == LUA_TTABLE ? kParkedTableHeader
                                                    : kParkedClosureHeader;
            break;
        }
        default:
            break;
        }
    }
};

}  // namespace

namespace {

// Adds to *total the size of a value that keeps nothing else alive (a
// scalar, a string, a function without upvalues) and returns true; false
// for a table or a closure with upvalues, which need the walk.
bool leafSize(lua_State *L, int idx, size_t *total)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        *total += lua_objlen(L, idx) + kParkedStringHeader;
        return true;
    case LUA_TFUNCTION:
        if (lua_getupvalue(L, idx, 1) == nullptr) {
            *total += kParkedClosureHeader;
            return true;
        }
        lua_pop(L, 1);
        return false;
    case LUA_TTABLE:
        return false;
    default:
        return true;
    }
}

// The walk from the first value that is not a leaf (`from`), `total`
// holding the size of the leaves before it.
__attribute__((noinline)) size_t walkFrom(lua_State *L, int from, int to,
                                          size_t total, size_t limit,
                                          bool (*overdue)())
{
    int top = lua_gettop(L);
    Walk w(L);
    w.total = total;
    for (int i = from; i <= to && w.total <= limit; i++) {
        w.add(i);
    }
    if (w.cache == 0) {
        return w.total;   // nothing was pushed
    }
    size_t steps = 0;
    bool stop = w.total > limit;
    auto step = [&] {
        stop = w.total > limit
               || (overdue && ++steps % 1024 == 0 && overdue());
    };
    for (int next = 1; next <= w.queued && !stop; next++) {
        lua_rawgeti(L, w.queue, next);
        int t = lua_gettop(L);
        if (lua_type(L, t) == LUA_TFUNCTION) {
            // What the closure keeps alive: its upvalues.
            for (int i = 1; !stop && lua_getupvalue(L, t, i) != nullptr;
                 i++)
            {
                w.total += kParkedUpvalue;
                w.add(t + 1);
                lua_pop(L, 1);
                step();
            }
            lua_pop(L, 1);
            continue;
        }
        lua_pushnil(L);
        while (lua_next(L, t) != 0) {
            w.total += kParkedEntry;
            w.add(t + 1);
            w.add(t + 2);
            lua_pop(L, 1);
            step();
            if (stop) {
                lua_pop(L, 1);   // the key: lua_next is not called again
                break;
            }
        }
        lua_pop(L, 1);
    }
    if (w.queue) {
        // The queue is the cache's: it keeps nothing alive after the walk.
        for (int i = 1; i <= w.queued; i++) {
            lua_pushnil(L);
            lua_rawseti(L, w.queue, i);
        }
    }
    lua_settop(L, top);
    return w.total;
}

}  // namespace

size_t parkedSize(lua_State *L, int from, int to, size_t limit,
                  bool (*overdue)())
{
    int top = lua_gettop(L);
    from = from > 0 ? from : top + from + 1;
    to = to > 0 ? to : top + to + 1;
    // The usual arguments (numbers, strings, a callback that captures
    // nothing) are sized here, without the walk's state.
    size_t total = 0;
    int i = from;
    while (i <= to && total <= limit && leafSize(L, i, &total)) {
        i++;
    }
    if (i > to || total > limit) {
        return total;
    }
    return walkFrom(L, i, to, total, limit, overdue);
}

}  // namespace luaguard::budget
