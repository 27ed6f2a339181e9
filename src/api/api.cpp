#include "api/api.hpp"

#include "ngx/glue.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard::api {

bool open(Vm *vm, std::string *err)
{
    lua_State *L = vm->L();
    lua_createtable(L, 0, 160);
    openCore(L);
    openOutput(L);
    openTime(L);
    openVar(L);
    if (!openFastIndex(L, vm, err)) {
        lua_pop(L, 1);
        return false;
    }
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
    if (!openShared(L, err)) {
        return false;
    }
    openReq(L);
    if (!openResp(L, err)) {
        return false;
    }
    openUtil(L);
    openWorkerThread(L);
    if (!openRegex(L, err)) {
        return false;
    }
    openLocation(L);
    openSocketTcp(L);
    openSocketUdp(L);
    openMetrics(L);
    openOcsp(L);
    openPending(L);
    lua_setglobal(L, "ngx");

    lua_pushlightuserdata(L, &glue::kYieldSentinel);
    lua_pushcfunction(L, budgetStopping);
    if (!runEmbedded(L, kLua_prelude, kLua_prelude_len, "=luaguard.prelude",
                     2, 0, err)) {
        return false;
    }
    return openRestyCore(L, err) && sandbox::installNgx(L, err);
}

}  // namespace luaguard::api
