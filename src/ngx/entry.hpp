// The one way nginx enters Lua.
//
// Every nginx callback that runs Lua goes through here: a Scope sets up
// the run (which request and phase API code sees, and the budget its time
// and memory are charged to), protect() runs glue-side Lua work (building
// a stack, instantiating a handler, pushing results) so that no Lua error
// or C++ exception unwinds into nginx's C frames, and resume() hands a
// waiting thread its results, pushed under the same protection.
//
// The unwinding contract (docs/ARCHITECTURE.md): luaguard's LuaJIT unwinds
// externally (DWARF, x64 and arm64 with GCC or clang), so a Lua error
// raised through a C++ frame runs its destructors, and a `catch (...)`
// catches a Lua error raised outside any lua_pcall/lua_resume, with the
// message left on the top of the raising state's stack.
// tests/unit/unwind_test.cpp proves both with the LuaJIT we build.
#pragma once

#include <exception>
#include <string>
#include <type_traits>

#include "ngx/module.hpp"
#include "ngx/thread.hpp"

namespace luaguard::entry {

// What one run of Lua needs in force while it runs, set up in this
// order and torn down in reverse: g_run (request, phase, thread) and the
// budget frame charging `ctx`'s usage under ctx->limits, in the request's
// VM. Without a request (init, init_worker, exit_worker: in `vm`, the
// default VM when null) nothing is charged.
class Scope {
 public:
    Scope(RequestCtx *ctx, Phase phase, LuaThread *thread = nullptr,
          Vm *vm = nullptr);
    Scope(const Scope &) = delete;
    Scope &operator=(const Scope &) = delete;

 private:
    static const budget::Limits &limitsOf(RequestCtx *ctx);
    static Vm *vmOf(RequestCtx *ctx, Vm *vm);

    RunScope       run_;
    budget::Usage  scratch_;
    budget::Scope  charge_;
};

// The message of the error object on top of L, when there is one above
// `top`.
std::string caughtText(lua_State *L, int top);

// Runs `f` (glue-side work on L) protected. Returns true when it
// completed; false with *err set when a Lua error or a C++ exception ended
// it, L's stack cut back to where it was.
template <typename F>
bool protect(lua_State *L, F &&f, std::string *err)
{
    int top = lua_gettop(L);
    try {
        f();
        return true;
    } catch (const std::exception &e) {
        *err = e.what();
    } catch (...) {
        *err = caughtText(L, top);  // a Lua error, left on L by LuaJIT
    }
    lua_settop(L, top);
    return false;
}

// Resumes `t` with `n` values already on its stack and drives its
// request (or timer) on when that ended the phase. Only for values pushed
// where a failure is caught (see resume(t, push)); 0 for none.
void resumeWith(LuaThread *t, int n);

// Ends `t`, which waits and can no longer be resumed, as if it had raised
// `msg`, and drives its request on.
void fail(LuaThread *t, const std::string &msg);

// Resumes `t` with the values `push(co)` pushes on its stack (returning
// their count). A push that fails (out of memory) ends the thread with
// that error instead: the script sees a failed thread, never a worker
// that died.
template <typename Push>
void resume(LuaThread *t, Push &&push)
{
    int n = 0;
    std::string err;
    lua_State *co = t->co;
    if (!protect(co, [&] { n = push(co); }, &err)) {
        fail(t, err);
        return;
    }
    resumeWith(t, n);
}

// ---- the edges: functions nginx calls ----

// Logs (at alert: it is always a bug) what a callback let escape.
void caught(const char *what) noexcept;

// What an nginx callback returns when it failed.
template <typename R>
R failed() noexcept
{
    if constexpr (std::is_same_v<R, char *>) {
        return static_cast<char *>(NGX_CONF_ERROR);
    } else if constexpr (std::is_pointer_v<R>) {
        return nullptr;
    } else {
        return static_cast<R>(NGX_ERROR);
    }
}

template <auto F>
struct Edge;

template <typename R, typename... A, R (*F)(A...)>
struct Edge<F> {
    static R call(A... a) noexcept
    {
        try {
            return F(a...);
        } catch (const std::exception &e) {
            caught(e.what());
        } catch (...) {
            caught("a Lua error outside a protected call");
        }
        if constexpr (!std::is_void_v<R>) {
            return failed<R>();
        }
    }
};

// `edge<f>` is `f` for nginx: same signature, but nothing it throws (a
// C++ exception, a Lua error raised outside a protected call) unwinds
// into nginx's C frames. Every function pointer handed to nginx (event
// and request handlers, phase handlers, filters, directive setters,
// configuration and process callbacks, pool cleanups that run Lua) is
// one.
template <auto F>
constexpr auto edge = &Edge<F>::call;

// lua_atpanic's backstop: a Lua error that found no protected call. Logs
// it and ends the worker (LuaJIT exits once the panic function returns).
int panic(lua_State *L);

}  // namespace luaguard::entry
