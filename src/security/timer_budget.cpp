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

char kSharedKey;

// The tables and functions every module shares (the globals, the values
// of package.loaded) as a set, kept in the registry and made again only
// when package.loaded has another number of entries: building it for
// every ngx.timer.at cost ~13k instructions.
void pushShared(lua_State *L)
{
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    int loaded = lua_gettop(L);
    lua_Integer n = 0;
    if (lua_istable(L, loaded)) {
        lua_pushnil(L);
        while (lua_next(L, loaded) != 0) {
            lua_pop(L, 1);
            n++;
        }
    }
    lua_pushlightuserdata(L, &kSharedKey);
    lua_rawget(L, LUA_REGISTRYINDEX);      // {set, n} or nil
    if (lua_istable(L, -1)) {
        lua_rawgeti(L, -1, 2);
        bool fresh = lua_tointeger(L, -1) == n;
        lua_pop(L, 1);
        if (fresh) {
            lua_rawgeti(L, -1, 1);
            lua_replace(L, loaded);
            lua_pop(L, 1);
            return;
        }
    }
    lua_pop(L, 1);
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
    lua_pushlightuserdata(L, &kSharedKey);
    lua_createtable(L, 2, 0);
    lua_pushvalue(L, set);
    lua_rawseti(L, -2, 1);
    lua_pushinteger(L, n);
    lua_rawseti(L, -2, 2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    lua_replace(L, loaded);
}

struct Walk {
    lua_State *L;
    int        seen;       // table: tables and functions already queued
    int        queue;      // array: tables and functions still to walk
    int        queued;
    size_t     total;
    int        shared;     // pushShared's set

    // Made on the first table or function only: strings alone (the usual
    // arguments) leave no garbage behind. What every module shares is
    // uncounted: a callback that captures `ngx` or a module parks none
    // of it.
    void makeSeen()
    {
        pushShared(L);
        shared = lua_gettop(L);
        lua_newtable(L);
        lua_newtable(L);
        seen = shared + 1;
        queue = seen + 1;
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
            if (seen == 0) {
                makeSeen();
            }
            lua_pushvalue(L, idx);
            lua_rawget(L, shared);
            bool known = lua_toboolean(L, -1);
            lua_pop(L, 1);
            if (!known) {
                lua_pushvalue(L, idx);
                lua_rawget(L, seen);
                known = lua_toboolean(L, -1);
                lua_pop(L, 1);
            }
            if (known) {
                break;
            }
            lua_pushvalue(L, idx);
            lua_pushboolean(L, 1);
            lua_rawset(L, seen);
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

size_t parkedSize(lua_State *L, int from, int to, size_t limit,
                  bool (*overdue)())
{
    from = from > 0 ? from : lua_gettop(L) + from + 1;
    to = to > 0 ? to : lua_gettop(L) + to + 1;
    Walk w{L, 0, 0, 0, 0, 0};
    for (int i = from; i <= to && w.total <= limit; i++) {
        w.add(i);
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
    if (w.seen) {
        lua_pop(L, 3);
    }
    return w.total;
}

}  // namespace luaguard::budget
