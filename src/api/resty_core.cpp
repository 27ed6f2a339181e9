// The lua-resty-core module names (resty.core.*, ngx.req, ngx.resp,
// ngx.errlog, ngx.pipe): their Lua is lua/resty_core.lua, embedded by the
// build; these are the few C helpers it needs.

#include <string>

#include "api/api.hpp"
#include "ngx/glue.hpp"
#include "security/log_escape.hpp"
#include "security/sandbox.hpp"

namespace luaguard {
namespace api {

namespace {

// resty.core.base.get_request: an opaque handle of the running request
// (nginx's request, or a timer's fake one), nil outside one. In
// init_worker and exit_worker lua-nginx-module has a placeholder request:
// a handle too.
char kPlaceholder;

int request(lua_State *L)
{
    Run *run = g_run;
    if (run == nullptr || run->phase == Phase::Init
        || run->phase == Phase::None)
    {
        lua_pushnil(L);
    } else if (run->ctx == nullptr) {
        lua_pushlightuserdata(L, &kPlaceholder);
    } else {
        lua_pushlightuserdata(L, run->ctx->r);
    }
    return 1;
}

// FFI buffers are raw memory: only for code whose location may use ffi.
int needFfi(lua_State *L)
{
    sandbox::require(L, sandbox::Capability::Ffi);
    return 0;
}

// Request code of an isolating profile is running.
int inRequest(lua_State *L)
{
    const sandbox::Policy *p = sandbox::currentPolicy();
    lua_pushboolean(L, g_run != nullptr && g_run->ctx != nullptr
                       && p != nullptr && p->isolate);
    return 1;
}

int monotonicMsec(lua_State *L)
{
    lua_pushnumber(L, static_cast<lua_Number>(ngx_current_msec));
    return 1;
}

int sysFilterLevel(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(currentLog()->log_level));
    return 1;
}

// ngx.errlog.raw_log: the message as it is, without ngx.log's
// "[lua] file:line:" prefix; control bytes escaped as in every log line.
int rawLog(lua_State *L)
{
    lua_Integer level = luaL_checkinteger(L, 1);
    size_t len;
    const char *msg = luaL_checklstring(L, 2, &len);
    if (level < NGX_LOG_STDERR || level > NGX_LOG_DEBUG) {
        lua_pushboolean(L, 0);
        return 1;
    }
    ngx_log_t *log = currentLog();
    if (log->log_level >= static_cast<ngx_uint_t>(level)) {
        std::string text;
        appendLogEscaped(text, msg, len);
        ngx_log_error(static_cast<ngx_uint_t>(level), log, 0, "%s",
                      text.c_str());
    }
    lua_pushboolean(L, 1);
    return 1;
}

int cacheEmpty(lua_State *L)
{
    lua_pushboolean(L, regexCacheEmpty());
    return 1;
}

}  // namespace

bool openRestyCore(lua_State *L, std::string *err)
{
    const luaL_Reg fns[] = {{"request", request},
                            {"need_ffi", needFfi},
                            {"in_request", inRequest},
                            {"monotonic_msec", monotonicMsec},
                            {"sys_filter_level", sysFilterLevel},
                            {"raw_log", rawLog},
                            {"regex_cache_empty", cacheEmpty},
                            {"pipe_module", openPipeModule},
                            {nullptr, nullptr}};
    lua_createtable(L, 0, 10);
    setFuncs(L, fns);
    addErrlogFuncs(L);
    addNdkFuncs(L);
    return runEmbedded(L, kLua_resty_core, kLua_resty_core_len,
                       "=luaguard.resty_core", 1, 0, err);
}

}  // namespace api
}  // namespace luaguard
