// ngx.timer.at / every / running_count / pending_count: the arguments;
// the driver that arms and runs timers is ngx/timers.cpp.

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"

namespace luaguard::api {

namespace {

// The estimate of what a pending timer keeps alive that
// lua_timer_memory_per_location counts (docs/budgets.md "Timers"): each
// string argument, and each string reached from a table argument (keys
// and values, nested tables walked once each), at its length plus the
// string header; each table at a fixed header plus one hash node per
// entry; strings held directly as upvalues by the callback or by a
// function argument (a captured request body). Tables reached through
// upvalues are not walked: they are usually module state, alive anyway.
constexpr size_t kStringHeader = 24;    // LuaJIT's GCstr, 64-bit
constexpr size_t kTableHeader = 64;     // GCtab
constexpr size_t kEntry = 24;           // Node: key, value, next

struct ParkedSize {
    lua_State *L;
    int        seen;       // table: tables already queued
    int        queue;      // array: tables still to walk
    int        queued = 0;
    size_t     total = 0;

    void add(int idx)
    {
        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
            total += lua_objlen(L, idx) + kStringHeader;
            break;
        case LUA_TTABLE:
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
            total += kTableHeader;
            break;
        case LUA_TFUNCTION:
            for (int i = 1; lua_getupvalue(L, idx, i); i++) {
                if (lua_type(L, -1) == LUA_TSTRING) {
                    total += lua_objlen(L, -1) + kStringHeader;
                }
                lua_pop(L, 1);
            }
            break;
        default:
            break;
        }
    }
};

// Measures the values at stack slots [from, to], stopping once past
// `limit` (the caller refuses then) or past the run's CPU budget (the
// budget's hook ends the run when we return to Lua).
size_t parkedSize(lua_State *L, int from, int to, size_t limit)
{
    lua_newtable(L);
    lua_newtable(L);
    ParkedSize ps{L, lua_gettop(L) - 1, lua_gettop(L)};
    for (int i = from; i <= to && ps.total <= limit; i++) {
        ps.add(i);
    }
    budget::Guard &guard = budget::Guard::instance();
    size_t steps = 0;
    for (int next = 1; next <= ps.queued && ps.total <= limit; next++) {
        lua_rawgeti(L, ps.queue, next);
        int t = lua_gettop(L);
        lua_pushnil(L);
        while (lua_next(L, t) != 0) {
            ps.total += kEntry;
            ps.add(t + 1);
            ps.add(t + 2);
            lua_pop(L, 1);
            if (ps.total > limit
                || (++steps % 1024 == 0 && guard.overdue()))
            {
                lua_pop(L, 1);
                next = ps.queued;
                break;
            }
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 2);
    return ps.total;
}

int create(lua_State *L, bool every)
{
    glue::checkPhase(L, mask(Phase::InitWorker, Phase::Set,
                             Phase::ServerRewrite, Phase::Rewrite,
                             Phase::Access, Phase::Content, Phase::Log,
                             Phase::HeaderFilter, Phase::BodyFilter,
                             Phase::Timer));
    sandbox::require(L, sandbox::Capability::Timer);
    lua_Number delay = luaL_checknumber(L, 1);
    if (every && delay <= 0) {
        return luaL_error(L, "delay cannot be zero");
    }
    if (delay < 0) {
        delay = 0;  // as lua-nginx-module: a past deadline fires at once
    }
    if (lua_type(L, 2) != LUA_TFUNCTION) {
        return luaL_argerror(L, 2, "Lua function expected");
    }
    if (ngx_exiting || ngx_quit || ngx_terminate) {
        lua_pushnil(L);
        lua_pushliteral(L, "process exiting");
        return 2;
    }
    if (glue::timersPending() >= mainConf()->max_pending_timers) {
        lua_pushnil(L);
        lua_pushliteral(L, "too many pending timers");
        return 2;
    }

    int n = lua_gettop(L) - 1;         // the callback and its arguments
    RequestCtx *creator = g_run ? g_run->ctx : nullptr;
    size_t left = glue::timerMemoryLeft(creator);
    size_t bytes = kTableHeader + sizeof(lua_Number) * (n + 1)
                   + parkedSize(L, 2, n + 1, left);
    lua_createtable(L, n, 1);
    for (int i = 1; i <= n; i++) {
        lua_pushvalue(L, i + 1);
        lua_rawseti(L, -2, i);
    }
    lua_pushinteger(L, n);
    lua_setfield(L, -2, "n");
    int ref = luaL_ref(L, LUA_REGISTRYINDEX);
    auto ms = static_cast<ngx_msec_t>(delay * 1000 + 0.5);
    switch (glue::addTimer(L, ref, ms, every, creator, bytes)) {
    case glue::TimerAdd::Ok:
        break;
    case glue::TimerAdd::TooMany:
        lua_pushnil(L);
        lua_pushliteral(L, "too many pending timers");
        return 2;
    case glue::TimerAdd::TooMuchMemory:
        lua_pushnil(L);
        lua_pushliteral(L, "not enough memory (luaguard: "
                           "lua_timer_memory_per_location exceeded by the "
                           "timer's arguments)");
        return 2;
    case glue::TimerAdd::NoMemory:
        return luaL_error(L, "no memory");
    }
    lua_pushinteger(L, 1);
    return 1;
}

int at(lua_State *L)
{
    return create(L, false);
}

int every(lua_State *L)
{
    return create(L, true);
}

int runningCount(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(glue::timersRunning()));
    return 1;
}

int pendingCount(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(glue::timersPending()));
    return 1;
}

}  // namespace

void openTimer(lua_State *L)
{
    subTable(L, "timer");
    const luaL_Reg fns[] = {{"at", at},
                            {"every", every},
                            {"running_count", runningCount},
                            {"pending_count", pendingCount},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
    lua_pop(L, 1);
}

}  // namespace luaguard::api
