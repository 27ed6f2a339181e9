// require "luaguard.metrics": the numbers of the lua_metrics endpoint
// (ngx/metrics.*) for Lua code. get() returns them as nested tables,
// text() as the Prometheus exposition text.

#include "api/api.hpp"
#include "ngx/metrics.hpp"

namespace luaguard::api {

namespace {

int metricsGet(lua_State *L)
{
    metrics::pushTable(L, mainConf());
    return 1;
}

int metricsText(lua_State *L)
{
    std::string text;
    try {
        text = metrics::render(mainConf());
    } catch (const std::bad_alloc &) {
        return luaL_error(L, "no memory");
    }
    lua_pushlstring(L, text.data(), text.size());
    return 1;
}

int openModule(lua_State *L)
{
    const luaL_Reg fns[] = {{"get", metricsGet},
                            {"text", metricsText},
                            {nullptr, nullptr}};
    lua_createtable(L, 0, 2);
    setFuncs(L, fns);
    return 1;
}

}  // namespace

void openMetrics(lua_State *L)
{
    preload(L, "luaguard.metrics", openModule);
}

}  // namespace luaguard::api
