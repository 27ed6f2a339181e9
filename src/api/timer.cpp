// ngx.timer.at / every / running_count / pending_count: the arguments;
// the driver that arms and runs timers is ngx/timers.cpp.

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "security/timer_budget.hpp"

namespace luaguard::api {

namespace {

bool overdue()
{
    return budget::Guard::instance().overdue();
}

int create(lua_State *L, bool every)
{
    glue::checkPhase(L, mask(Phase::InitWorker, Phase::Set,
                             Phase::ServerRewrite, Phase::Rewrite,
                             Phase::Access, Phase::Content, Phase::Log,
                             Phase::HeaderFilter, Phase::BodyFilter,
                             Phase::Timer, Phase::Balancer,
                             Phase::SslCert, Phase::SslSessionFetch,
                             Phase::SslSessionStore,
                             Phase::SslClientHello));
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
    // The coroutine whose stack holds them until the timer fires, and
    // what they keep alive (lua_timer_memory_per_location, docs/budgets.md
    // "Timers"); not measured where nothing caps it.
    size_t bytes = 0;
    if (left != SIZE_MAX) {
        bytes = budget::kParkedThread
                + budget::kParkedSlot * static_cast<size_t>(n)
                + budget::parkedSize(L, 2, n + 1, left, overdue);
    }
    auto ms = static_cast<ngx_msec_t>(delay * 1000 + 0.5);
    switch (glue::addTimer(L, n, ms, every, creator, bytes)) {
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
