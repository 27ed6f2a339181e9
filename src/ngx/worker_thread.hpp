// ngx.run_worker_thread: a function of a Lua module runs on a thread of an
// nginx thread pool (`thread_pool`), in a VM of its own taken from a pool
// of VMs per worker and per calling VM (`lua_worker_thread_vm_pool_size`),
// while the calling Lua thread waits. Values cross between the two VMs as
// copies (Value). docs/api.md and docs/compatibility.md say what the
// thread VMs have and how the budgets and lua_sandbox apply in them.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "ngx/module.hpp"

namespace luaguard::wthread {

// A Lua value copied out of one VM to be pushed into another: nil,
// booleans, numbers, strings, light userdata (ngx.null) and tables of
// those, as lua-nginx-module copies them.
struct Value {
    enum Type : uint8_t { Nil, Boolean, Number, String, Pointer, Table };
    Type                                  type = Nil;
    bool                                  boolean = false;
    lua_Number                            number = 0;
    void                                 *pointer = nullptr;
    std::string                           string;
    std::vector<std::pair<Value, Value>>  table;
};

// Copies the values at stack slots [from, to] of L into `out`. False with
// *err set to lua-nginx-module's text ("unsupported Lua type:
// LUA_TFUNCTION in the argument", ...) when one cannot cross; `what` is
// "argument" or "return value". Light userdata cross as arguments only
// (a result is nil), as in lua-nginx-module.
bool copyValues(lua_State *L, int from, int to, const char *what,
                std::vector<Value> *out, std::string *err);

// Pushes a copy made by copyValues.
void pushValue(lua_State *L, const Value &v);

// Posts module_name.func_name(args...) to the thread pool `pool` for the
// waiting thread `t` of `ctx` (its coroutine yields next), which is
// resumed with true and the results, or false and an error. False with
// *err set (lua-nginx-module's text: "thread pool X not found", "no
// available Lua vm") when nothing was posted.
bool post(RequestCtx *ctx, LuaThread *t, const ngx_str_t &pool,
          std::string module, std::string func, std::vector<Value> args,
          std::string *err);

}  // namespace luaguard::wthread
