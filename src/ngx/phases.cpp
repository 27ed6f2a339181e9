// Request contexts, the thread driver and the phase handlers.

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/metrics.hpp"
#include "ngx/subrequest.hpp"
#include "ngx/thread.hpp"
#include "runtime/code.hpp"
#include "runtime/vm.hpp"
#include "security/log_escape.hpp"
#include "security/script_path.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard {

namespace {

#ifdef LUAGUARD_FAULT_INJECTION
// Test builds: "X-Luaguard-Fail-Alloc: N" makes the VM's allocator refuse
// its Nth allocation from the start of the request on (once).
RequestCtx *g_fault_owner = nullptr;

void armFault(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    if (r != r->main || r->headers_in.headers.part.elts == nullptr) {
        return;
    }
    glue::forEachHeader(&r->headers_in.headers, [&](ngx_table_elt_t &h) {
        static const char name[] = "x-luaguard-fail-alloc";
        if (h.key.len == sizeof(name) - 1
            && ngx_strncasecmp(h.key.data, (u_char *) name, h.key.len) == 0)
        {
            ngx_int_t n = ngx_atoi(h.value.data, h.value.len);
            if (n > 0) {
                ctx->vm->memory().fail_countdown = static_cast<uint64_t>(n);
                g_fault_owner = ctx;
            }
        }
    });
}
#endif

// Past this many idle environments per policy and VM, the collector takes
// them: as many as requests running at once is plenty.
constexpr size_t kMaxIdleEnvs = 64;

// A request environment costs a table, its `ngx` field and their
// collection: about 1.4k instructions, the main price of isolation for a
// small handler. One that nothing but the request's own runs could reach
// (env_escaped is false: no closure was made with it, no code was handed
// it) and that holds nothing but `ngx` is given to the next request of
// the same policy instead: it is as new, and no one else has it.
//
// One that was kept (a handler that makes closures using globals, a
// timer's callback among them) or written to is left to whoever has it;
// its cell and the closures made for it wait for the next request all
// the same, which puts a new table there (requestEnvCell): a new cell and
// closures taken from their pools again cost ~100 instructions more per
// request.
void recycleEnv(lua_State *L, RequestCtx *ctx)
{
    if (ctx->env_cell == 0) {
        return;
    }
    Vm *vm = ctx->vm;
    std::vector<IdleEnv> *idle = ctx->env_policy
                                     ? &vm->envPool(ctx->env_policy)
                                     : nullptr;
    if (idle && idle->size() < kMaxIdleEnvs) {
        // The closures go with the cell. With a table no one else has,
        // none of them escaped (that would have marked the environment
        // escaped too, sandbox::envEscapes); otherwise they wait with the
        // empty environment, and one request code got is freed.
        bool renew = ctx->env_escaped || !vm->resetEnv(L, ctx->env_cell);
        if (renew) {
            parkClosures(L, vm, &ctx->env_closures);
            vm->pushHeld(L, Vm::kIdleEnvCell);
            vm->setHeld(L, ctx->env_cell);
        }
        idle->push_back(IdleEnv{ctx->env_cell, ctx->env_closures, renew});
        ctx->env_closures.n = 0;
    } else {
        if (ctx->env_closures.n) {
            unbindClosures(L, ctx->vm, &ctx->env_closures);
        }
        ctx->vm->release(L, ctx->env_cell);
    }
    ctx->env_cell = 0;
}

void cleanupCtx(void *data)
{
    auto *ctx = static_cast<RequestCtx *>(data);
    ctx->cleaned = true;
#ifdef LUAGUARD_FAULT_INJECTION
    if (g_fault_owner == ctx) {
        ctx->vm->memory().fail_countdown = 0;
        g_fault_owner = nullptr;
    }
#endif
    metrics::requestDone(ctx);
    // Threads still waiting (the request ended under them) must never be
    // woken: their events are cancelled and their coroutines released.
    threads::endPhase(ctx);
    lua_State *L = ctx->vm->L();
    ctx->vm->release(L, ctx->ctx_cell);
    recycleEnv(L, ctx);
    luaL_unref(L, LUA_REGISTRYINDEX, ctx->on_abort_ref);
    ctx->on_abort_ref = LUA_NOREF;
    ctx->ctx_cell = ctx->env_cell = 0;
    ctx->~RequestCtx();
}

}  // namespace

RequestCtx *getCtx(ngx_http_request_t *r)
{
    return static_cast<RequestCtx *>(
        ngx_http_get_module_ctx(r, ngx_http_luaguard_module));
}

Vm *vmOf(const LocConf *lcf)
{
    return lcf->vm_slot ? lcf->vm_slot->vm : mainConf()->vm;
}

RequestCtx *createCtx(ngx_http_request_t *r, Vm *vm)
{
    MainConf *mcf = mainConf();
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == nullptr || mcf == nullptr || mcf->vm == nullptr) {
        return nullptr;
    }
    void *mem = ngx_palloc(r->pool, sizeof(RequestCtx));
    if (mem == nullptr) {
        return nullptr;
    }
    subreq::noteRequestLog(r->connection->log);
    auto *ctx = new (mem) RequestCtx();
    ctx->r = r;
    ctx->llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    ctx->vm = vm ? vm : vmOf(ctx->llcf);
    ctx->limits = &ctx->llcf->limits;
    // Destructor registered only once construction succeeded.
    cln->handler = entry::edge<cleanupCtx>;
    cln->data = ctx;
    ngx_http_set_ctx(r, ctx, ngx_http_luaguard_module);
#ifdef LUAGUARD_FAULT_INJECTION
    armFault(ctx);
#endif
    return ctx;
}

RequestCtx *ctxOfCleanup(const ngx_pool_cleanup_t *cln)
{
    return cln->handler == entry::edge<cleanupCtx>
               ? static_cast<RequestCtx *>(cln->data) : nullptr;
}

ngx_log_t *currentLog()
{
    if (g_run && g_run->ctx) {
        return g_run->ctx->r->connection->log;
    }
    return ngx_cycle->log;
}

namespace glue {

namespace {

// A request whose location changed to one of another lua_vm leaves
// what it held in the old VM (ngx.ctx, its environment, an on_abort
// callback) behind: no value crosses from one VM to another.
bool moveToVm(RequestCtx *ctx, Vm *vm)
{
    if (g_run && g_run->ctx == ctx) {
        return false;  // its Lua is running: cannot happen, refuse
    }
    threads::endPhase(ctx);
    lua_State *L = ctx->vm->L();
    ctx->vm->release(L, ctx->ctx_cell);
    unbindClosures(L, ctx->vm, &ctx->env_closures);
    ctx->vm->release(L, ctx->env_cell);
    luaL_unref(L, LUA_REGISTRYINDEX, ctx->on_abort_ref);
    ctx->on_abort_ref = LUA_NOREF;
    ctx->ctx_cell = ctx->env_cell = 0;
    ctx->env_policy = nullptr;
    ctx->vm = vm;
    return true;
}

}  // namespace

RequestCtx *ensureCtx(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    if (ctx == nullptr) {
        return createCtx(r);
    }
    // The location may have changed since (internal redirect keeps no
    // module ctx, but a rewrite to another location does).
    ctx->llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    ctx->limits = &ctx->llcf->limits;
    Vm *vm = vmOf(ctx->llcf);
    if (vm != ctx->vm && !moveToVm(ctx, vm)) {
        return nullptr;
    }
    return ctx;
}

namespace {

// The path may come from request data: escaped like any Lua message.
void logEscaped(ngx_log_t *log, const std::string &msg)
{
    std::string line;
    appendLogEscaped(line, msg.data(), msg.size());
    ngx_log_error(NGX_LOG_ERR, log, 0, "%s", line.c_str());
}

const script::Policy &scriptPolicy(RequestCtx *ctx)
{
    if (ctx && ctx->llcf->script_policy) {
        return *ctx->llcf->script_policy;
    }
    // init_by_lua_file and friends: fixed paths of the configuration.
    static script::Policy fallback;
    fallback.root.assign(reinterpret_cast<char *>(ngx_cycle->prefix.data),
                         ngx_cycle->prefix.len);
    while (fallback.root.size() > 1 && fallback.root.back() == '/') {
        fallback.root.pop_back();
    }
    return fallback;
}

// A script that could not be loaded: the status lua-nginx-module answers
// (404 missing, 503 unreadable), 404 for what the policy refused and 500
// for unsafe permissions, both logged as luaguard's refusals.
bool loadRefused(RequestCtx *ctx, const std::string &path, script::Verdict v,
                 const std::string &why, std::string *err)
{
    ngx_int_t status = NGX_HTTP_INTERNAL_SERVER_ERROR;
    switch (v) {
    case script::Verdict::NotFound: status = NGX_HTTP_NOT_FOUND; break;
    case script::Verdict::Forbidden:
        status = NGX_HTTP_SERVICE_UNAVAILABLE;
        break;
    case script::Verdict::Refused: status = NGX_HTTP_NOT_FOUND; break;
    default: break;
    }
    if (ctx) {
        ctx->load_status = status;
    }
    bool policy = v == script::Verdict::Refused
                  || v == script::Verdict::Unsafe;
    *err = std::string(policy ? "luaguard refused to load Lua file \""
                              : "failed to load external Lua file \"")
           + path + "\": " + why;
    return false;
}

// Resolves a *_by_lua_file path for this request (nginx variables
// expanded, relative paths against the prefix).
bool filePath(RequestCtx *ctx, Handler *h, std::string *out, std::string *err)
{
    ngx_str_t value;
    if (h->path->lengths == nullptr) {
        value = h->path->value;
    } else {
        if (ctx == nullptr
            || ngx_http_complex_value(ctx->r, h->path, &value) != NGX_OK)
        {
            *err = "failed to evaluate the Lua file path";
            return false;
        }
        if (value.len == 0) {
            *err = "the Lua file path evaluated to an empty string";
            return false;
        }
        ngx_str_t full = value;
        if (ngx_get_full_name(ctx->r->pool,
                              const_cast<ngx_str_t *>(&ngx_cycle->prefix),
                              &full)
            != NGX_OK)
        {
            *err = "failed to resolve the Lua file path";
            return false;
        }
        value = full;
    }
    out->assign(reinterpret_cast<char *>(value.data), value.len);
    return true;
}

// Pushes the factory of a file handler: from the per-worker cache, or
// compiled now (and cached unless lua_code_cache is off).
bool pushFileFactory(lua_State *L, Vm *vm, RequestCtx *ctx, Handler *h,
                     std::string *err)
{
    std::string path;
    if (!filePath(ctx, h, &path, err)) {
        return false;
    }
    bool cache = ctx == nullptr || ctx->llcf->code_cache;

    // A path built from request data stays beneath lua_file_root; a path
    // fixed in the configuration is the administrator's.
    const script::Policy &policy = scriptPolicy(ctx);
    bool confined = h->path->lengths != nullptr;
    std::string relative;
    if (confined) {
        std::string why;
        script::Verdict v = script::confine(path, policy, &relative, &why);
        if (v != script::Verdict::Ok) {
            return loadRefused(ctx, path, v, why, err);
        }
    }

    if (cache) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, vm->codeCacheRef());
        lua_getfield(L, -1, path.c_str());
        if (!lua_isnil(L, -1)) {
            lua_remove(L, -2);
            return true;
        }
        lua_pop(L, 2);
    }

    std::string code;
    std::string why;
    script::Verdict v = script::load(path, relative, confined, policy, &code,
                                     &why);
    if (v != script::Verdict::Ok) {
        return loadRefused(ctx, path, v, why, err);
    }
    std::string chunkname = "@" + path;
    if (!compileFactory(L, code.data(), code.size(), chunkname.c_str(), err)) {
        *err = "failed to load Lua file: " + *err;
        return false;
    }
    if (cache) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, vm->codeCacheRef());
        lua_pushvalue(L, -2);
        lua_setfield(L, -2, path.c_str());
        lua_pop(L, 1);
    }
    return true;
}

// Pushes the factory of inline handler `h` in `vm`: compiled while the
// configuration was parsed in the default VM, on first use in a lua_vm.
bool pushInlineFactory(lua_State *L, Vm *vm, Handler *h, std::string *err)
{
    if (vm == mainConf()->vm) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, h->ref);
        return true;
    }
    if (h->vm_refs.push(L)) {
        return true;
    }
    lua_rawgeti(L, LUA_REGISTRYINDEX, vm->codeCacheRef());
    lua_pushlightuserdata(L, h);
    lua_rawget(L, -2);
    if (!lua_isnil(L, -1)) {
        lua_remove(L, -2);
        return true;
    }
    lua_pop(L, 1);
    if (!compileFactory(L, reinterpret_cast<const char *>(h->code.data),
                        h->code.len,
                        reinterpret_cast<const char *>(h->chunkname.data),
                        err))
    {
        lua_pop(L, 1);
        *err = "failed to load inline Lua code: " + *err;
        return false;
    }
    if (!h->vm_refs.keep(L)) {
        lua_pushlightuserdata(L, h);
        lua_pushvalue(L, -2);
        lua_rawset(L, -4);
    }
    lua_remove(L, -2);
    return true;
}

// A handler with functions inside that use globals makes closures that
// keep its environment (those without get lua/sandbox.lua's closure_env):
// the request's environment then outlives it (recycleEnv).
// Returns whether the function on top of L is one.
bool noteClosures(lua_State *L, RequestCtx *ctx)
{
    bool makes = Vm::makesClosures(L);
    ctx->env_escaped = ctx->env_escaped || makes;
    return makes;
}

std::string envFailure()
{
    return "failed to create the request's global environment: "
           + sandbox::envError();
}

// Gives the function on top of L the request's environment (made now if
// the request has none yet); pops it and fails with *err if it cannot.
bool setRequestEnv(lua_State *L, RequestCtx *ctx, std::string *err)
{
    if (!pushRequestEnv(L, ctx)) {
        lua_pop(L, 1);
        *err = envFailure();
        return false;
    }
    lua_setfenv(L, -2);
    noteClosures(L, ctx);
    return true;
}

// requestEnvCell's first call in a request (or in another policy).
[[gnu::noinline]] int takeRequestEnvCell(lua_State *L, RequestCtx *ctx,
                                         const sandbox::Policy *p)
{
    // First code of the request, or a location with another policy (a
    // rewrite moved the request): globals do not carry across policies.
    if (ctx->env_cell != 0) {
        if (ctx->env_closures.n) {
            unbindClosures(L, ctx->vm, &ctx->env_closures);
        }
        ctx->vm->release(L, ctx->env_cell);
        ctx->env_cell = 0;
    }
    ctx->env_escaped = false;
    std::vector<IdleEnv> &idle = ctx->vm->envPool(p);
    if (!idle.empty()) {
        IdleEnv &e = idle.back();
        if (e.renew) {
            if (!sandbox::pushNewEnv(L, p)) {
                return 0;
            }
            ctx->vm->setHeld(L, e.cell);
            rebindClosures(L, ctx->vm, e.closures, e.cell);
        }
        ctx->env_cell = e.cell;
        ctx->env_closures = e.closures;
        idle.pop_back();
        ctx->env_policy = p;
        return ctx->env_cell;
    }
    if (!sandbox::pushNewEnv(L, p)) {
        return 0;
    }
    ctx->env_cell = ctx->vm->hold(L);
    ctx->env_policy = p;
    return ctx->env_cell;
}

// The cell of the request's environment for policy `p` (an isolating
// one), taken from the policy's idle ones or made now; 0 when it cannot
// be made.
inline int requestEnvCell(lua_State *L, RequestCtx *ctx,
                          const sandbox::Policy *p)
{
    if (ctx->env_cell != 0 && ctx->env_policy == p) {
        return ctx->env_cell;
    }
    return takeRequestEnvCell(L, ctx, p);
}

// Pushes the closure of pool `idle` made for the request's environment
// `env` by an earlier run, if there is one. One whose environment is no
// longer `env` (request code gave it another with setfenv) is not called
// again: it goes back to its pool, which sets an environment per run.
[[gnu::noinline]] void unbindOne(lua_State *L, Vm *vm, RequestCtx *ctx,
                                 int slot)
{
    EnvClosures &b = ctx->env_closures;
    Lease lease{b.pool[slot], b.cell[slot]};
    b.drop(slot);
    giveClosure(L, vm, &lease, true);
}

inline bool pushBound(lua_State *L, Vm *vm, RequestCtx *ctx,
                      std::vector<int> *idle, int env)
{
    int slot = ctx->env_closures.slot(idle);
    if (slot < 0) {
        return false;
    }
    if (!vm->pushIfFenv(L, ctx->env_closures.cell[slot], env)) {
        unbindOne(L, vm, ctx, slot);
        return false;
    }
    // A handler that makes closures keeps its closure with a renewed
    // environment (recycleEnv): this run's closures take the new table.
    if (ctx->env_closures.makes[slot]) {
        ctx->env_escaped = true;
    }
    return true;
}

// Pushes a closure of handler `h` onto L (a state of `vm`), with the
// request's environment when there is a request: in an isolating
// location, a pooled one held in *lease until the run ends (giveClosure),
// when the code lives as long as the VM. `co` is the thread it will run
// in.
bool pushHandler(lua_State *L, Vm *vm, RequestCtx *ctx, Handler *h,
                 lua_State *co, std::string *err, Lease *lease)
{
    const sandbox::Policy *p = ctx ? sandbox::policyOf(ctx->llcf) : nullptr;
    bool isolate = p && p->isolate;
    // Without isolation every run has the worker's globals: the runs of
    // an inline handler share one closure, made on its first run in the
    // VM, as lua-nginx-module's code cache does (a setfenv of it lasts
    // there too). Made per run, it cost the factory's call and the
    // collection: 0.4k-0.6k instructions per phase.
    bool shared = ctx && !isolate && h->path == nullptr;
    if (shared && h->shared_vm == vm) {
        vm->pushHeld(L, h->shared_cell);
        return true;
    }
    bool pooled = isolate && (h->path == nullptr || ctx->llcf->code_cache);
    std::vector<int> *idle = pooled && h->path == nullptr && h->pool_vm == vm
                                 ? h->pool : nullptr;
    bool looked = idle != nullptr;   // for a closure kept with the env
    if (looked) {
        // The usual run: the closure made for the request's environment
        // by an earlier run (of this request or of one that had the same
        // environment before), called as it is.
        int env = requestEnvCell(L, ctx, p);
        if (env == 0) {
            *err = envFailure();
            return false;
        }
        if (pushBound(L, vm, ctx, idle, env)) {
            return true;
        }
    }
    // The usual run of an inline handler takes an idle closure of its
    // pool: the factory is pushed only when a new closure is needed.
    bool factory = idle == nullptr || idle->empty();
    if (factory && h->path) {
        if (!pushFileFactory(L, vm, ctx, h, err)) {
            return false;
        }
        // Binary chunks have a C factory (see compileFactory).
        if (ctx && lua_iscfunction(L, -1)) {
            if (!p->allows(sandbox::Capability::Bytecode)) {
                lua_pop(L, 1);
                sandbox::countRefusal(sandbox::Capability::Bytecode);
                *err = "capability 'bytecode' is not allowed in this "
                       "location (lua_sandbox " + p->label + ")";
                return false;
            }
        }
    } else if (factory && !pushInlineFactory(L, vm, h, err)) {
        return false;
    }
    if (pooled) {
        if (idle == nullptr) {
            idle = closurePool(vm, lua_topointer(L, -1));
            if (h->path == nullptr) {
                h->pool_vm = vm;
                h->pool = idle;
            }
        }
        // The request's environment (the pool's, or made now) is set in
        // the same visit to the VM's cells as the closure is taken.
        int env = requestEnvCell(L, ctx, p);
        if (env == 0) {
            lua_pop(L, factory ? 1 : 0);
            *err = envFailure();
            return false;
        }
        // A file's handler, or an inline one whose pool this VM had not
        // been the last to use.
        if (!looked && pushBound(L, vm, ctx, idle, env)) {
            if (factory) {
                lua_remove(L, -2);
            }
            return true;
        }
        takeClosure(L, vm, -1, idle, lease, env);
    } else {
        instantiate(L, -1);
        if (shared && h->shared_vm == nullptr) {
            lua_pushvalue(L, -1);
            h->shared_cell = vm->hold(L);
            h->shared_vm = vm;
        }
    }
    if (factory) {
        lua_remove(L, -2);
    }
    if (pooled) {
        bool makes = noteClosures(L, ctx);
        // Kept with the environment from now on (recycleEnv); the run
        // holds no lease.
        if (ctx->env_closures.add(lease->idle, lease->cell, makes)) {
            *lease = Lease{};
        }
        return true;
    }
    return isolate ? setRequestEnv(L, ctx, err) : true;
}

int tracebackHandler(lua_State *L)
{
    if (lua_touserdata(L, 1) == &kExitSentinel) {
        return 1;
    }
    // The message is escaped here so that runSync finds the traceback at
    // the first "\nstack traceback:": a message cannot fake one.
    std::string text;
    std::string msg = errorText(L, 1);
    appendLogEscaped(text, msg.data(), msg.size());
    text += '\n';
    text += escapedTraceback(L, 1);
    lua_pushlstring(L, text.data(), text.size());
    return 1;
}

// The handler, made once per VM and kept in its registry: a fresh C
// closure per synchronous run cost an allocation and its collection.
void pushTracebackHandler(lua_State *L)
{
    static const char kKey = 0;
    lua_pushlightuserdata(L, const_cast<char *>(&kKey));
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_pushcfunction(L, tracebackHandler);
        lua_pushlightuserdata(L, const_cast<char *>(&kKey));
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
}

enum class Outcome { Yielded, Finished, Failed };

// Starts the entry thread of `phase` with handler `h`.
Outcome startThread(RequestCtx *ctx, Phase phase, Handler *h)
{
    threads::endPhase(ctx);  // what an earlier phase left
    ctx->thread_phase = phase;
    ctx->entry_done = false;
    ctx->entry_failed = false;
    ctx->live_user = 0;
    ctx->exited = false;
    ctx->exit_code = 0;

    std::string err;
    LuaThread *t = nullptr;
    bool ok = entry::protect(ctx->vm->L(), [&] {
        t = threads::create(ctx, nullptr);
    }, &err);
    if (t == nullptr) {
        if (ok) {
            err = "no memory";
        }
        logEscaped(ctx->r->connection->log,
                   "failed to create the Lua thread: " + err);
        return Outcome::Failed;
    }
    ctx->entry = t;

    int rc = 0;
    {
        // One budget frame for making the handler's closure and its first
        // resume: each frame costs two clock reads and its bookkeeping.
        entry::Scope scope(ctx, phase, t);
        std::string raised;
        if (!entry::protect(t->co, [&] {
                ok = pushHandler(t->co, ctx->vm, ctx, h, t->co, &err,
                                 &t->lease);
            }, &raised))
        {
            ok = false;
            err = "failed to run " + std::string(directiveName(phase))
                  + ": " + raised;
        }
        if (ok) {
            rc = threads::resume(t, 0);
        }
    }
    if (!ok) {
        metrics::countError(ctx);
        logEscaped(ctx->r->connection->log, err);
        ctx->entry_done = ctx->entry_failed = true;
        threads::endPhase(ctx);
        return Outcome::Failed;
    }
    if (!threads::settle(t, rc)) {
        return Outcome::Yielded;
    }
    return ctx->entry_failed ? Outcome::Failed : Outcome::Finished;
}

// What to do with the request once a thread has finished.
struct Verdict {
    enum Kind { Continue, Finalize, Output, Exec } kind;
    ngx_int_t rc;
};

Verdict judge(RequestCtx *ctx, Outcome out)
{
    if (out == Outcome::Failed) {
        // Headers already out: nothing but closing the connection is
        // honest. lua-nginx-module closes it too while a capture of the
        // request is still running.
        if (ctx->r->header_sent || subreq::pendingOf(ctx->r)) {
            return {Verdict::Finalize, NGX_ERROR};
        }
        if (ctx->load_status) {
            return {Verdict::Finalize, ctx->load_status};
        }
        return {Verdict::Finalize,
                ctx->usage.tripped != budget::Kind::None
                    ? static_cast<ngx_int_t>(ctx->llcf->budget_status)
                    : NGX_HTTP_INTERNAL_SERVER_ERROR};
    }
    if (ctx->exec_uri.len) {
        return {Verdict::Exec, NGX_DONE};
    }
    if (!ctx->exited) {
        return {Verdict::Output, NGX_OK};
    }
    ngx_int_t code = ctx->exit_code;
    if (code == NGX_ERROR) {
        return {Verdict::Finalize, NGX_ERROR};
    }
    if (code == NGX_DECLINED) {
        return {Verdict::Continue, NGX_DECLINED};
    }
    if (code >= NGX_HTTP_SPECIAL_RESPONSE || code == NGX_HTTP_NO_CONTENT
        || code == NGX_HTTP_CREATED)
    {
        // After output, the codes that mean "drop the connection" still
        // do (lua-nginx-module); the others finish the response as is.
        if (ctx->r->header_sent && code != NGX_HTTP_CLOSE
            && code != NGX_HTTP_REQUEST_TIME_OUT
            && code != NGX_HTTP_CLIENT_CLOSED_REQUEST)
        {
            return {Verdict::Output, NGX_OK};
        }
        return {Verdict::Finalize, code};
    }
    if (code >= NGX_HTTP_OK) {
        if (!ctx->r->header_sent) {
            ctx->r->headers_out.status = code;
        }
        return {Verdict::Output, NGX_OK};
    }
    // ngx.OK and the other small codes quit the handler.
    return {Verdict::Continue, NGX_OK};
}

// A body nobody read is discarded before the response completes: left in
// the connection, its bytes would be parsed as the next pipelined request.
// Not done before the Lua code runs, which may call ngx.req.read_body.
void discardUnreadBody(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    if (r != r->main || r->request_body || r->discard_body) {
        return;
    }
    if (ctx->req_socket && !r->keepalive) {
        // The script read what it wanted through ngx.req.socket() and the
        // connection closes after this response: waiting for the rest of
        // a body that may never come would only hold the client, as
        // lua-nginx-module does not.
        r->lingering_close = 0;
        return;
    }
    if (ngx_http_discard_request_body(r) != NGX_OK) {
        r->keepalive = 0;
    }
}

ngx_int_t finishOutput(RequestCtx *ctx)
{
    ngx_int_t rc = NGX_OK;
    discardUnreadBody(ctx);
    if (!ctx->r->header_sent) {
        rc = sendHeader(ctx);
        if (rc == NGX_ERROR || rc > NGX_OK) {
            return rc;
        }
    }
    if (!ctx->eof) {
        rc = sendEof(ctx);
    }
    return rc;
}

ngx_int_t doExec(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    ngx_str_t uri = ctx->exec_uri;
    ngx_str_t args = ctx->exec_args;
    ctx->exec_uri.len = 0;

    if (uri.data[0] == '@') {
        return ngx_http_named_location(r, &uri);
    }
    return ngx_http_internal_redirect(r, &uri, &args);
}

bool inRewriteType(Phase p)
{
    return p == Phase::Rewrite || p == Phase::Access
           || p == Phase::ServerRewrite;
}

PhaseRun &phaseRun(RequestCtx *ctx, Phase p)
{
    switch (p) {
    case Phase::ServerRewrite: return ctx->server_rewrite;
    case Phase::Rewrite: return ctx->rewrite;
    case Phase::Access: return ctx->access;
    default: return ctx->content;
    }
}

// The return code of a phase handler whose thread finished without
// yielding.
ngx_int_t concludeSync(RequestCtx *ctx, Phase phase, Outcome out)
{
    ngx_http_request_t *r = ctx->r;
    threads::endPhase(ctx);
    Verdict v = judge(ctx, out);
    PhaseRun &pr = phaseRun(ctx, phase);
    pr.state = ThreadState::Done;
    if (v.kind == Verdict::Finalize) {
        // What was written before the error or ngx.exit goes where each
        // ngx.say would have sent it (a capture keeps it).
        passHeld(ctx);
    }

    if (phase == Phase::Content) {
        switch (v.kind) {
        case Verdict::Continue:
            return v.rc == NGX_DECLINED ? NGX_DECLINED : finishOutput(ctx);
        case Verdict::Finalize: return v.rc;
        case Verdict::Output: return finishOutput(ctx);
        case Verdict::Exec:
            doExec(ctx);
            return NGX_DONE;  // the content phase finalizes with NGX_DONE
        }
    }

    // An access handler that let the request through says so with NGX_OK:
    // under `satisfy any` that grants access whatever allow/deny decided,
    // as with lua-nginx-module. ngx.exit(ngx.DECLINED) leaves the decision
    // to the other access handlers.
    ngx_int_t pass = phase == Phase::Access && v.rc != NGX_DECLINED
                     ? NGX_OK : NGX_DECLINED;
    switch (v.kind) {
    case Verdict::Continue:
        if (r->header_sent) {
            // Output went out in this phase; nothing may follow it.
            ngx_http_finalize_request(r, finishOutput(ctx));
            return NGX_DONE;
        }
        pr.rc = pass;
        if (phase == Phase::Rewrite && r->uri_changed) {
            // ngx.req.set_uri(uri, true): nginx searches the location
            // again, and there the request starts afresh as after an
            // internal redirect (empty ngx.ctx, every phase's Lua runs
            // again, a loop ends in nginx's redirection cycle error).
            // This ctx stays in the pool until its cleanup.
            ngx_http_set_ctx(r, nullptr, ngx_http_luaguard_module);
        }
        return pass;
    case Verdict::Finalize:
        return v.rc;
    case Verdict::Output:
        if (!ctx->exited && !r->header_sent && !ctx->eof) {
            pr.rc = pass;
            return pass;  // a handler that produced nothing
        }
        // ngx.exit(2xx) ends the request even with nothing written.
        ngx_http_finalize_request(r, finishOutput(ctx));
        return NGX_DONE;
    case Verdict::Exec:
        doExec(ctx);
        ngx_http_finalize_request(r, NGX_DONE);
        return NGX_DONE;
    }
    return NGX_ERROR;
}

// After a yielded thread has finished: drive the request on from an event.
void concludeAsync(RequestCtx *ctx, Phase phase, Outcome out)
{
    ngx_http_request_t *r = ctx->r;
    threads::endPhase(ctx);
    PhaseRun &pr = phaseRun(ctx, phase);

    if (inRewriteType(phase)) {
        r->main->count--;  // taken when the thread first yielded
        ngx_int_t rc = concludeSync(ctx, phase, out);
        if (rc == NGX_DECLINED || (rc == NGX_OK && phase == Phase::Access)) {
            // The phase checker calls the handler again and gets pr.rc.
            pr.rc = rc;
            r->write_event_handler = ngx_http_core_run_phases;
            ngx_http_core_run_phases(r);
        } else if (rc != NGX_DONE) {
            ngx_http_finalize_request(r, rc);
        }
        return;
    }
    ngx_http_finalize_request(r, concludeSync(ctx, phase, out));
}

ngx_int_t runPhase(ngx_http_request_t *r, Phase phase, Handler *h)
{
    RequestCtx *ctx = ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    PhaseRun &pr = phaseRun(ctx, phase);
    if (pr.state == ThreadState::Done) {
        return pr.rc;
    }
    if (pr.state == ThreadState::Running) {
        return NGX_DONE;  // re-entered while the thread waits
    }
    pr.state = ThreadState::Running;

    ngx_http_event_handler_pt write_handler = r->write_event_handler;
    Outcome out = startThread(ctx, phase, h);
    if (out == Outcome::Yielded) {
        r->main->count++;
        // The thread, not nginx's phase loop, decides when to go on; an
        // API that waits on the write event (ngx.flush(true)) has set its
        // own handler, which must stay.
        if (r->write_event_handler == write_handler) {
            r->write_event_handler = ngx_http_request_empty_handler;
        }
        return NGX_DONE;
    }
    return concludeSync(ctx, phase, out);
}

// lua_need_request_body: the body is read before the phase's Lua runs.
void bodyReadForPhase(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    if (ctx == nullptr) {
        ngx_http_finalize_request(r, NGX_HTTP_INTERNAL_SERVER_ERROR);
        return;
    }
    ctx->body_read = true;
    ctx->reading_body = false;
    if (ctx->body_sync) {
        return;  // needBody() goes on inline
    }
    if (ctx->in_content_phase) {
        ngx_http_finalize_request(r, contentHandler(r));
        return;
    }
    r->write_event_handler = ngx_http_core_run_phases;
    ngx_http_core_run_phases(r);
}

// Returns NGX_DECLINED when the body is there (or not wanted), NGX_DONE
// while it is being read, or an HTTP error.
ngx_int_t needBody(ngx_http_request_t *r, RequestCtx *ctx, bool content)
{
    if (!ctx->llcf->need_request_body || ctx->body_read) {
        return NGX_DECLINED;
    }
    if (ctx->reading_body) {
        return NGX_DONE;
    }
    ctx->reading_body = true;
    ctx->in_content_phase = content;
    ctx->body_sync = true;
    ngx_int_t rc = ngx_http_read_client_request_body(
        r, entry::edge<bodyReadForPhase>);
    ctx->body_sync = false;
    if (rc >= NGX_HTTP_SPECIAL_RESPONSE) {
        return rc;
    }
    if (ctx->body_read) {
        // Completed inside the call: the reader's reference is ours to
        // give back, and the phase goes on right here.
        r->main->count--;
        return NGX_DECLINED;
    }
    if (!content) {
        // The reader holds a reference until it calls back; stop the phase
        // loop (the content phase does the same by returning NGX_DONE).
        ngx_http_finalize_request(r, NGX_DONE);
    }
    return NGX_DONE;
}

// The request ended under a thread that nothing will call back (see
// bodyWaitAbandoned): the phase's threads go, and a rewrite or access
// phase gives back the reference its yield took, which lets nginx close
// the request it already answered.
void abandonedHandler(ngx_event_t *ev)
{
    RequestCtx *ctx = static_cast<LuaThread *>(ev->data)->ctx;
    ngx_http_request_t *r = ctx->r;
    ngx_connection_t *c = r->connection;
    Phase phase = ctx->thread_phase;
    threads::endPhase(ctx);
    PhaseRun &pr = phaseRun(ctx, phase);
    pr.state = ThreadState::Done;
    pr.rc = NGX_DONE;
    if (inRewriteType(phase)) {
        ngx_http_finalize_request(r, NGX_DONE);
    }
    ngx_http_run_posted_requests(c);
}

}  // namespace

void bodyWaitAbandoned(RequestCtx *ctx)
{
    LuaThread *t = ctx->req_body_waiter;
    ctx->req_body_waiter = nullptr;
    t->cancel = nullptr;
    // Not from inside nginx's finalization, which is running now.
    t->wake.handler = entry::edge<abandonedHandler>;
    ngx_post_event(&t->wake, &ngx_posted_events);
}

int startDetached(RequestCtx *ctx, Phase phase, Handler *h)
{
    switch (startThread(ctx, phase, h)) {
    case Outcome::Yielded: return -1;
    case Outcome::Finished: return 1;
    case Outcome::Failed: break;
    }
    return 0;
}

void phaseFinished(RequestCtx *ctx)
{
    if (ctx->is_timer) {
        ctx->on_done(ctx);
        return;
    }
    concludeAsync(ctx, ctx->thread_phase,
                  ctx->entry_failed ? Outcome::Failed : Outcome::Finished);
}

void pushDisabled(lua_State *L, Phase p)
{
    lua_pushfstring(L, "API disabled in the context of %s",
                    directiveName(p));
}

Run *checkPhase(lua_State *L, PhaseMask allowed, const char *)
{
    Run *run = g_run;
    Phase p = run ? run->phase : Phase::None;
    if (!(mask(p) & allowed)) {
        luaL_where(L, 1);
        pushDisabled(L, p);
        lua_concat(L, 2);
        lua_error(L);
    }
    return run;
}

bool pushRequestEnv(lua_State *L, RequestCtx *ctx)
{
    const sandbox::Policy *p = sandbox::policyOf(ctx->llcf);
    if (!p->isolate) {
        lua_pushvalue(L, LUA_GLOBALSINDEX);
        return true;
    }
    int cell = requestEnvCell(L, ctx, p);
    if (cell == 0) {
        return false;
    }
    ctx->vm->pushHeld(L, cell);
    return true;
}

RequestCtx *requireRequest(lua_State *L)
{
    if (g_run == nullptr || g_run->ctx == nullptr) {
        luaL_error(L, "no request found");
    }
    return g_run->ctx;
}

// Runs `h` to completion with pcall on the main state. Returns NGX_OK, or
// NGX_ERROR after logging. `nargs` values below the function are passed.
ngx_int_t runSync(RequestCtx *ctx, Phase phase, Handler *h, ngx_log_t *log,
                  int nresults, Vm *vm)
{
    if (ctx) {
        vm = ctx->vm;
    }
    lua_State *L = vm->L();
    int base = lua_gettop(L);
    entry::Scope scope(ctx, phase, nullptr, vm);
    metrics::countRun(ctx);

    std::string err;
    bool pushed = false;
    Lease lease;
    if (!entry::protect(L, [&] {
            pushTracebackHandler(L);
            pushed = pushHandler(L, vm, ctx, h, nullptr, &err, &lease);
        }, &err) || !pushed)
    {
        giveClosure(L, vm, &lease, true);  // it never ran
        metrics::countError(ctx);
        lua_settop(L, base);
        logEscaped(log, err);
        return NGX_ERROR;
    }
    int rc = lua_pcall(L, 0, nresults, base + 1);
    giveClosure(L, vm, &lease, true);  // returned or unwound: runs nowhere
    if (rc != 0) {
        if (lua_touserdata(L, -1) == &kExitSentinel) {
            lua_settop(L, base);
            return NGX_OK;
        }
        std::string text = errorText(L, -1);
        // The handler put the traceback after the message.
        size_t nl = text.find("\nstack traceback:");
        std::string msg = nl == std::string::npos ? text : text.substr(0, nl);
        std::string tb = nl == std::string::npos ? "" : text.substr(nl + 1);
        lua_settop(L, base);
        metrics::countError(ctx);
        std::string what = std::string("failed to run ")
                           + directiveName(phase);
        logFailure(log, what.c_str(), msg, tb);
        if (ctx) {
            budget::Guard::reclaim(L, &vm->memory(), &ctx->usage,
                                   *ctx->limits);
        }
        return NGX_ERROR;
    }
    lua_remove(L, base + 1);
    return NGX_OK;
}

ngx_int_t runWorkerCode(Vm *vm, Handler *h, Phase phase, ngx_log_t *log)
{
    lua_State *L = vm->L();
    int base = lua_gettop(L);
    ngx_int_t rc = runSync(nullptr, phase, h, log, 0, vm);
    lua_settop(L, base);
    return rc;
}

ngx_int_t runInit(MainConf *mcf, ngx_log_t *log)
{
    if (runWorkerCode(mcf->vm, mcf->init, Phase::Init, log) != NGX_OK) {
        return NGX_ERROR;
    }
    if (mcf->vms) {
        auto **slots = static_cast<VmSlot **>(mcf->vms->elts);
        for (ngx_uint_t i = 0; i < mcf->vms->nelts; i++) {
            if (runWorkerCode(slots[i]->vm, mcf->init, Phase::Init, log)
                != NGX_OK)
            {
                return NGX_ERROR;
            }
        }
    }
    return NGX_OK;
}

ngx_int_t serverRewriteHandler(ngx_http_request_t *r)
{
    auto *scf = static_cast<SrvConf *>(
        ngx_http_get_module_srv_conf(r, ngx_http_luaguard_module));
    if (scf->server_rewrite == nullptr) {
        return NGX_DECLINED;
    }
    return runPhase(r, Phase::ServerRewrite, scf->server_rewrite);
}

// rewrite_by_lua and access_by_lua: the location's handler, after the
// body when lua_need_request_body asks for it.
ngx_int_t locationPhase(ngx_http_request_t *r, Phase phase,
                        Handler *LocConf::*field)
{
    auto *llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    if (llcf->*field == nullptr) {
        return NGX_DECLINED;
    }
    RequestCtx *ctx = ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    ngx_int_t rc = needBody(r, ctx, false);
    if (rc != NGX_DECLINED) {
        return rc;
    }
    return runPhase(r, phase, llcf->*field);
}

ngx_int_t rewriteHandler(ngx_http_request_t *r)
{
    if (r->uri_changed) {
        // A `rewrite ... last` that ran before us moves the request: the
        // Lua of the location it leaves never runs (lua-nginx-module).
        return NGX_DECLINED;
    }
    return locationPhase(r, Phase::Rewrite, &LocConf::rewrite);
}

ngx_int_t accessHandler(ngx_http_request_t *r)
{
    return locationPhase(r, Phase::Access, &LocConf::access);
}

ngx_int_t contentHandler(ngx_http_request_t *r)
{
    auto *llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    if (llcf->content == nullptr) {
        return NGX_DECLINED;
    }
    RequestCtx *ctx = ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_HTTP_INTERNAL_SERVER_ERROR;
    }
    ngx_int_t rc = needBody(r, ctx, true);
    if (rc == NGX_DONE) {
        return NGX_DONE;
    }
    if (rc != NGX_DECLINED) {
        return rc;
    }
    ngx_int_t out = runPhase(r, Phase::Content, llcf->content);
    if (out == NGX_DONE && ctx->content.state == ThreadState::Running) {
        // runPhase took a reference for the suspended thread; the content
        // phase gives one back by finalizing with NGX_DONE.
        return NGX_DONE;
    }
    return out;
}

ngx_int_t logHandler(ngx_http_request_t *r)
{
    auto *llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    if (llcf->log == nullptr) {
        return NGX_DECLINED;
    }
    RequestCtx *ctx = ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_ERROR;
    }
    runSync(ctx, Phase::Log, llcf->log, r->connection->log, 0);
    return NGX_OK;
}

// The rewrite module's script engine stops at a null code pointer; nginx
// does not export its own, so this is ours.
u_char *scriptExit()
{
    static uintptr_t stop = 0;
    return reinterpret_cast<u_char *>(&stop);
}

ngx_int_t emptyVariable(ngx_http_request_t *, ngx_http_variable_value_t *v,
                        uintptr_t)
{
    *v = ngx_http_variable_null_value;
    return NGX_OK;
}

void runSetStep(ngx_http_script_engine_t *e)
{
    auto *code = reinterpret_cast<SetCode *>(e->ip);
    SetStep *step = code->step;
    ngx_http_request_t *r = e->request;
    e->ip += sizeof(SetCode);

    RequestCtx *ctx = ensureCtx(r);
    if (ctx == nullptr) {
        e->ip = scriptExit();
        e->status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return;
    }

    lua_State *L = ctx->vm->L();
    int base = lua_gettop(L);

    // ngx.arg for set_by_lua: the evaluated $arg parameters.
    bool evaluated = true;
    std::string err;
    bool built = entry::protect(L, [&] {
        lua_createtable(L, static_cast<int>(step->nargs), 0);
        for (ngx_uint_t i = 0; i < step->nargs && evaluated; i++) {
            ngx_str_t val;
            if (ngx_http_complex_value(r, &step->args[i], &val) != NGX_OK) {
                evaluated = false;
                break;
            }
            lua_pushlstring(L, reinterpret_cast<char *>(val.data), val.len);
            lua_rawseti(L, -2, static_cast<int>(i + 1));
        }
        lua_setfield(L, LUA_REGISTRYINDEX, "luaguard.set_args");
    }, &err);
    if (!built || !evaluated) {
        if (!built) {
            logEscaped(r->connection->log,
                       "failed to run set_by_lua*: " + err);
        }
        lua_settop(L, base);
        e->ip = scriptExit();
        e->status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return;
    }

    ngx_int_t rc = runSync(ctx, Phase::Set, step->handler, r->connection->log,
                           1);
    // Cannot fail: the field exists, so no allocation.
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, "luaguard.set_args");

    ngx_http_variable_value_t *v = e->sp;
    if (rc != NGX_OK) {
        lua_settop(L, base);
        e->ip = scriptExit();
        e->status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return;
    }

    size_t len = 0;
    const char *s = "";
    if (lua_gettop(L) > base && !lua_isnil(L, -1)) {
        // A number is converted to a string in place: an allocation.
        entry::protect(L, [&] { s = lua_tolstring(L, -1, &len); }, &err);
    }
    // A Lua-written variable: add_header or proxy_set_header may send it.
    ngx_str_t data;
    if (!copyVariableValue(r->pool, reinterpret_cast<char *>(
                                        step->target.data),
                           step->target.len, s ? s : "", len, &data))
    {
        lua_settop(L, base);
        e->ip = scriptExit();
        e->status = NGX_HTTP_INTERNAL_SERVER_ERROR;
        return;
    }
    lua_settop(L, base);

    v->data = data.data;
    v->len = data.len;
    v->valid = 1;
    v->no_cacheable = 0;
    v->not_found = 0;
    e->sp++;
}

void logFromLua(lua_State *L, ngx_uint_t level, const char *msg, size_t len,
                int stack_level)
{
    ngx_log_t *log = currentLog();
    if (log->log_level < level) {
        return;
    }
    std::string text;
    lua_Debug ar;
    if (lua_getstack(L, stack_level, &ar) && lua_getinfo(L, "nSl", &ar)) {
        // lua-nginx-module's prefix: a file's name without its directory,
        // the line, and the function's name when Lua knows it. Names are
        // the script's choice (load(code, "=..."), fields): escaped.
        const char *src = ar.source[0] == '@'
                              ? std::strrchr(ar.short_src, '/') : nullptr;
        src = src ? src + 1 : ar.short_src;
        appendLogEscaped(text, src, std::strlen(src));
        text.push_back(':');
        text.append(std::to_string(ar.currentline));
        text.append(": ");
        if (ar.name != nullptr && *ar.name != '\0') {
            appendLogEscaped(text, ar.name, std::strlen(ar.name));
            text.append("(): ");
        }
    }
    appendLogEscaped(text, msg, len);
    ngx_log_error(level, log, 0, "[lua] %s", text.c_str());
}

}  // namespace glue
}  // namespace luaguard
