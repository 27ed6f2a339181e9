#include "ngx/entry.hpp"

#include "ngx/glue.hpp"
#include "runtime/vm.hpp"
#include "security/log_escape.hpp"

// The unwinding contract above holds only where LuaJIT unwinds through the
// system unwinder; elsewhere a Lua error would longjmp over C++ frames and
// catch (...) would never see it.
#if !(defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__)))
#error "luaguard needs LuaJIT's external unwinding (GCC/clang, x64/arm64)"
#endif

namespace luaguard::entry {

const budget::Limits &Scope::limitsOf(RequestCtx *ctx)
{
    static const budget::Limits none;
    return ctx && ctx->limits ? *ctx->limits : none;
}

Vm *Scope::vmOf(RequestCtx *ctx, Vm *vm)
{
    return ctx ? ctx->vm : vm ? vm : mainConf()->vm;
}

Scope::Scope(RequestCtx *ctx, Phase phase, LuaThread *thread, Vm *vm)
    : run_(ctx, phase, thread),
      charge_(limitsOf(ctx), ctx ? &ctx->usage : &scratch_,
              vmOf(ctx, vm)->L(), &vmOf(ctx, vm)->memory())
{
}

std::string caughtText(lua_State *L, int top)
{
    if (lua_gettop(L) <= top) {
        return "unknown error";
    }
    return glue::errorText(L, -1);
}

void resumeWith(LuaThread *t, int n)
{
    RequestCtx *ctx = t->ctx;
    ngx_connection_t *c = ctx->r->connection;
    bool timer = ctx->is_timer;
    if (threads::run(t, n)) {
        glue::phaseFinished(ctx);
    }
    if (!timer) {
        ngx_http_run_posted_requests(c);
    }
}

void fail(LuaThread *t, const std::string &msg)
{
    RequestCtx *ctx = t->ctx;
    ngx_connection_t *c = ctx->r->connection;
    bool timer = ctx->is_timer;
    if (threads::fail(t, msg)) {
        glue::phaseFinished(ctx);
    }
    if (!timer) {
        ngx_http_run_posted_requests(c);
    }
}

void caught(const char *what) noexcept
{
    ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                  "luaguard: internal error stopped at an nginx callback: %s",
                  what);
}

int panic(lua_State *L)
{
    std::string line;
    size_t len = 0;
    const char *msg = lua_type(L, -1) == LUA_TSTRING
                          ? lua_tolstring(L, -1, &len) : nullptr;
    if (msg) {
        appendLogEscaped(line, msg, len);
    } else {
        line = "unknown reason";
    }
    ngx_log_error(NGX_LOG_ALERT, ngx_cycle->log, 0,
                  "lua atpanic: Lua VM crashed, reason: %s", line.c_str());
    return 0;  // LuaJIT exits the process; the master starts a new worker
}

}  // namespace luaguard::entry
