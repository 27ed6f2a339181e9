// ngx.req.lua_usage(): the running request's Lua time and net allocation so
// far, for handlers that want to log or shed their own cost.

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"

namespace luaguard::api {

namespace {

int luaUsage(lua_State *L)
{
    RequestCtx *ctx = glue::requireRequest(L);
    // Includes the run in progress: its time is charged when it ends.
    uint64_t ns = budget::Guard::instance().usedNs(ctx->usage);
    lua_pushnumber(L, static_cast<lua_Number>(ns) / 1e9);
    lua_pushnumber(L, static_cast<lua_Number>(
                          ctx->usage.mem_net > 0 ? ctx->usage.mem_net : 0));
    return 2;
}

}  // namespace

int budgetStopping(lua_State *L)
{
    lua_pushboolean(L, budget::Guard::instance().stopping());
    return 1;
}

void chargeMemory(lua_State *L, size_t bytes, const char *what)
{
    if (!budget::Guard::instance().chargeExternal(bytes, what)) {
        metrics::countBudgetRefusal(g_run ? g_run->ctx : nullptr,
                                    metrics::BudgetRefusal::Memory);
        luaL_error(L, "not enough memory (luaguard: %s exceeded by %s)",
                   budget::kindName(budget::Kind::Memory), what);
    }
}

void refuseMemory(RequestCtx *ctx, const char *what)
{
    metrics::countBudgetRefusal(ctx, metrics::BudgetRefusal::Memory);
    budget::Guard::instance().refuse(&ctx->usage, what);
}

void openBudget(lua_State *L)
{
    subTable(L, "req");
    lua_pushcfunction(L, luaUsage);
    lua_setfield(L, -2, "lua_usage");
    lua_pop(L, 1);
}

}  // namespace luaguard::api
