// The ngx.* API: one file per area, each adding its functions to the `ngx`
// table on top of the stack.
#pragma once

#include <string>

#include "ngx/module.hpp"
#include "runtime/embedded.hpp"
#include "runtime/lua.hpp"

namespace luaguard {
struct MainConf;
struct LocConf;
}

struct ngx_conf_s;

namespace luaguard::api {

// The lua-resty-core release whose modules (ngx.re, ngx.semaphore,
// ngx.balancer, ...) luaguard follows: their `version` field.
constexpr char kRestyCoreVersion[] = "0.1.25";

// Builds the global `ngx` table, the embedded Lua prelude and the
// per-request environment machinery. False with *err on failure.
bool open(Vm *vm, std::string *err);

// Each takes the `ngx` table at stack top and leaves it there.
void openCore(lua_State *L);
// After openCore and openVar: their __index through the FFI
// (lua/index_ffi.lua).
bool openFastIndex(lua_State *L, Vm *vm, std::string *err);
void openOutput(lua_State *L);
void openTime(lua_State *L);
void openVar(lua_State *L);
void openHeader(lua_State *L);
void openBudget(lua_State *L);
void openThread(lua_State *L);
void openTimer(lua_State *L);
void openSemaphore(lua_State *L);
void openProcess(lua_State *L);
void openBalancer(lua_State *L);
void openSsl(lua_State *L);
void openSslSession(lua_State *L);
void openSslClientHello(lua_State *L);

// The PEM text at `idx`: a string as it is, or an ngx.ssl object
// (parse_pem_cert's chain, or with `key` parse_pem_priv_key's key); false
// when it is none of them.
bool sslPemArg(lua_State *L, int idx, bool key, std::string *out);
void openWorkerPids(lua_State *L);

// Idle connections in this worker's cosocket pools, for metrics.
ngx_uint_t socketPoolIdle();

// package.preload["luaguard.metrics"] (api/metrics.cpp).
void openMetrics(lua_State *L);
// package.preload["ngx.ocsp"] (api/ocsp.cpp).
void openOcsp(lua_State *L);
// ngx.shared's metatable; its hot methods from lua/shdict_ffi.lua.
bool openShared(lua_State *L, std::string *err);

// Fills ngx.shared with the configuration's lua_shared_dict zones
// (postconfiguration: the VM may exist before the directives are read).
void bindSharedDicts(lua_State *L, MainConf *mcf);
void openReq(lua_State *L);
// ngx.resp, then lua/req_ffi.lua over ngx.req's and ngx.resp's tables
// (after openReq).
bool openResp(lua_State *L, std::string *err);
void openUtil(lua_State *L);

// ngx.run_worker_thread (api/worker_thread.cpp), and the globals of a new
// VM it runs functions in, for calls from `caller`'s VM. False with *err.
void openWorkerThread(lua_State *L);
bool openThreadVm(lua_State *L, lua_State *caller, std::string *err);
// ngx.re; match, find, gmatch, sub, gsub and split from lua/regex_ffi.lua.
bool openRegex(lua_State *L, std::string *err);

// Whether the compile-once regex cache holds no pattern (api/regex.cpp).
bool regexCacheEmpty();

// The lua-resty-core module names (lua/resty_core.lua, api/resty_core.cpp).
// Runs after the prelude, before the sandbox is installed.
bool openRestyCore(lua_State *L, std::string *err);
// require "ngx.pipe" (api/pipe.cpp): pushes the module table.
int openPipeModule(lua_State *L);
// At worker exit: every ngx.pipe command killed and reaped, its pipes
// closed.
void closePipes();
// ngx.errlog's C helpers into the table on top of the stack; L is the
// VM's main state (api/errlog.cpp).
void addErrlogFuncs(lua_State *L);
// ndk.set_var's C helpers, the same way (api/ndk.cpp).
void addNdkFuncs(lua_State *L);
// lua_capture_error_log: hooks this worker's error_log chains
// (init_process, before init_worker_by_lua).
void installErrlogCapture(ngx_cycle_t *cycle, MainConf *mcf);
void openLocation(lua_State *L);
void openSocketTcp(lua_State *L);
void openSocketUdp(lua_State *L);

// lua_ssl_* of a location merged: builds (or shares) its TLS client
// context while the master can still read the trusted certificates.
char *mergeSocketSsl(ngx_conf_s *cf, LocConf *prev, LocConf *conf);

// Last: placeholders raising "not implemented" for APIs still missing.
void openPending(lua_State *L);

// The phase check of an API that needs a request: `noreq` is raised in
// init_by_lua (no request at all). With `placeholder`, where
// lua-nginx-module has only a placeholder request (init_worker,
// exit_worker, timers) the error is "API disabled in the current context",
// as its ngx.var, ngx.header and ngx.status say; otherwise it is
// glue::checkPhase's error.
Run *requestPhase(lua_State *L, PhaseMask allowed,
                  const char *noreq = "no request found",
                  bool placeholder = true);

// Pushes the text ngx.print would write for the value at `idx` (array
// tables flattened), raising ngx.print's errors naming `fname`.
void pushPrintable(lua_State *L, int idx, const char *fname);

// Charges `bytes` the API is about to allocate outside the Lua VM for the
// running request (`what`: "ngx.var", "ngx.header", ...) to its
// lua_budget_memory. When that would exceed it, nothing is allocated and
// the request is stopped by the budget (status, log line and counters of
// a lua_budget_memory stop): the error raised here ends the script, or the
// hook does at its next instruction if a pcall caught it (api/budget.cpp).
void chargeMemory(lua_State *L, size_t bytes, const char *what);

// The same stop for memory refused where no Lua run of `ctx` is in
// progress (a socket read completing in an event handler): its next run
// is stopped as soon as it is entered.
void refuseMemory(RequestCtx *ctx, const char *what);

// The prelude's budget probe (lua/prelude.lua): true while the running
// code is being stopped by a budget.
int budgetStopping(lua_State *L);

// Raises lua-nginx-module's error for the control byte at `bad` in a URI:
// unsafe byte "0xNN" in <what> "<uri, escaped>"<hint>.
int unsafeUriError(lua_State *L, const char *uri, size_t len, size_t bad,
                   const char *what, const char *hint = "");

// Registers functions `fns` into the table at the top of the stack.
void setFuncs(lua_State *L, const luaL_Reg *fns);

// Pushes nil and `err`, the failure shape of lua-nginx-module's API.
int pushNilErr(lua_State *L, const char *err);

// package.preload[name] = open: the module `require(name)` returns.
void preload(lua_State *L, const char *name, lua_CFunction open);

// A lua-resty-core module's table (ngx.ssl, ngx.ocsp, ...): the functions
// and its `version`; left on the stack.
void pushRestyModule(lua_State *L, const luaL_Reg *fns);

// Gets (creating when absent) the sub-table ngx.<name>; leaves it on top.
void subTable(lua_State *L, const char *name);

// The string form lua-nginx-module's output and logging functions give a
// value: strings and numbers as Lua prints them, nil, booleans and
// ngx.null by name. Returns false for other types.
bool scalarText(lua_State *L, int idx, const char **s, size_t *len);

}  // namespace luaguard::api
