#include "ngx/worker_thread.hpp"

#include <ngx_thread_pool.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "api/api.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"
#include "security/budget.hpp"
#include "security/ngx_sandbox.hpp"
#include "security/sandbox.hpp"

namespace luaguard::wthread {

namespace {

// lua-nginx-module's limit: a table nested this deep (or a cycle) does
// not cross.
constexpr int kMaxDepth = 100;

bool copyOne(lua_State *L, int idx, int depth, const char *what, Value *out,
             std::string *err)
{
    switch (lua_type(L, idx)) {
    case LUA_TNIL:
        out->type = Value::Nil;
        return true;
    case LUA_TBOOLEAN:
        out->type = Value::Boolean;
        out->boolean = lua_toboolean(L, idx);
        return true;
    case LUA_TNUMBER:
        out->type = Value::Number;
        out->number = lua_tonumber(L, idx);
        return true;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        out->type = Value::String;
        out->string.assign(s, len);
        return true;
    }
    case LUA_TLIGHTUSERDATA:
        out->type = Value::Pointer;
        out->pointer = lua_touserdata(L, idx);
        return true;
    case LUA_TTABLE:
        break;
    case LUA_TFUNCTION:
        *err = std::string("unsupported Lua type: LUA_TFUNCTION in the ")
               + what;
        return false;
    case LUA_TUSERDATA:
        *err = std::string("unsupported Lua type: LUA_TUSERDATA in the ")
               + what;
        return false;
    case LUA_TTHREAD:
        *err = std::string("unsupported Lua type: LUA_TTHREAD in the ")
               + what;
        return false;
    default:  // cdata
        *err = std::string("unsupported Lua type in the ") + what;
        return false;
    }

    if (depth + 1 >= kMaxDepth) {   // the 100th level fails
        *err = std::string("suspicious circular references, table depth "
                           "exceed max depth: 100 in the ") + what;
        return false;
    }
    if (idx < 0) {
        idx = lua_gettop(L) + idx + 1;
    }
    luaL_checkstack(L, 3, "table too deep");
    out->type = Value::Table;
    lua_pushnil(L);
    while (lua_next(L, idx) != 0) {
        out->table.emplace_back();
        auto &kv = out->table.back();
        if (!copyOne(L, -2, depth + 1, what, &kv.first, err)
            || !copyOne(L, -1, depth + 1, what, &kv.second, err))
        {
            lua_pop(L, 2);
            return false;
        }
        lua_pop(L, 1);
    }
    return true;
}

}  // namespace

bool copyValues(lua_State *L, int from, int to, const char *what,
                std::vector<Value> *out, std::string *err)
{
    out->reserve(out->size() + (to >= from ? to - from + 1 : 0));
    for (int i = from; i <= to; i++) {
        out->emplace_back();
        if (!copyOne(L, i, 0, what, &out->back(), err)) {
            return false;
        }
    }
    return true;
}

void pushValue(lua_State *L, const Value &v)
{
    luaL_checkstack(L, 3, "table too deep");
    switch (v.type) {
    case Value::Nil:
        lua_pushnil(L);
        break;
    case Value::Boolean:
        lua_pushboolean(L, v.boolean);
        break;
    case Value::Number:
        lua_pushnumber(L, v.number);
        break;
    case Value::String:
        lua_pushlstring(L, v.string.data(), v.string.size());
        break;
    case Value::Pointer:
        lua_pushlightuserdata(L, v.pointer);
        break;
    case Value::Table:
        lua_createtable(L, 0, static_cast<int>(v.table.size()));
        for (const auto &kv : v.table) {
            pushValue(L, kv.first);
            pushValue(L, kv.second);
            lua_rawset(L, -3);
        }
        break;
    }
}

namespace {

// Why a thread VM's run was stopped (Task::stop).
enum Stop : int { kNone, kTime, kMemory, kVmMemory, kExiting };

struct Pool;

// One call, from ngx.run_worker_thread to the resume of its caller. Heap
// owned: nginx's thread pool cannot take a task back, so a task outlives
// a request that ended while it ran (`thread` is then null) and is freed
// by its completion handler, on the worker's thread.
struct Task {
    ngx_thread_task_t       ntask{};
    Pool                   *pool = nullptr;
    Vm                     *vm = nullptr;
    LuaThread              *thread = nullptr;
    const sandbox::Policy  *policy = nullptr;
    std::string             module;
    std::string             func;
    std::vector<Value>      args;
    // Results, made on the pool's thread, read once the task completed.
    bool                    ok = false;
    std::vector<Value>      results;
    std::string             err;
    bool                    discard = false;   // the VM is not reused
    // Budgets: wall time of the run (0: none), memory of the run.
    uint64_t                limit_ms = 0;
    uint64_t                deadline_ns = 0;
    int64_t                 memory_limit = 0;
    int64_t                 charge = 0;
    std::atomic<int>        stop{kNone};
    std::atomic<bool>       orphan{false};   // `thread` gone (the watchdog
                                             // reads this, not `thread`)
};

// The VMs of one calling VM (a lua_vm tenant, or the default VM): modules
// one tenant loads into a thread VM are never seen by another's calls.
struct Pool {
    std::vector<Vm *> idle;
    ngx_uint_t        live = 0;   // idle and busy
};

// Per worker, worker thread only.
std::unordered_map<Vm *, Pool> *g_pools;

thread_local Task *t_task = nullptr;   // the task this pool thread runs

// ---- stopping a run: the watchdog and the hook ----

void stopHook(lua_State *L, lua_Debug *ar)
{
    Task *task = t_task;
    int why = task ? task->stop.load() : kExiting;
    lua_getinfo(L, "Sl", ar);
    const char *src = ar->short_src;
    int line = ar->currentline;
    // Raised at every instruction until the run is over: a pcall in the
    // module cannot swallow it.
    switch (why) {
    case kTime:
        luaL_error(L, "luaguard: %s exceeded: the worker thread ran %d ms, "
                   "stopped at %s:%d",
                   budget::kindName(budget::Kind::Total),
                   static_cast<int>(task->limit_ms), src, line);
        break;
    case kMemory:
    case kVmMemory:
        luaL_error(L, "not enough memory (luaguard: %s exceeded, stopped at "
                   "%s:%d)",
                   budget::kindName(why == kMemory ? budget::Kind::Memory
                                                   : budget::Kind::VmMemory),
                   src, line);
        break;
    default:
        luaL_error(L, "luaguard: the worker is exiting, stopped at %s:%d",
                   src, line);
    }
}

void trip(Task *task, int why)
{
    int none = kNone;
    if (task->stop.compare_exchange_strong(none, why)) {
        // lua_sethook is the one LuaJIT call made for other contexts (the
        // budget's signal handler uses it likewise); the checkhook build
        // makes compiled traces see it.
        lua_sethook(task->vm->L(), stopHook, LUA_MASKCOUNT, 1);
    }
}

// The thread that stops runs past their deadline, and the runs nobody
// waits for any more when the worker exits (nginx waits for its pool's
// threads before the process ends), every run on a fast shutdown. Added
// and removed under `mu`, so it never hooks a VM whose run is over.
struct Watchdog {
    std::mutex               mu;
    std::condition_variable  cv;
    std::vector<Task *>      running;
    bool                     started = false;

    // False when the run cannot be watched (out of memory, no thread).
    bool add(Task *task)
    {
        std::lock_guard<std::mutex> lock(mu);
        try {
            running.push_back(task);
            if (!started) {
                // Detached and never freed: it may still hold `mu` while
                // the process exits.
                std::thread([this] { loop(); }).detach();
                started = true;
            }
        } catch (...) {
            if (!running.empty() && running.back() == task) {
                running.pop_back();
            }
            return false;
        }
        cv.notify_one();
        return true;
    }

    void remove(Task *task)
    {
        std::lock_guard<std::mutex> lock(mu);
        for (size_t i = 0; i < running.size(); i++) {
            if (running[i] == task) {
                running[i] = running.back();
                running.pop_back();
                break;
            }
        }
    }

    void loop()
    {
        std::unique_lock<std::mutex> lock(mu);
        for (;;) {
            if (running.empty()) {
                cv.wait(lock);
                continue;
            }
            cv.wait_for(lock, std::chrono::milliseconds(10));
            uint64_t now = budget::nowNs();
            bool terminate = ngx_terminate;
            bool exiting = ngx_exiting || ngx_quit;
            for (Task *task : running) {
                if (terminate || (exiting && task->orphan.load())) {
                    trip(task, kExiting);
                } else if (task->deadline_ns && now >= task->deadline_ns) {
                    trip(task, kTime);
                }
            }
        }
    }
};

Watchdog *g_watchdog = new Watchdog();

// MemoryAccount::on_over of the thread VMs: called by the allocator on
// the pool's thread, in the run that went over.
void memoryOver(bool request_limit)
{
    if (t_task) {
        trip(t_task, request_limit ? kMemory : kVmMemory);
    }
}

// ---- the run, on a thread of the pool ----

int loadModule(lua_State *L)
{
    auto *task = static_cast<Task *>(lua_touserdata(L, 1));
    lua_getglobal(L, "require");
    lua_pushlstring(L, task->module.data(), task->module.size());
    lua_call(L, 1, 1);
    if (!lua_istable(L, -1)) {
        lua_pushliteral(L, "invalid lua module");
        return lua_error(L);
    }
    return 1;
}

// The module table at 2.
int callFunction(lua_State *L)
{
    auto *task = static_cast<Task *>(lua_touserdata(L, 1));
    lua_pushlstring(L, task->func.data(), task->func.size());
    lua_gettable(L, 2);
    if (!lua_isfunction(L, -1)) {
        lua_pushliteral(L, "invalid function");
        return lua_error(L);
    }
    luaL_checkstack(L, static_cast<int>(task->args.size()) + 8,
                    "too many arguments");
    for (const Value &v : task->args) {
        pushValue(L, v);
    }
    lua_call(L, static_cast<int>(task->args.size()), LUA_MULTRET);
    // Copied here, protected: running out of memory fails the call.
    if (!copyValues(L, 3, lua_gettop(L), "return value", &task->results,
                    &task->err))
    {
        lua_pushlstring(L, task->err.data(), task->err.size());
        return lua_error(L);
    }
    task->ok = true;
    return 0;
}

// Globals as they were before the call (table at 1): what the call set
// goes, what it changed comes back, so the next call on this VM never
// sees it (lua-nginx-module keeps them). Modules it loaded stay, as they
// do in the worker's VM.
int restoreGlobals(lua_State *L)
{
    lua_pushnil(L);
    while (lua_next(L, LUA_GLOBALSINDEX) != 0) {
        lua_pop(L, 1);
        lua_pushvalue(L, -1);
        lua_rawget(L, 1);
        bool had = !lua_isnil(L, -1);
        lua_pop(L, 1);
        if (!had) {
            lua_pushvalue(L, -1);
            lua_pushnil(L);
            lua_rawset(L, LUA_GLOBALSINDEX);
        }
    }
    lua_pushnil(L);
    while (lua_next(L, 1) != 0) {
        lua_pushvalue(L, -2);
        lua_rawget(L, LUA_GLOBALSINDEX);
        bool same = lua_rawequal(L, -1, -2);
        lua_pop(L, 1);
        if (!same) {
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_rawset(L, LUA_GLOBALSINDEX);
        } else {
            lua_pop(L, 1);
        }
    }
    return 0;
}

int snapshotGlobals(lua_State *L)
{
    lua_newtable(L);
    lua_pushnil(L);
    while (lua_next(L, LUA_GLOBALSINDEX) != 0) {
        lua_pushvalue(L, -2);
        lua_insert(L, -2);
        lua_rawset(L, -4);
    }
    return 1;
}

std::string errorOf(lua_State *L)
{
    size_t len = 0;
    const char *s = lua_type(L, -1) == LUA_TSTRING
                        || lua_type(L, -1) == LUA_TNUMBER
                        ? lua_tolstring(L, -1, &len) : "";
    return std::string(s, len);
}

void runTask(void *data, ngx_log_t *)
{
    auto *task = static_cast<Task *>(data);
    lua_State *L = task->vm->L();
    MemoryAccount &m = task->vm->memory();
    t_task = task;
    task->vm->limitCStack();
    sandbox::setThreadPolicy(task->policy);
    m.setCharge(&task->charge, task->memory_limit,
                MemoryAccount::hardLimit(task->memory_limit));
    m.refused = false;
    if (task->limit_ms) {
        task->deadline_ns = budget::nowNs() + task->limit_ms * 1000000;
    }
    int top = lua_gettop(L);
    int rc = LUA_ERRMEM;
    // A run nothing could stop does not start.
    bool started = g_watchdog->add(task) && lua_checkstack(L, 8);
    if (started) {
        lua_pushcfunction(L, loadModule);
        lua_pushlightuserdata(L, task);
        rc = lua_pcall(L, 1, 1, 0);
    } else {
        task->err = "not enough memory";
    }
    if (started && rc == 0) {
        // top+1: the module
        lua_pushcfunction(L, snapshotGlobals);
        rc = lua_pcall(L, 0, 1, 0);
        if (rc == 0) {
            // top+2: the globals before the call
            lua_pushcfunction(L, callFunction);
            lua_pushlightuserdata(L, task);
            lua_pushvalue(L, top + 1);
            rc = lua_pcall(L, 2, 0, 0);
            if (rc != 0) {
                task->ok = false;
                task->err = errorOf(L);
            }
            lua_settop(L, top + 2);
            lua_pushcfunction(L, restoreGlobals);
            lua_pushvalue(L, top + 2);
            if (lua_pcall(L, 1, 0, 0) != 0) {
                task->discard = true;   // globals half restored
            }
        } else {
            task->err = errorOf(L);
        }
    } else if (started) {
        task->err = errorOf(L);
    }
    if (!task->ok) {
        task->results.clear();
    }

    g_watchdog->remove(task);
    if (task->stop.load() != kNone || m.refused || rc == LUA_ERRMEM) {
        task->discard = true;   // its hook raises forever; its heap is suspect
    }
    lua_settop(L, top);
    m.setCharge(nullptr, 0, 0);
    sandbox::setThreadPolicy(nullptr);
    t_task = nullptr;
}

// ---- the VMs ----

void closeVm(Vm *vm)
{
    // A stopped VM's hook would raise in the finalizers lua_close runs.
    lua_sethook(vm->L(), nullptr, 0, 0);
    delete vm;
}

// A new thread VM for calls from `caller`: the API subset, the caller's
// package paths and memory ceiling, lua_sandbox's dynamic checks.
Vm *newVm(Vm *caller, std::string *err)
{
    auto vm = std::make_unique<Vm>();
    if (!vm->open(err) || !api::openThreadVm(vm->L(), caller->L(), err)) {
        return nullptr;
    }
#ifdef LUAGUARD_CHECKHOOK
    // trip() hooks this VM from the watchdog thread, where its compiled
    // loops cannot be patched: they keep their hook test.
    luaguard_jit_hookreal(vm->L(), 1);
#endif
    vm->memory().setCeiling(caller->memory().ceiling);
    vm->memory().on_over = memoryOver;
    return vm.release();
}

Vm *takeVm(Pool *pool, Vm *caller, std::string *err)
{
    if (!pool->idle.empty()) {
        Vm *vm = pool->idle.back();
        pool->idle.pop_back();
        return vm;
    }
    MainConf *mcf = mainConf();
    if (pool->live >= static_cast<ngx_uint_t>(
                          mcf->worker_thread_vm_pool_size))
    {
        *err = "no available Lua vm";
        return nullptr;
    }
    Vm *vm = newVm(caller, err);
    if (vm) {
        pool->live++;
    }
    return vm;
}

void giveVm(Pool *pool, Vm *vm, bool discard)
{
    if (discard) {
        pool->live--;
        closeVm(vm);
        return;
    }
    pool->idle.push_back(vm);
}

// ---- back on the worker's thread ----

void cancelWait(LuaThread *t)
{
    auto *task = static_cast<Task *>(t->cancel_data);
    task->thread = nullptr;   // the completion frees the task alone
    task->orphan = true;
    t->cancel = nullptr;
    t->cancel_data = nullptr;
}

void taskDone(ngx_event_t *ev)
{
    std::unique_ptr<Task> task(static_cast<Task *>(ev->data));
    giveVm(task->pool, task->vm, task->discard);
    task->vm = nullptr;
    LuaThread *t = task->thread;
    if (t == nullptr) {
        return;   // its request is gone
    }
    t->cancel = nullptr;
    t->cancel_data = nullptr;
    entry::resume(t, [&](lua_State *co) {
        if (!task->ok) {
            lua_pushboolean(co, 0);
            lua_pushlstring(co, task->err.data(), task->err.size());
            return 2;
        }
        luaL_checkstack(co, static_cast<int>(task->results.size()) + 1,
                        "too many results");
        lua_pushboolean(co, 1);
        for (const Value &v : task->results) {
            // lua-nginx-module hands light userdata back as nil.
            if (v.type == Value::Pointer) {
                lua_pushnil(co);
            } else {
                pushValue(co, v);
            }
        }
        return static_cast<int>(task->results.size()) + 1;
    });
}

}  // namespace

bool post(RequestCtx *ctx, LuaThread *t, const ngx_str_t &pool_name,
          std::string module, std::string func, std::vector<Value> args,
          std::string *err)
{
    ngx_str_t name = pool_name;
    ngx_thread_pool_t *tp = ngx_thread_pool_get(
        const_cast<ngx_cycle_t *>(ngx_cycle), &name);
    if (tp == nullptr) {
        *err = "thread pool " + std::string(reinterpret_cast<char *>(
                                                name.data), name.len)
               + " not found";
        return false;
    }

    if (g_pools == nullptr) {
        g_pools = new std::unordered_map<Vm *, Pool>();
    }
    Pool *pool = &(*g_pools)[ctx->vm];

    auto task = std::make_unique<Task>();
    task->vm = takeVm(pool, ctx->vm, err);
    if (task->vm == nullptr) {
        return false;
    }
    task->pool = pool;
    task->thread = t;
    task->policy = sandbox::policyOf(ctx->llcf);
    task->module = std::move(module);
    task->func = std::move(func);
    task->args = std::move(args);
    task->limit_ms = ctx->llcf->limits.total_ms;
    task->memory_limit = ctx->llcf->limits.memory;

    ngx_thread_task_t *nt = &task->ntask;
    nt->ctx = task.get();
    nt->handler = runTask;
    nt->event.data = task.get();
    nt->event.handler = entry::edge<taskDone>;
    nt->event.log = ngx_cycle->log;
    if (ngx_thread_task_post(tp, nt) != NGX_OK) {
        giveVm(pool, task->vm, false);
        *err = "failed to post the task to thread pool "
               + std::string(reinterpret_cast<char *>(name.data), name.len);
        return false;
    }
    t->cancel = cancelWait;
    t->cancel_data = task.release();
    return true;
}

}  // namespace luaguard::wthread
