// nginx-facing entry points: phase handlers, filters, the thread driver and
// the output path. API areas call into these; only src/ngx implements them.
#pragma once

#include <string>
#include <type_traits>

#include "ngx/module.hpp"

namespace luaguard::glue {

// ---- phase handlers (installed by postconfiguration) ----
ngx_int_t serverRewriteHandler(ngx_http_request_t *r);
ngx_int_t rewriteHandler(ngx_http_request_t *r);
ngx_int_t accessHandler(ngx_http_request_t *r);
ngx_int_t contentHandler(ngx_http_request_t *r);
ngx_int_t logHandler(ngx_http_request_t *r);
void installFilters();

// body_filter_by_lua's ngx.arg[1] and ngx.arg[2].
void pushFilterData(lua_State *L, RequestCtx *ctx);
bool filterEof(RequestCtx *ctx);
bool replaceFilterData(RequestCtx *ctx, const char *data, size_t len);

// ngx.worker.pids: the shared zone (postconfiguration) and each worker's
// entry in it (init_process).
ngx_int_t addWorkersZone(ngx_conf_t *cf);
void registerWorker();

// init_by_lua, init_worker_by_lua, exit_worker_by_lua: no request, run to
// completion on the main state of `vm`.
ngx_int_t runWorkerCode(Vm *vm, Handler *h, Phase phase, ngx_log_t *log);
// init_by_lua in every VM: the default one, then each lua_vm.
ngx_int_t runInit(MainConf *mcf, ngx_log_t *log);

// ---- set_by_lua as a step of the rewrite module's script ----
struct SetStep {
    Handler                   *handler;
    ngx_http_complex_value_t  *args;
    ngx_uint_t                 nargs;
    ngx_str_t                  target;   // the variable's name, no '$'
};

struct SetCode {
    ngx_http_script_code_pt    code;
    SetStep                   *step;
};

void runSetStep(ngx_http_script_engine_t *e);
ngx_int_t emptyVariable(ngx_http_request_t *r, ngx_http_variable_value_t *v,
                        uintptr_t data);

// ---- the thread driver ----

// A yield that the driver owns (I/O wait, ngx.exit). User coroutines pass
// it through to the thread: see the coroutine wrappers in the prelude.
extern char kYieldSentinel;
// The error object ngx.exit raises where it cannot yield.
extern char kExitSentinel;

// Suspends the running Lua thread until resume() is called for it.
// Must be the return expression of a lua_CFunction. Take the thread with
// threads::current() (ngx/thread.hpp) before yielding.
int yield(lua_State *L);
// Raises lua-nginx-module's "attempt to yield across C-call boundary"
// where the running coroutine cannot yield (an xpcall message handler):
// call it before arming a wait. yield() checks too, and undoes the wait.
void checkYieldable(lua_State *L);

// Resuming a waiting thread: entry::resume (ngx/entry.hpp).

// Called when the threads of ctx's phase are all done (event path).
void phaseFinished(RequestCtx *ctx);

// nginx answered the request itself while a thread waited in
// ngx.req.read_body (a chunked body found too large, bad framing): the
// body reader will never call back, so the waiting phase is ended.
void bodyWaitAbandoned(RequestCtx *ctx);

std::string errorText(lua_State *L, int idx);
void logFailure(ngx_log_t *log, const char *what, const std::string &msg,
                const std::string &traceback);

// ngx.exit / ngx.exec / ngx.redirect: records the decision (`code` for
// the driver's verdict; ngx.exec leaves exec_uri instead) and unwinds the
// running code (a yield in coroutine phases, an error object elsewhere).
int exitThread(lua_State *L, RequestCtx *ctx, ngx_int_t code = 0);

// In the phases with no response of their own (balancer_by_lua,
// ssl_certificate_by_lua) ngx.exit(ngx.ERROR) or an error status fails
// the upstream try or the handshake; other codes let it go on.
inline bool exitFails(ngx_int_t code)
{
    return code == NGX_ERROR || code >= NGX_HTTP_BAD_REQUEST;
}

// The request's context, made on first use; brought up to date with the
// request's location (and that location's VM) when it changed. Null when
// out of memory.
RequestCtx *ensureCtx(ngx_http_request_t *r);

// A request of our own for Lua that runs outside any HTTP request
// (timers, TLS handshakes): a connection slot with no socket and a pool of
// its own, carrying the given configuration; its ctx is marked is_timer.
// Destroyed with destroyFake, which releases everything it anchored.
RequestCtx *fakeRequest(void **main_conf, void **srv_conf, void **loc_conf,
                        Vm *vm, ngx_log_t *log);
void destroyFake(ngx_connection_t *c);

// Runs `h` for `phase` in a new entry thread of a fake request's ctx:
// 1 when it finished, 0 when it failed (logged), -1 when it yielded (the
// ctx's on_done is called once it ends).
int startDetached(RequestCtx *ctx, Phase phase, Handler *h);

// Runs `h` to completion with pcall on the main state of the request's VM
// (`vm` without a request), leaving `nresults` results on it. Returns
// NGX_OK, or NGX_ERROR after logging the failure.
ngx_int_t runSync(RequestCtx *ctx, Phase phase, Handler *h, ngx_log_t *log,
                  int nresults, Vm *vm = nullptr);

// Pushes lua-nginx-module's text for an API used in phase `p`, where it
// is not allowed.
void pushDisabled(lua_State *L, Phase p);

// Raises the lua-nginx-module error for an API used in the wrong phase.
// Returns the current run when the phase is allowed.
Run *checkPhase(lua_State *L, PhaseMask allowed, const char *api = nullptr);

// The running request, or a Lua error ("no request found").
RequestCtx *requireRequest(lua_State *L);

// Pushes the global table code of `ctx` runs with: its own table (made on
// first use) under an isolating lua_sandbox, the worker's _G under
// `lua_sandbox off`. False (nothing pushed) only when out of memory.
// Timers and light threads call this when they are created, to run with
// the creating request's environment (see docs/ARCHITECTURE.md).
bool pushRequestEnv(lua_State *L, RequestCtx *ctx);

// The HTTP methods ngx.HTTP_* names, by nginx's method bit: the name nginx
// gives a request of that method, or null for an id no constant has.
struct HttpMethod {
    ngx_uint_t  id;
    const char *name;
};
const HttpMethod *httpMethod(lua_Integer id);
extern const HttpMethod kHttpGet;

// ---- timers (ngx/timers.cpp) ----
enum class TimerAdd { Ok, TooMany, TooMuchMemory, NoMemory };

// Arms a timer whose callback and arguments are the `n` values on top of
// L's stack (the callback first): an armed timer moves them to a
// coroutine of its own, which it holds until it is freed; a refused one
// leaves them. The callback runs with the configuration of `creator`'s
// location, or the http block's without one, and the timer is charged to
// that location: one of its pending slots and `bytes` (the estimated size
// of what it holds) until it is freed. TooMany: the worker's or the
// location's pending slots are taken; TooMuchMemory: the location's
// lua_timer_memory_per_location would be exceeded.
TimerAdd addTimer(lua_State *L, int n, ngx_msec_t delay, bool every,
                  RequestCtx *creator, size_t bytes);

// Bytes the pending timers of `creator`'s location may still park in
// arguments (SIZE_MAX: no cap), so the caller can stop measuring there.
size_t timerMemoryLeft(RequestCtx *creator);

// This worker's ngx.timer.pending_count() / running_count().
ngx_uint_t timersPending();
ngx_uint_t timersRunning();

// At worker exit: runs pending timer callbacks with premature = true.
void firePendingTimers();

// ---- output (ngx.say, ngx.print, ngx.flush, ngx.eof, headers) ----
ngx_int_t sendHeader(RequestCtx *ctx);
// Output of ngx.say/print: held until postpone_output bytes wait (when
// nginx's write filter would send them anyway), the response's end (it
// goes with the last buffer), a flush, or passHeld.
ngx_int_t output(RequestCtx *ctx, ngx_chain_t *cl);
// Passes what output() holds through nginx's body filters: when the Lua
// thread gives the event loop back.
ngx_int_t passHeld(RequestCtx *ctx);
ngx_int_t sendEof(RequestCtx *ctx);
ngx_int_t flush(RequestCtx *ctx);
ngx_chain_t *allocBuf(RequestCtx *ctx, size_t size);
// Whether allocBuf(ctx, size) can reuse a buffer the client has taken,
// rather than allocate from the request's pool.
bool hasFreeBuf(RequestCtx *ctx, size_t size);
// Takes back the buffers the client has taken since the last output; when
// none can hold `size`, frees the large ones (each is charged to
// lua_budget_memory while it exists, and counted in ctx->output_bytes)
// and returns the bytes freed.
size_t reclaimBufs(RequestCtx *ctx, size_t size);
// Whether output waits in the connection for the client to read it: what
// ngx.flush(true) waits for.
bool outputPending(RequestCtx *ctx);

// Log with lua-nginx-module's "[lua] chunk:line: " prefix and control
// bytes escaped.
void logFromLua(lua_State *L, ngx_uint_t level, const char *msg, size_t len,
                int stack_level);

// ---- Lua text that becomes protocol text (field_text.cpp) ----
// Copies into `pool`, NUL-terminated, with codec::escapeHeaderName or
// codec::escapeHeaderValue applied: the one sanitizer for headers written
// from Lua. False when out of memory.
bool copyHeaderName(ngx_pool_t *pool, const char *s, size_t len,
                    ngx_str_t *out);
bool copyHeaderValue(ngx_pool_t *pool, const char *s, size_t len,
                     ngx_str_t *out);

// A value Lua stores in the nginx variable `name` (ngx.var.x = ...,
// set_by_lua*, the vars option of ngx.location.capture): $args as a query
// string (codec::escapeArgsString: it becomes part of a request line),
// any other as a header value, since add_header or proxy_set_header may
// send it.
bool copyVariableValue(ngx_pool_t *pool, const char *name, size_t nlen,
                       const char *s, size_t len, ngx_str_t *out);

// Calls f(ngx_table_elt_t &) for every element of an nginx list of
// headers (r->headers_in.headers, r->headers_out.headers), removed ones
// (hash 0) included: callers decide. An f returning bool stops the walk by
// returning false.
template <typename F>
void forEachHeader(ngx_list_t *list, F &&f)
{
    for (ngx_list_part_t *part = &list->part; part; part = part->next) {
        auto *h = static_cast<ngx_table_elt_t *>(part->elts);
        for (ngx_uint_t i = 0; i < part->nelts; i++) {
            if constexpr (std::is_same_v<decltype(f(h[i])), bool>) {
                if (!f(h[i])) {
                    return;
                }
            } else {
                f(h[i]);
            }
        }
    }
}

}  // namespace luaguard::glue
