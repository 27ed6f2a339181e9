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

struct Walk {
    lua_State *L;
    int        seen;       // table: tables already queued (0: none yet)
    int        queue;      // array: tables still to walk
    int        queued;
    size_t     total;

    void add(int idx)
    {
        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
            total += lua_objlen(L, idx) + kParkedStringHeader;
            break;
        case LUA_TTABLE:
            if (seen == 0) {
                // Made on the first table only: strings alone (the usual
                // arguments) leave no garbage behind.
                lua_newtable(L);
                lua_newtable(L);
                seen = lua_gettop(L) - 1;
                queue = seen + 1;
            }
            lua_pushvalue(L, idx);
            lua_rawget(L, seen);
            if (lua_toboolean(L, -1)) {
                lua_pop(L, 1);
                break;
            }
            lua_pop(L, 1);
            lua_pushvalue(L, idx);
            lua_pushboolean(L, 1);
            lua_rawset(L, seen);
            lua_pushvalue(L, idx);
            lua_rawseti(L, queue, ++queued);
            total += kParkedTableHeader;
            break;
        case LUA_TFUNCTION:
            for (int i = 1; lua_getupvalue(L, idx, i) != nullptr; i++) {
                if (lua_type(L, -1) == LUA_TSTRING) {
                    total += lua_objlen(L, -1) + kParkedStringHeader;
                }
                lua_pop(L, 1);
            }
            break;
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
    Walk w{L, 0, 0, 0, 0};
    for (int i = from; i <= to && w.total <= limit; i++) {
        w.add(i);
    }
    size_t steps = 0;
    bool stop = w.total > limit;
    for (int next = 1; next <= w.queued && !stop; next++) {
        lua_rawgeti(L, w.queue, next);
        int t = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, t) != 0) {
            w.total += kParkedEntry;
            w.add(t + 1);
            w.add(t + 2);
            lua_pop(L, 1);
            stop = w.total > limit
                   || (overdue && ++steps % 1024 == 0 && overdue());
            if (stop) {
                lua_pop(L, 1);   // the key: lua_next is not called again
                break;
            }
        }
        lua_pop(L, 1);
    }
    if (w.seen) {
        lua_pop(L, 2);
    }
    return w.total;
}

}  // namespace luaguard::budget
