#include "api/api.hpp"

#include "ngx/glue.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard {

// The text of lua/prelude.lua, embedded by the build.
extern const char kPrelude[];
extern const size_t kPreludeLen;

namespace api {

bool open(lua_State *L, std::string *err)
{
    lua_createtable(L, 0, 160);
    openCore(L);
    openOutput(L);
    openTime(L);
    openVar(L);
    openHeader(L);
    openBudget(L);
    openThread(L);
    openTimer(L);
    openSemaphore(L);
    openProcess(L);
    openBalancer(L);
    openSsl(L);
    openSslSession(L);
    openSslClientHello(L);
    openWorkerPids(L);
    openShared(L);
    openReq(L);
    openResp(L);
    openUtil(L);
    openRegex(L);
    openLocation(L);
    openSocketTcp(L);
    openSocketUdp(L);
    openMetrics(L);
    openPending(L);
    lua_setglobal(L, "ngx");

    if (luaL_loadbuffer(L, kPrelude, kPreludeLen, "=luaguard.prelude") != 0) {
        *err = lua_tostring(L, -1);
        lua_pop(L, 1);
        return false;
    }
    lua_pushlightuserdata(L, &glue::kYieldSentinel);
    lua_pushcfunction(L, budgetStopping);
    if (lua_pcall(L, 2, 0, 0) != 0) {
        *err = lua_tostring(L, -1);
        lua_pop(L, 1);
        return false;
    }
    return openRestyCore(L, err) && sandbox::installNgx(L, err);
}

}  // namespace api
}  // namespace luaguard
