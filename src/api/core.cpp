// Constants, logging, ngx.ctx / ngx.status / ngx.arg, phase and worker
// information, ngx.sleep.

#include <cstring>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"

namespace luaguard::api {

namespace {

struct IntConst {
    const char *name;
    lua_Integer value;
};

const IntConst kConstants[] = {
    {"OK", NGX_OK}, {"ERROR", NGX_ERROR}, {"AGAIN", NGX_AGAIN},
    {"DONE", NGX_DONE}, {"DECLINED", NGX_DECLINED},

    {"HTTP_GET", NGX_HTTP_GET}, {"HTTP_HEAD", NGX_HTTP_HEAD},
    {"HTTP_PUT", NGX_HTTP_PUT}, {"HTTP_POST", NGX_HTTP_POST},
    {"HTTP_DELETE", NGX_HTTP_DELETE}, {"HTTP_OPTIONS", NGX_HTTP_OPTIONS},
    {"HTTP_MKCOL", NGX_HTTP_MKCOL}, {"HTTP_COPY", NGX_HTTP_COPY},
    {"HTTP_MOVE", NGX_HTTP_MOVE}, {"HTTP_PROPFIND", NGX_HTTP_PROPFIND},
    {"HTTP_PROPPATCH", NGX_HTTP_PROPPATCH}, {"HTTP_LOCK", NGX_HTTP_LOCK},
    {"HTTP_UNLOCK", NGX_HTTP_UNLOCK}, {"HTTP_PATCH", NGX_HTTP_PATCH},
    {"HTTP_TRACE", NGX_HTTP_TRACE},

    {"HTTP_CONTINUE", 100}, {"HTTP_SWITCHING_PROTOCOLS", 101},
    {"HTTP_OK", 200}, {"HTTP_CREATED", 201}, {"HTTP_ACCEPTED", 202},
    {"HTTP_NO_CONTENT", 204}, {"HTTP_PARTIAL_CONTENT", 206},
    {"HTTP_SPECIAL_RESPONSE", 300}, {"HTTP_MOVED_PERMANENTLY", 301},
    {"HTTP_MOVED_TEMPORARILY", 302}, {"HTTP_SEE_OTHER", 303},
    {"HTTP_NOT_MODIFIED", 304}, {"HTTP_TEMPORARY_REDIRECT", 307},
    {"HTTP_PERMANENT_REDIRECT", 308}, {"HTTP_BAD_REQUEST", 400},
    {"HTTP_UNAUTHORIZED", 401}, {"HTTP_PAYMENT_REQUIRED", 402},
    {"HTTP_FORBIDDEN", 403}, {"HTTP_NOT_FOUND", 404},
    {"HTTP_NOT_ALLOWED", 405}, {"HTTP_NOT_ACCEPTABLE", 406},
    {"HTTP_REQUEST_TIMEOUT", 408}, {"HTTP_CONFLICT", 409},
    {"HTTP_GONE", 410}, {"HTTP_UPGRADE_REQUIRED", 426},
    {"HTTP_TOO_MANY_REQUESTS", 429}, {"HTTP_CLOSE", 444},
    {"HTTP_ILLEGAL", 451}, {"HTTP_INTERNAL_SERVER_ERROR", 500},
    {"HTTP_METHOD_NOT_IMPLEMENTED", 501}, {"HTTP_NOT_IMPLEMENTED", 501},
    {"HTTP_BAD_GATEWAY", 502},
    {"HTTP_SERVICE_UNAVAILABLE", 503}, {"HTTP_GATEWAY_TIMEOUT", 504},
    {"HTTP_VERSION_NOT_SUPPORTED", 505}, {"HTTP_INSUFFICIENT_STORAGE", 507},

    {"STDERR", NGX_LOG_STDERR}, {"EMERG", NGX_LOG_EMERG},
    {"ALERT", NGX_LOG_ALERT}, {"CRIT", NGX_LOG_CRIT}, {"ERR", NGX_LOG_ERR},
    {"WARN", NGX_LOG_WARN}, {"NOTICE", NGX_LOG_NOTICE},
    {"INFO", NGX_LOG_INFO}, {"DEBUG", NGX_LOG_DEBUG},
};

// Concatenates the arguments from `first` on, as ngx.log and print do.
void concatArgs(lua_State *L, int first, const char *fname, luaL_Buffer *b)
{
    int n = lua_gettop(L);
    for (int i = first; i <= n; i++) {
        const char *s;
        size_t len;
        if (scalarText(L, i, &s, &len)) {
            luaL_addlstring(b, s, len);
            continue;
        }
        if (luaL_callmeta(L, i, "__tostring")) {
            s = lua_tolstring(L, -1, &len);
            if (s == nullptr) {
                luaL_error(L, "'__tostring' must return a string to '%s'",
                           fname);
            }
            luaL_addvalue(b);
            continue;
        }
        // lua-nginx-module names no function in this message.
        luaL_error(L, "bad argument #%d to '?' (expected table to have "
                   "__tostring metamethod)", i - first + 1);
    }
}

int logCommon(lua_State *L, ngx_uint_t level, int first, const char *fname)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    concatArgs(L, first, fname, &b);
    luaL_pushresult(&b);
    size_t len;
    const char *msg = lua_tolstring(L, -1, &len);
    glue::logFromLua(L, level, msg, len, 1);
    return 0;
}

int ngxLog(lua_State *L)
{
    lua_Integer level = luaL_checkinteger(L, 1);
    if (level < NGX_LOG_STDERR || level > NGX_LOG_DEBUG) {
        return luaL_error(L, "bad log level: %d", static_cast<int>(level));
    }
    return logCommon(L, static_cast<ngx_uint_t>(level), 2, "log");
}

int luaPrint(lua_State *L)
{
    return logCommon(L, NGX_LOG_NOTICE, 1, "print");
}

int getPhase(lua_State *L)
{
    Phase p = g_run ? g_run->phase : Phase::None;
    lua_pushstring(L, phaseName(p));
    return 1;
}

int ngxSleep(lua_State *L)
{
    requestPhase(L, kYieldable, "no request found", false);
    lua_Number sec = luaL_checknumber(L, 1);
    if (sec < 0) {
        return luaL_error(L, "invalid sleep duration \"%f\"", sec);
    }
    LuaThread *t = threads::current();
    if (t == nullptr) {
        return luaL_error(L, "no request found");
    }
    glue::checkYieldable(L);   // before the timer is armed
    auto ms = static_cast<ngx_msec_t>(sec * 1000 + 0.5);
    if (ms == 0) {
        // Still a real yield: other requests run before this one goes on.
        threads::post(t);
    } else {
        threads::wakeAfter(t, ms);
    }
    return glue::yield(L);
}

// ---- ngx.ctx, ngx.status and the other computed fields of `ngx` ----

void pushCtxTable(lua_State *L, RequestCtx *ctx)
{
    if (ctx->ctx_cell == 0) {
        lua_newtable(L);
        lua_pushvalue(L, -1);
        ctx->ctx_cell = ctx->vm->hold(L);
        return;
    }
    ctx->vm->pushHeld(L, ctx->ctx_cell);
}

// ngx.ctx in init_worker_by_lua and exit_worker_by_lua: lua-nginx-module
// gives these a table of their own (its placeholder request's).
void pushWorkerCtx(lua_State *L, Phase phase)
{
    const char *key = phase == Phase::InitWorker ? "luaguard.init_worker_ctx"
                                                 : "luaguard.exit_worker_ctx";
    lua_getfield(L, LUA_REGISTRYINDEX, key);
    if (lua_istable(L, -1)) {
        return;
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, key);
}

// Whether the key (lua_tolstring's text and length) is `name`: the length
// settles most keys without touching their bytes, and a key with a NUL
// inside ("ctx\0x") is not "ctx".
template <size_t N>
bool keyIs(const char *key, size_t len, const char (&name)[N])
{
    return len == N - 1 && std::memcmp(key, name, N - 1) == 0;
}

// ngx's __index, with the real ngx as upvalue 1.
int ngxIndex(lua_State *L)
{
    size_t len;
    const char *key = lua_type(L, 2) == LUA_TSTRING
                          ? lua_tolstring(L, 2, &len) : nullptr;
    if (key == nullptr) {
        lua_pushvalue(L, 2);
        lua_rawget(L, lua_upvalueindex(1));
        return 1;
    }
    // ngx.ctx is by far the most read: it comes first.
    if (keyIs(key, len, "ctx")) {
        Run *run = g_run;
        if (run && run->ctx == nullptr
            && (run->phase == Phase::InitWorker
                || run->phase == Phase::ExitWorker))
        {
            pushWorkerCtx(L, run->phase);
            return 1;
        }
        RequestCtx *ctx = glue::requireRequest(L);
        pushCtxTable(L, ctx);
        return 1;
    }
    if (keyIs(key, len, "status")) {
        requestPhase(L, kRequest);
        RequestCtx *ctx = glue::requireRequest(L);
        ngx_http_request_t *r = ctx->r;
        lua_pushinteger(L, static_cast<lua_Integer>(
                               r->err_status ? r->err_status
                                             : r->headers_out.status));
        return 1;
    }
    if (keyIs(key, len, "headers_sent")) {
        requestPhase(L, kRequest);
        RequestCtx *ctx = glue::requireRequest(L);
        lua_pushboolean(L, ctx->r->header_sent || ctx->buffering);
        return 1;
    }
    if (keyIs(key, len, "is_subrequest")) {
        requestPhase(L, kRequest);
        RequestCtx *ctx = glue::requireRequest(L);
        lua_pushboolean(L, ctx->r != ctx->r->main);
        return 1;
    }
    // Called for a view's copy of ngx too (lua/sandbox.lua): the real
    // table's fields that the copy lacks.
    lua_pushvalue(L, 2);
    lua_rawget(L, lua_upvalueindex(1));
    return 1;
}

int ngxNewIndex(lua_State *L)
{
    size_t len = 0;
    // Not lua_tolstring on any key: it would turn a number key into a
    // string one before the rawset below.
    const char *key = lua_type(L, 2) == LUA_TSTRING
                          ? lua_tolstring(L, 2, &len) : nullptr;
    if (key && keyIs(key, len, "ctx")) {
        RequestCtx *ctx = glue::requireRequest(L);
        if (!lua_istable(L, 3)) {
            return luaL_error(L, "ctx should be a table while getting a %s "
                              "value", luaL_typename(L, 3));
        }
        lua_pushvalue(L, 3);
        if (ctx->ctx_cell == 0) {
            ctx->ctx_cell = ctx->vm->hold(L);
        } else {
            ctx->vm->setHeld(L, ctx->ctx_cell);
        }
        return 0;
    }
    if (key && keyIs(key, len, "status")) {
        // Allowed in body_filter and log too, where it only logs that the
        // headers are gone, as lua-nginx-module does.
        requestPhase(L, kRequest);
        RequestCtx *ctx = glue::requireRequest(L);
        ngx_http_request_t *r = ctx->r;
        if (r->header_sent) {
            ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                          "attempt to set ngx.status after sending out "
                          "response headers");
            return 0;
        }
        lua_Integer status = luaL_checkinteger(L, 3);
        if (status < 100 || status > 999) {
            return luaL_error(L, "invalid HTTP status code %d",
                              static_cast<int>(status));
        }
        // A 1xx is an interim response: a client that gets one as the
        // status of this response skips it and parses the body as the
        // real response, with headers the body chose. lua-nginx-module
        // sends it (docs/compatibility.md); 600-999 stay allowed, a
        // client treats them as 5xx (RFC 9110, 15). 101 answers a request
        // that asked to switch protocols (an Upgrade header, RFC 9110
        // 7.8): that client reads the new protocol after it
        // (lua-resty-websocket's handshake).
        if (status < 200
            && !(status == 101 && r->headers_in.upgrade != nullptr
                 && r->http_version == NGX_HTTP_VERSION_11))
        {
            return luaL_error(L, "invalid HTTP status code %d (a 1xx status "
                              "is not a final response)",
                              static_cast<int>(status));
        }
        r->headers_out.status = static_cast<ngx_uint_t>(status);
        r->headers_out.status_line.len = 0;
        return 0;
    }
    lua_rawset(L, 1);
    return 0;
}

// ---- ngx.arg: set_by_lua parameters, or body_filter_by_lua's data ----

int argIndex(lua_State *L)
{
    Run *run = g_run;
    Phase p = run ? run->phase : Phase::None;
    if (p == Phase::BodyFilter) {
        RequestCtx *ctx = run->ctx;
        lua_Integer i = luaL_checkinteger(L, 2);
        if (i == 1) {
            glue::pushFilterData(L, ctx);
            return 1;
        }
        if (i == 2) {
            lua_pushboolean(L, glue::filterEof(ctx));
            return 1;
        }
        return 0;
    }
    if (p == Phase::Set) {
        lua_getfield(L, LUA_REGISTRYINDEX, "luaguard.set_args");
        if (lua_istable(L, -1)) {
            lua_pushvalue(L, 2);
            lua_gettable(L, -2);
            return 1;
        }
        return 0;
    }
    // Elsewhere ngx.arg means nothing: lua-nginx-module refuses the read.
    if (p == Phase::Init || p == Phase::None) {
        return luaL_error(L, "no request found");
    }
    return luaL_error(L, "API disabled in the current context");
}

int argNewIndex(lua_State *L)
{
    Run *run = glue::checkPhase(L, mask(Phase::BodyFilter));
    RequestCtx *ctx = run->ctx;
    lua_Integer i = luaL_checkinteger(L, 2);
    if (i == 1) {
        size_t len = 0;
        const char *data = "";
        switch (lua_type(L, 3)) {
        case LUA_TNIL:
            break;
        case LUA_TSTRING:
        case LUA_TNUMBER:
            data = lua_tolstring(L, 3, &len);
            break;
        case LUA_TTABLE:
            // Flattened like ngx.print's argument.
            pushPrintable(L, 3, "?");
            data = lua_tolstring(L, -1, &len);
            break;
        default:
            return luaL_error(L, "bad chunk data type: %s",
                              luaL_typename(L, 3));
        }
        if (!glue::replaceFilterData(ctx, data, len)) {
            return luaL_error(L, "no memory");
        }
        return 0;
    }
    if (i == 2) {
        if (lua_toboolean(L, 3)) {
            ctx->filter_eof = true;
        }
        return 0;
    }
    return luaL_error(L, "bad index: %d", static_cast<int>(i));
}

// ---- ngx.config / ngx.worker ----

int configPrefix(lua_State *L)
{
    lua_pushlstring(L, reinterpret_cast<const char *>(ngx_cycle->prefix.data),
                    ngx_cycle->prefix.len);
    return 1;
}

int configConfigure(lua_State *L)
{
    lua_pushstring(L, NGX_CONFIGURE);
    return 1;
}

int workerPid(lua_State *L)
{
    lua_pushinteger(L, static_cast<lua_Integer>(ngx_pid));
    return 1;
}

int workerId(lua_State *L)
{
    if (ngx_process != NGX_PROCESS_WORKER && ngx_process != NGX_PROCESS_SINGLE)
    {
        lua_pushnil(L);
        return 1;
    }
    lua_pushinteger(L, static_cast<lua_Integer>(ngx_worker));
    return 1;
}

int workerCount(lua_State *L)
{
    if (g_run && g_run->phase == Phase::Init && configCycle()) {
        // init_by_lua: ngx_cycle is the previous cycle (at first start a
        // placeholder without configuration); the count is the one being
        // configured, as in lua-nginx-module.
        auto *ccf = reinterpret_cast<ngx_core_conf_t *>(
            ngx_get_conf(configCycle()->conf_ctx, ngx_core_module));
        ngx_int_t n = ccf ? ccf->worker_processes : NGX_CONF_UNSET;
        if (n == NGX_CONF_UNSET || (ccf && ccf->master == 0)) {
            n = 1;   // nginx's default, or no workers but the master
        }
        lua_pushinteger(L, static_cast<lua_Integer>(n));
        return 1;
    }
    auto *ccf = reinterpret_cast<ngx_core_conf_t *>(
        ngx_get_conf(ngx_cycle->conf_ctx, ngx_core_module));
    lua_pushinteger(L, static_cast<lua_Integer>(
                           ngx_process == NGX_PROCESS_SINGLE
                               ? 1 : ccf->worker_processes));
    return 1;
}

int workerExiting(lua_State *L)
{
    lua_pushboolean(L, ngx_exiting || ngx_quit || ngx_terminate);
    return 1;
}

// APIs of lua-nginx-module that luaguard does not provide yet: using one
// raises an error naming it instead of a confusing "attempt to call nil".
const char *const kPending[] = {
    "get_now_ts", "worker_thread"};

int pendingIndex(lua_State *L)
{
    lua_getmetatable(L, 1);
    lua_getfield(L, -1, "__name");
    return luaL_error(L, "%s.%s is not implemented in luaguard yet",
                      lua_tostring(L, -1), luaL_optstring(L, 2, "?"));
}

int pendingCall(lua_State *L)
{
    lua_getmetatable(L, 1);
    lua_getfield(L, -1, "__name");
    return luaL_error(L, "%s() is not implemented in luaguard yet",
                      lua_tostring(L, -1));
}

void addPending(lua_State *L)
{
    for (const char *name : kPending) {
        lua_getfield(L, -1, name);
        bool present = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (present) {
            continue;
        }
        lua_newtable(L);
        lua_createtable(L, 0, 3);
        lua_pushfstring(L, "ngx.%s", name);
        lua_setfield(L, -2, "__name");
        lua_pushcfunction(L, pendingIndex);
        lua_setfield(L, -2, "__index");
        lua_pushcfunction(L, pendingCall);
        lua_setfield(L, -2, "__call");
        lua_setmetatable(L, -2);
        lua_setfield(L, -2, name);
    }
}

}  // namespace

Run *requestPhase(lua_State *L, PhaseMask allowed, const char *noreq,
                  bool placeholder)
{
    Run *run = g_run;
    if (run == nullptr || run->phase == Phase::Init
        || run->phase == Phase::None)
    {
        luaL_error(L, "%s", noreq);
    }
    bool fake = run->ctx == nullptr || (mask(run->phase) & kPlaceholder);
    if (placeholder && fake && !(mask(run->phase) & allowed)) {
        luaL_error(L, "API disabled in the current context");
    }
    return glue::checkPhase(L, allowed);
}

int pushNilErr(lua_State *L, const char *err)
{
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

void setFuncs(lua_State *L, const luaL_Reg *fns)
{
    for (; fns->name; fns++) {
        lua_pushcfunction(L, fns->func);
        lua_setfield(L, -2, fns->name);
    }
}

void preload(lua_State *L, const char *name, lua_CFunction open)
{
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "preload");
    lua_pushcfunction(L, open);
    lua_setfield(L, -2, name);
    lua_pop(L, 2);
}

void pushRestyModule(lua_State *L, const luaL_Reg *fns)
{
    lua_createtable(L, 0, 8);
    setFuncs(L, fns);
    lua_pushstring(L, kRestyCoreVersion);
    lua_setfield(L, -2, "version");
}

void subTable(lua_State *L, const char *name)
{
    lua_getfield(L, -1, name);
    if (lua_istable(L, -1)) {
        return;
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, -1);
    lua_setfield(L, -3, name);
}

bool scalarText(lua_State *L, int idx, const char **s, size_t *len)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
    case LUA_TNUMBER:
        *s = lua_tolstring(L, idx, len);
        return true;
    case LUA_TNIL:
        *s = "nil";
        *len = 3;
        return true;
    case LUA_TBOOLEAN:
        *s = lua_toboolean(L, idx) ? "true" : "false";
        *len = std::strlen(*s);
        return true;
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == nullptr) {
            *s = "null";
            *len = 4;
            return true;
        }
        return false;
    default:
        return false;
    }
}

void openCore(lua_State *L)
{
    for (const auto &c : kConstants) {
        lua_pushinteger(L, c.value);
        lua_setfield(L, -2, c.name);
    }
    lua_pushlightuserdata(L, nullptr);
    lua_setfield(L, -2, "null");

    const luaL_Reg fns[] = {{"log", ngxLog},
                            {"get_phase", getPhase},
                            {"sleep", ngxSleep},
                            {nullptr, nullptr}};
    setFuncs(L, fns);

    lua_pushcfunction(L, luaPrint);
    lua_setglobal(L, "print");

    // ngx.arg
    lua_newtable(L);
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, argIndex);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, argNewIndex);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, -2);
    lua_setfield(L, -2, "arg");

    subTable(L, "config");
    lua_pushstring(L, "http");
    lua_setfield(L, -2, "subsystem");
#if (NGX_DEBUG)
    lua_pushboolean(L, 1);
#else
    lua_pushboolean(L, 0);
#endif
    lua_setfield(L, -2, "debug");
    lua_pushinteger(L, nginx_version);
    lua_setfield(L, -2, "nginx_version");
    // The lua-nginx-module release whose API we follow (0.10.23).
    lua_pushinteger(L, 10023);
    lua_setfield(L, -2, "ngx_lua_version");
    const luaL_Reg config[] = {{"prefix", configPrefix},
                               {"nginx_configure", configConfigure},
                               {nullptr, nullptr}};
    setFuncs(L, config);
    lua_pop(L, 1);

    subTable(L, "worker");
    const luaL_Reg worker[] = {{"pid", workerPid},
                               {"id", workerId},
                               {"count", workerCount},
                               {"exiting", workerExiting},
                               {nullptr, nullptr}};
    setFuncs(L, worker);
    lua_pop(L, 1);

    // Computed fields: ngx.ctx, ngx.status, ngx.headers_sent,
    // ngx.is_subrequest.
    lua_createtable(L, 0, 2);
    lua_pushvalue(L, -2);
    lua_pushcclosure(L, ngxIndex, 1);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, ngxNewIndex);
    lua_setfield(L, -2, "__newindex");
    lua_setmetatable(L, -2);
}

bool openFastIndex(lua_State *L, Vm *vm, std::string *err)
{
    int ngx = lua_gettop(L);
    lua_getmetatable(L, ngx);
    lua_getfield(L, ngx, "var");
    lua_getmetatable(L, -1);
    lua_remove(L, -2);
    int ngx_mt = ngx + 1, var_mt = ngx + 2;
    lua_pushstring(L, kIndexCdef);
    lua_getfield(L, ngx_mt, "__index");
    lua_getfield(L, var_mt, "__index");
    vm->pushCells(L);
    lua_pushlightuserdata(L, const_cast<void *>(vm->cells()));
    if (!runEmbedded(L, kLua_index_ffi, kLua_index_ffi_len,
                     "=luaguard.index", 5, 2, err)) {
        lua_settop(L, ngx);
        return false;
    }
    lua_setfield(L, var_mt, "__index");
    lua_setfield(L, ngx_mt, "__index");
    lua_settop(L, ngx);
    return true;
}

void openPending(lua_State *L)
{
    addPending(L);
}

}  // namespace luaguard::api

int luaguard_ctx_cell(const void *vm)
{
    using luaguard::g_run;
    if (g_run == nullptr || g_run->ctx == nullptr
        || g_run->ctx->vm->cells() != vm)
    {
        return 0;
    }
    return g_run->ctx->ctx_cell;
}
