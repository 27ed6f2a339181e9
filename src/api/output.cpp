// ngx.say, ngx.print, ngx.flush, ngx.eof, ngx.send_headers, and the
// request-ending calls ngx.exit, ngx.exec and ngx.redirect.

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "api/api.hpp"
#include "ngx/entry.hpp"
#include "ngx/balancer.hpp"
#include "ngx/glue.hpp"
#include "ngx/subrequest.hpp"
#include "ngx/thread.hpp"
#include "runtime/codec.hpp"
#include "security/log_escape.hpp"
#include "security/sandbox.hpp"

namespace luaguard::api {

namespace {

// The text ngx.say and ngx.print give a scalar. lua-nginx-module writes
// negative zero as "0".
bool outputText(lua_State *L, int idx, const char **s, size_t *len)
{
    if (lua_type(L, idx) == LUA_TNUMBER && lua_tonumber(L, idx) == 0) {
        *s = "0";
        *len = 1;
        return true;
    }
    return scalarText(L, idx, s, len);
}

// Writes the text Lua gives an integral number below 1e14 in magnitude
// ("%.14g" writes those as plain digits) into buf (at least 16 bytes);
// returns its length, or 0 when `n` is not such a number. LuaJIT's own
// conversion goes through its general float formatter, ~250
// instructions for "3".
size_t integerText(lua_Number n, char *buf)
{
    if (!(n > -1e14 && n < 1e14)) {
        return 0;
    }
    auto i = static_cast<int64_t>(n);
    if (static_cast<lua_Number>(i) != n) {
        return 0;
    }
    char tmp[16];
    char *p = tmp + sizeof(tmp);
    uint64_t u = i < 0 ? 0 - static_cast<uint64_t>(i) : i;
    do {
        *--p = static_cast<char>('0' + u % 10);
        u /= 10;
    } while (u);
    if (i < 0) {
        *--p = '-';
    }
    size_t len = tmp + sizeof(tmp) - p;
    std::memcpy(buf, p, len);
    return len;
}

// Size of the text of argument `idx` (arrays recursively). -1 with the
// error raised for a value that cannot be printed.
size_t measure(lua_State *L, int idx, int argn, const char *fname, int depth)
{
    const char *s;
    size_t len;
    if (outputText(L, idx, &s, &len)) {
        return len;
    }
    if (lua_type(L, idx) != LUA_TTABLE) {
        luaL_error(L, "bad argument #%d to '%s' (string, number, boolean, "
                   "nil, ngx.null, or array table expected, but got %s)",
                   argn, fname, luaL_typename(L, idx));
    }
    if (depth > 100) {
        luaL_error(L, "bad argument #%d to '%s' (table nested too deeply)",
                   argn, fname);
    }
    // Only the array part counts; anything else is refused, as
    // lua-nginx-module does.
    size_t n = lua_objlen(L, idx);
    size_t total = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TNUMBER
            || lua_tonumber(L, -2) != static_cast<lua_Number>(
                   static_cast<size_t>(lua_tonumber(L, -2)))
            || lua_tonumber(L, -2) < 1 || lua_tonumber(L, -2) > n)
        {
            luaL_error(L, "bad argument #%d to '%s' (non-array table found)",
                       argn, fname);
        }
        lua_pop(L, 1);
    }
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, static_cast<int>(i));
        int top = lua_gettop(L);
        if (lua_type(L, top) == LUA_TTABLE) {
            total += measure(L, top, argn, fname, depth + 1);
        } else if (outputText(L, top, &s, &len)) {
            total += len;
        } else {
            luaL_error(L, "bad argument #%d to '%s' (bad data type %s found)",
                       argn, fname, luaL_typename(L, top));
        }
        lua_pop(L, 1);
    }
    return total;
}

u_char *copyOut(lua_State *L, int idx, u_char *p)
{
    const char *s;
    size_t len;
    if (lua_type(L, idx) != LUA_TTABLE) {
        outputText(L, idx, &s, &len);
        return ngx_cpymem(p, s, len);
    }
    size_t n = lua_objlen(L, idx);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, static_cast<int>(i));
        p = copyOut(L, lua_gettop(L), p);
        lua_pop(L, 1);
    }
    return p;
}

// init_by_lua has no request: lua-nginx-module says so before anything.
void noRequestObject(lua_State *L)
{
    if (g_run == nullptr || g_run->phase == Phase::Init) {
        luaL_error(L, "no request object found");
    }
}

}  // namespace

void pushPrintable(lua_State *L, int idx, const char *fname)
{
    idx = idx < 0 ? lua_gettop(L) + idx + 1 : idx;
    size_t size = measure(L, idx, 1, fname, 0);
    auto *buf = static_cast<u_char *>(lua_newuserdata(L, size ? size : 1));
    u_char *end = copyOut(L, idx, buf);
    lua_pushlstring(L, reinterpret_cast<char *>(buf), end - buf);
    lua_remove(L, -2);
}

namespace {

// Whether the running thread can wait here (not in an xpcall handler or
// a metamethod called from C).
bool canWait(lua_State *L, LuaThread *t)
{
    return t && lua_isyieldable(L) && (t->co == L || lua_isyieldable(t->co));
}

// What nginx allocates from the request's pool with each new output
// buffer besides its bytes, never freed before the request ends: the
// buffer and chain link, and as much again for the chunked encoding.
constexpr size_t kBufBookkeeping = 2 * (sizeof(ngx_buf_t)
                                        + sizeof(ngx_chain_t));

// Whether a new output buffer of `size` bytes is more than the budget
// allows: past lua_budget_memory, or with lua_budget_output wait past
// half of it, the other half being left to the script's Lua (a stream
// that paces itself on the client must not starve its own allocations).
bool outputOver(RequestCtx *ctx, size_t size)
{
    if (!budget::Guard::instance().fitsExternal(size + kBufBookkeeping)) {
        return true;
    }
    auto half = static_cast<size_t>(ctx->limits ? ctx->limits->memory : 0)
                / 2;
    return ctx->llcf->budget_output_wait && half
           && ctx->output_bytes + size > half;
}

enum class Room { Go, Wait, Broken };

// Output the client has not taken yet holds its buffers: a new one is
// charged to lua_budget_memory while it exists. Makes room for `size`
// bytes of output: Go when the caller may allocate, Wait when it should
// wait for the client first (lua_budget_output wait), Broken when the
// client is gone. Past the budget otherwise, the request is stopped
// (chargeMemory).
Room makeRoom(lua_State *L, RequestCtx *ctx, size_t size, const char *what,
              bool may_wait)
{
    // A response's first output has no buffers to take back.
    if (ctx->free_bufs || ctx->busy_bufs) {
        if (glue::hasFreeBuf(ctx, size)) {
            return Room::Go;
        }
        budget::Guard::releaseExternal(&ctx->usage,
                                       glue::reclaimBufs(ctx, size));
        if (glue::hasFreeBuf(ctx, size)) {
            return Room::Go;
        }
    }
    if (outputOver(ctx, size)) {
        if (ctx->r->connection->error) {
            return Room::Broken;
        }
        // Send what the socket takes now, then take back what it took:
        // what stays charged is what is still pending.
        if (!ctx->buffering) {
            glue::flush(ctx);
            budget::Guard::releaseExternal(&ctx->usage,
                                           glue::reclaimBufs(ctx, size));
            if (glue::hasFreeBuf(ctx, size)) {
                return Room::Go;
            }
        }
        // Waiting helps only when the connection holds output the client
        // can take: not HTTP/1.0 buffering, which holds all until eof, nor
        // a subrequest, whose output its parent captures.
        if (outputOver(ctx, size) && may_wait
            && ctx->llcf->budget_output_wait && !ctx->buffering
            && ctx->r == ctx->r->main && glue::outputPending(ctx)
            && canWait(L, threads::current()))
        {
            return Room::Wait;
        }
    }
    chargeMemory(L, size + kBufBookkeeping, what);
    ctx->output_bytes += size;
    return Room::Go;
}

int waitUntilSent(lua_State *L, RequestCtx *ctx, LuaThread *t);

// Emits the values at [first, last] of L's stack (ngx.say with
// `newline`); pushes ngx.print's results, or yields (may_wait) until the
// client has taken the pending output and emits them then.
int emitRange(lua_State *L, RequestCtx *ctx, int first, int last,
              bool newline, const char *fname, bool may_wait)
{
    ngx_http_request_t *r = ctx->r;
    if (ctx->eof) {
        lua_pushnil(L);
        lua_pushliteral(L, "seen eof");
        return 2;
    }

    // Each scalar's text is found once and kept for the copy below: the
    // common call prints a few strings or numbers. A table argument (or
    // more than kPieces arguments) sends the copy through copyOut.
    constexpr int kPieces = 8;
    struct Piece {
        const char *s;
        size_t len;
    } pieces[kPieces];
    char digits[kPieces][16];
    bool flat = last - first < kPieces;
    size_t size = newline ? 1 : 0;
    for (int i = first; i <= last; i++) {
        const char *s;
        size_t len;
        int type = lua_type(L, i);
        if (type == LUA_TSTRING) {
            s = lua_tolstring(L, i, &len);
        } else if (type == LUA_TNUMBER && flat
                   && (len = integerText(lua_tonumber(L, i),
                                         digits[i - first])) != 0)
        {
            s = digits[i - first];
        } else if (!outputText(L, i, &s, &len)) {
            size += measure(L, i, i - first + 1, fname, 0);
            flat = false;
            continue;
        }
        size += len;
        if (flat) {
            pieces[i - first] = {s, len};
        }
    }
    if (size == 0) {
        lua_pushinteger(L, 1);
        return 1;
    }
    if (r->header_only) {
        // HEAD: headers go out, the body does not.
        if (!r->header_sent && glue::sendHeader(ctx) == NGX_ERROR) {
            lua_pushnil(L);
            lua_pushliteral(L, "nginx output filter error");
            return 2;
        }
        lua_pushinteger(L, 1);
        return 1;
    }

    Room room = makeRoom(L, ctx, size, newline ? "ngx.say" : "ngx.print",
                         may_wait);
    if (room == Room::Broken) {
        lua_pushnil(L);
        lua_pushliteral(L, "nginx output filter error");
        return 2;
    }
    if (room == Room::Wait) {
        // The arguments wait in the registry; flushDone emits them.
        int n = last - first + 1;
        lua_createtable(L, n, 1);
        for (int i = first; i <= last; i++) {
            lua_pushvalue(L, i);
            lua_rawseti(L, -2, i - first + 1);
        }
        lua_pushinteger(L, n);
        lua_setfield(L, -2, "n");
        ctx->print_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        ctx->print_newline = newline;
        return waitUntilSent(L, ctx, threads::current());
    }
    ngx_chain_t *cl = glue::allocBuf(ctx, size);
    if (cl == nullptr) {
        return luaL_error(L, "no memory");
    }
    u_char *p = cl->buf->last;
    if (flat) {
        for (int i = 0; i <= last - first; i++) {
            p = ngx_cpymem(p, pieces[i].s, pieces[i].len);
        }
    } else {
        for (int i = first; i <= last; i++) {
            p = copyOut(L, i, p);
        }
    }
    if (newline) {
        *p++ = '\n';
    }
    cl->buf->last = p;

    ngx_int_t rc = glue::output(ctx, cl);
    if (rc == NGX_ERROR || rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        lua_pushnil(L);
        lua_pushliteral(L, "nginx output filter error");
        return 2;
    }
    lua_pushinteger(L, 1);
    return 1;
}

int emit(lua_State *L, bool newline, const char *fname)
{
    noRequestObject(L);
    Run *run = glue::checkPhase(L, kOutput);
    return emitRange(L, run->ctx, 1, lua_gettop(L), newline, fname, true);
}

int ngxSay(lua_State *L)
{
    // lua-nginx-module's messages name no function: "to '?'".
    return emit(L, true, "?");
}

int ngxPrint(lua_State *L)
{
    return emit(L, false, "?");
}

void releasePrint(RequestCtx *ctx)
{
    if (ctx->print_ref != LUA_NOREF) {
        luaL_unref(ctx->vm->L(), LUA_REGISTRYINDEX, ctx->print_ref);
        ctx->print_ref = LUA_NOREF;
    }
}

// The ngx.print that waited for the client (emitRange): emits its
// arguments now, in a run of the request (its budget charged; past it,
// the request is stopped). Pushes ngx.print's results on co.
int finishPrint(lua_State *co, RequestCtx *ctx, LuaThread *t,
                const char *err)
{
    lua_rawgeti(co, LUA_REGISTRYINDEX, ctx->print_ref);
    releasePrint(ctx);
    if (err) {
        lua_pop(co, 1);
        lua_pushnil(co);
        lua_pushstring(co, err);
        return 2;
    }
    int tbl = lua_gettop(co);
    lua_getfield(co, tbl, "n");
    int n = static_cast<int>(lua_tointeger(co, -1));
    lua_pop(co, 1);
    luaL_checkstack(co, n + 8, "too many arguments to print");
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(co, tbl, i);
    }
    int nres;
    {
        entry::Scope scope(ctx, ctx->thread_phase, t);
        // Everything pending was taken: nothing more to wait for.
        nres = emitRange(co, ctx, tbl + 1, tbl + n, ctx->print_newline,
                         "?", false);
    }
    for (int i = 0; i < nres; i++) {
        lua_pushvalue(co, lua_gettop(co) - nres + 1 + i);
        lua_replace(co, tbl + i);
    }
    lua_settop(co, tbl + nres - 1);
    return nres;
}

// Ends a synchronous ngx.flush: the waiting thread gets `ok` or nil, err.
void flushDone(RequestCtx *ctx, const char *err)
{
    LuaThread *t = ctx->flush_waiter;
    ctx->flush_waiter = nullptr;
    ctx->r->write_event_handler = ngx_http_request_empty_handler;
    if (ctx->print_ref != LUA_NOREF) {
        entry::resume(t, [ctx, t, err](lua_State *co) {
            return finishPrint(co, ctx, t, err);
        });
        return;
    }
    entry::resume(t, [err](lua_State *co) {
        if (err) {
            lua_pushnil(co);
            lua_pushstring(co, err);
            return 2;
        }
        lua_pushinteger(co, 1);
        return 1;
    });
}

void cancelFlush(LuaThread *t)
{
    t->ctx->flush_waiter = nullptr;
    t->ctx->r->write_event_handler = ngx_http_request_empty_handler;
    releasePrint(t->ctx);
}

void flushWaitHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    ngx_connection_t *c = r->connection;
    ngx_event_t *wev = c->write;
    if (ctx == nullptr || ctx->flush_waiter == nullptr) {
        return;
    }
    ctx->flush_waiter->cancel = nullptr;

    if (wev->timedout) {
        wev->timedout = 0;
        if (!wev->delayed) {
            flushDone(ctx, "timeout");
            return;
        }
        // limit_rate's pause is over (the write filter armed the timer):
        // send on, as nginx's upstream does with a delayed event.
        wev->delayed = 0;
    }
    if (ngx_http_output_filter(r, nullptr) == NGX_ERROR) {
        flushDone(ctx, "nginx output filter error");
        return;
    }
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    if (c->buffered & NGX_HTTP_LOWLEVEL_BUFFERED) {
        if (!wev->delayed) {
            ngx_add_timer(wev, clcf->send_timeout);
        }
        if (ngx_handle_write_event(wev, clcf->send_lowat) != NGX_OK) {
            flushDone(ctx, "connection broken");
            return;
        }
        ctx->flush_waiter->cancel = cancelFlush;
        return;
    }
    // Not limit_rate's timer: it ends the pause the write filter started
    // for what was just sent, and without it the next output would wait
    // for ever.
    if (wev->timer_set && !wev->delayed) {
        ngx_del_timer(wev);
    }
    flushDone(ctx, nullptr);
}

// Arms the wait of ngx.flush(true) for `t`: flushWaitHandler resumes it
// once the client took the output the connection holds.
int waitUntilSent(lua_State *L, RequestCtx *ctx, LuaThread *t)
{
    ngx_http_request_t *r = ctx->r;
    if (t == nullptr) {
        releasePrint(ctx);
        return luaL_error(L, "no request found");
    }
    ctx->flush_waiter = t;
    t->cancel = cancelFlush;
    r->write_event_handler = entry::edge<flushWaitHandler>;
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    if (!r->connection->write->timer_set) {
        ngx_add_timer(r->connection->write, clcf->send_timeout);
    }
    if (ngx_handle_write_event(r->connection->write, clcf->send_lowat)
        != NGX_OK)
    {
        cancelFlush(t);
        t->cancel = nullptr;
        lua_pushnil(L);
        lua_pushliteral(L, "connection broken");
        return 2;
    }
    return glue::yield(L);
}


int ngxFlush(lua_State *L)
{
    Run *run = requestPhase(L, kOutput, "no request found", false);
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    bool wait = lua_toboolean(L, 1);

    if (ctx->eof) {
        lua_pushnil(L);
        lua_pushliteral(L, "seen eof");
        return 2;
    }
    if (!r->header_sent && !ctx->buffering) {
        lua_pushnil(L);
        lua_pushliteral(L, "nothing to flush");
        return 2;
    }
    if (glue::flush(ctx) == NGX_ERROR) {
        lua_pushnil(L);
        lua_pushliteral(L, "nginx output filter error");
        return 2;
    }
    if (wait && glue::outputPending(ctx)) {
        // Synchronous flush: wait until the client took the data.
        return waitUntilSent(L, ctx, threads::current());
    }
    lua_pushinteger(L, 1);
    return 1;
}

int ngxEof(lua_State *L)
{
    noRequestObject(L);
    Run *run = glue::checkPhase(L, kOutput | mask(Phase::BodyFilter,
                                                  Phase::Log));
    RequestCtx *ctx = run->ctx;
    if (lua_gettop(L) != 0) {
        return luaL_error(L, "expecting zero arguments, but got %d",
                          lua_gettop(L));
    }
    // The body filter and the log phase come after the end of the
    // response, as lua-nginx-module answers there.
    if (ctx->eof || run->phase == Phase::BodyFilter
        || run->phase == Phase::Log)
    {
        lua_pushnil(L);
        lua_pushliteral(L, "seen eof");
        return 2;
    }
    ngx_int_t rc = glue::sendEof(ctx);
    if (rc == NGX_ERROR || rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        lua_pushnil(L);
        lua_pushliteral(L, "nginx output filter error");
        return 2;
    }
    lua_pushinteger(L, 1);
    return 1;
}

int sendHeaders(lua_State *L)
{
    Run *run = requestPhase(L, kOutput, "no request found", false);
    RequestCtx *ctx = run->ctx;
    if (ctx->r->header_sent) {
        // Not an error for lua-nginx-module: the headers are out.
        lua_pushinteger(L, 1);
        return 1;
    }
    ngx_int_t rc = glue::sendHeader(ctx);
    if (rc == NGX_ERROR || rc > NGX_OK) {
        lua_pushnil(L);
        lua_pushliteral(L, "nginx output filter error");
        return 2;
    }
    lua_pushinteger(L, 1);
    return 1;
}

int ngxExit(lua_State *L)
{
    Run *run = requestPhase(L, kYieldable | mask(Phase::HeaderFilter,
                                                 Phase::Balancer,
                                                 Phase::SslSessionFetch,
                                                 Phase::SslSessionStore,
                                                 Phase::SslClientHello),
                            "no request found", false);
    if (run->ctx == nullptr) {
        // Timers without a request: not supported yet.
        return luaL_error(L, "no request found");
    }
    lua_Integer status = luaL_checkinteger(L, 1);
    if (status == NGX_AGAIN || status == NGX_DONE) {
        return luaL_error(L, "bad argument to 'ngx.exit': does not accept "
                          "NGX_AGAIN or NGX_DONE");
    }
    if (run->phase == Phase::Balancer) {
        if (balancer::State *s = balancer::current()) {
            balancer::recordExit(s, static_cast<ngx_int_t>(status));
        }
        return 0;
    }
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    subreq::checkAbortable(L, ctx);

    if (run->phase == Phase::HeaderFilter && status != NGX_ERROR
        && status != NGX_OK)
    {
        // Headers are on their way: only the status line may change.
        if (status >= 200) {
            r->headers_out.status = static_cast<ngx_uint_t>(status);
        }
    }
    // Logged where lua-nginx-module logs it: a status nginx would answer
    // with a page of its own, not one that only closes the connection.
    if (r->header_sent && status >= NGX_HTTP_SPECIAL_RESPONSE
        && status != NGX_HTTP_REQUEST_TIME_OUT
        && status != NGX_HTTP_CLIENT_CLOSED_REQUEST
        && status != NGX_HTTP_CLOSE)
    {
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "attempt to set status %i via ngx.exit after sending "
                      "out the response status %ui",
                      static_cast<ngx_int_t>(status), r->headers_out.status);
    }
    return glue::exitThread(L, ctx, static_cast<ngx_int_t>(status));
}

// Copies `s` into the request pool.
bool poolCopy(ngx_http_request_t *r, const char *s, size_t len, ngx_str_t *out)
{
    out->data = static_cast<u_char *>(ngx_pnalloc(r->pool, len ? len : 1));
    if (out->data == nullptr) {
        return false;
    }
    ngx_memcpy(out->data, s, len);
    out->len = len;
    return true;
}

int ngxExec(lua_State *L)
{
    noRequestObject(L);
    Run *run = glue::checkPhase(L, mask(Phase::Rewrite, Phase::Access,
                                        Phase::Content));
    sandbox::require(L, sandbox::Capability::Exec);
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    int n = lua_gettop(L);
    if (n != 1 && n != 2) {
        return luaL_error(L, "expecting one or two arguments, but got %d", n);
    }
    size_t ulen;
    const char *uri = luaL_checklstring(L, 1, &ulen);
    if (ulen == 0) {
        return luaL_error(L, "The uri argument is empty");
    }
    subreq::checkAbortable(L, ctx);
    if (r->header_sent) {
        return luaL_error(L, "attempt to call ngx.exec after sending out "
                          "response headers");
    }

    // nginx's own check of internal redirect targets (SSI,
    // X-Accel-Redirect), as lua-nginx-module: ".." segments and NUL are
    // refused, a quoted path is decoded, the query string split off.
    ngx_str_t path;
    ngx_str_t uri_args = ngx_null_string;
    ngx_uint_t flags = 0;
    if (!poolCopy(r, uri, ulen, &path)) {
        return luaL_error(L, "no memory");
    }
    if (ngx_http_parse_unsafe_uri(r, &path, &uri_args, &flags) != NGX_OK) {
        // nginx's own line, but escaped: the path may be decoded from
        // "%0A" (NGX_HTTP_LOG_UNSAFE would write it raw).
        std::string shown;
        appendLogEscaped(shown, reinterpret_cast<const char *>(path.data),
                         path.len);
        ngx_log_error(NGX_LOG_ERR, r->connection->log, 0,
                      "unsafe URI \"%s\" was detected", shown.c_str());
        return luaL_error(L, "unsafe uri");
    }
    std::string args(reinterpret_cast<const char *>(uri_args.data),
                     uri_args.len);
    if (n == 2 && !lua_isnil(L, 2)) {
        std::string extra;
        if (lua_type(L, 2) == LUA_TSTRING) {
            extra = lua_tostring(L, 2);
        } else if (lua_type(L, 2) == LUA_TTABLE) {
            lua_getfield(L, LUA_GLOBALSINDEX, "ngx");
            lua_getfield(L, -1, "encode_args");
            lua_pushvalue(L, 2);
            lua_call(L, 1, 1);
            extra = lua_tostring(L, -1) ? lua_tostring(L, -1) : "";
            lua_pop(L, 2);
        } else {
            return luaL_error(L, "Bad args type: %s", luaL_typename(L, 2));
        }
        if (!extra.empty()) {
            args = args.empty() ? extra : args + "&" + extra;
        }
    }

    // No CR or LF may reach a request line built from this: the path
    // (decoded: "%0D" counts) is refused, the query string (from the uri
    // or the args argument) escaped as ngx.req.set_uri_args escapes a
    // string. lua-nginx-module passes both through raw
    // (docs/compatibility.md).
    if (std::memchr(path.data, '\r', path.len)
        || std::memchr(path.data, '\n', path.len))
    {
        return luaL_error(L, "unsafe uri \"%s\" arg to ngx.exec", uri);
    }
    args = codec::escapeArgsString(args.data(), args.size());
    ctx->exec_uri = path;
    if (!poolCopy(r, args.data(), args.size(), &ctx->exec_args)) {
        return luaL_error(L, "no memory");
    }
    if (ctx->exec_args.len == 0) {
        ctx->exec_args.data = nullptr;
    }
    return glue::exitThread(L, ctx);
}

int ngxRedirect(lua_State *L)
{
    noRequestObject(L);
    Run *run = glue::checkPhase(L, mask(Phase::Rewrite, Phase::Access,
                                        Phase::Content));
    sandbox::require(L, sandbox::Capability::Exec);
    RequestCtx *ctx = run->ctx;
    ngx_http_request_t *r = ctx->r;
    int n = lua_gettop(L);
    if (n != 1 && n != 2) {
        return luaL_error(L, "expecting one or two arguments");
    }
    size_t len;
    const char *uri = luaL_checklstring(L, 1, &len);
    lua_Integer status = n == 2 ? luaL_checkinteger(L, 2)
                                : NGX_HTTP_MOVED_TEMPORARILY;
    if (status != NGX_HTTP_MOVED_TEMPORARILY
        && status != NGX_HTTP_MOVED_PERMANENTLY
        && status != NGX_HTTP_SEE_OTHER
        && status != NGX_HTTP_PERMANENT_REDIRECT
        && status != NGX_HTTP_TEMPORARY_REDIRECT)
    {
        return luaL_error(L, "only ngx.HTTP_MOVED_TEMPORARILY, "
                          "ngx.HTTP_MOVED_PERMANENTLY, "
                          "ngx.HTTP_PERMANENT_REDIRECT, ngx.HTTP_SEE_OTHER, "
                          "and ngx.HTTP_TEMPORARY_REDIRECT are allowed");
    }
    subreq::checkAbortable(L, ctx);
    if (r->header_sent) {
        return luaL_error(L, "attempt to call ngx.redirect after sending out "
                          "the headers");
    }

    // A target with a control byte (CR, LF, ...) is refused with
    // lua-nginx-module's error: the Location value can never split into a
    // second header. TAB, space and bytes from 0x80 pass, as there.
    size_t bad = codec::unsafeUriByte(uri, len);
    if (bad != std::string::npos) {
        return unsafeUriError(L, uri, len, bad, "redirect uri");
    }
    ngx_str_t location;
    if (!poolCopy(r, uri, len, &location)) {
        return luaL_error(L, "no memory");
    }

    // Any earlier Location goes. The new one stays in the plain header
    // list, not in headers_out.location: nginx would make a relative value
    // absolute there, and lua-nginx-module sends it as given.
    glue::forEachHeader(&r->headers_out.headers, [](ngx_table_elt_t &h) {
        if (h.key.len == sizeof("location") - 1
            && ngx_strncasecmp(h.key.data,
                               reinterpret_cast<u_char *>(
                                   const_cast<char *>("location")),
                               sizeof("location") - 1) == 0)
        {
            h.hash = 0;
        }
    });
    r->headers_out.location = nullptr;

    auto *h = static_cast<ngx_table_elt_t *>(
        ngx_list_push(&r->headers_out.headers));
    if (h == nullptr) {
        return luaL_error(L, "no memory");
    }
    h->hash = 1;
    ngx_str_set(&h->key, "Location");
    h->value = location;
    h->lowcase_key = reinterpret_cast<u_char *>(const_cast<char *>(
        "location"));
    r->headers_out.status = static_cast<ngx_uint_t>(status);

    return glue::exitThread(L, ctx, static_cast<ngx_int_t>(status));
}

}  // namespace

void openOutput(lua_State *L)
{
    const luaL_Reg fns[] = {{"say", ngxSay},
                            {"print", ngxPrint},
                            {"flush", ngxFlush},
                            {"eof", ngxEof},
                            {"send_headers", sendHeaders},
                            {"exit", ngxExit},
                            {"exec", ngxExec},
                            {"redirect", ngxRedirect},
                            {nullptr, nullptr}};
    setFuncs(L, fns);
}

}  // namespace luaguard::api
