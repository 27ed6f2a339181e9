// Request isolation and capability profiles (`lua_sandbox`).
//
// Two mechanisms, see docs/security.md:
//  - isolation: request code runs in its own global table whose reads fall
//    through to a per-profile *view* of the worker's globals (library
//    tables behind read-only proxies, a few base functions wrapped); built
//    once per profile and VM, so a request costs one table;
//  - capabilities: what a location may do. Static ones (ffi, debug,
//    bytecode) are enforced by the view; dynamic ones are checked when the
//    API runs, against the policy of the running request (io and os
//    functions, C modules and binary modules in `require`, ngx.exec, and
//    later sockets, subrequests, timers, shared dicts via require()).
//
// No nginx here: the policy and environment of the running request come
// through hooks set by src/security/ngx_sandbox.cpp.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/lua.hpp"
#include "runtime/vm.hpp"

namespace luaguard::sandbox {

enum class Capability : uint8_t {
    Io,          // io.*, loadfile, dofile: files and process pipes
    Os,          // os.execute, exit, getenv, remove, rename, tmpname
    Ffi,         // require "ffi"
    Debug,       // the debug library beyond traceback/getinfo, jit.*
    Bytecode,    // binary chunks: load*, require, *_by_lua_file
    Loadlib,     // package.loadlib
    Cmodule,     // C modules through require
    Socket,      // ngx.socket.*
    Subrequest,  // ngx.location.capture*
    Timer,       // ngx.timer.*, ngx.thread.*
    Shared,      // ngx.shared.DICT (optionally a list of names)
    Exec,        // ngx.exec, ngx.redirect
    Pipe,        // ngx.pipe.spawn: starting processes
    Count
};

constexpr int kCapabilityCount = static_cast<int>(Capability::Count);

const char *capabilityName(Capability c);
bool capabilityFromName(std::string_view name, Capability *out);

struct Policy {
    bool                     isolate = true;    // false: `lua_sandbox off`
    bool                     strict = false;    // the allowlisted view
    uint32_t                 allowed = 0;       // bit per Capability
    std::vector<std::string> shared_dicts;      // empty: every dict
    std::vector<std::string> shared_readonly;   // listed as name:ro
    std::string              label;             // "strict +socket"

    // The env metatable built for this policy, per VM (per worker); VMs
    // past the cache find it in their registry under the policy's address.
    mutable VmRefs           metas = {};

    bool allows(Capability c) const
    {
        return allowed & (1u << static_cast<int>(c));
    }
};

// The policy a location gets when nothing is configured.
const Policy &defaultPolicy();

// Parses the arguments of `lua_sandbox` (without the directive name).
bool parse(const std::vector<std::string> &args, Policy *out,
           std::string *err);

// ---- the running request (hooks set by the nginx glue) ----

// Null means "not in a request" (init, init_worker): everything allowed.
using CurrentPolicyFn = const Policy *(*)();
// Pushes the running request's global table; returns false (pushing
// nothing) without one. The table is then handed to Lua code: it has
// escaped (below).
using PushEnvFn = bool (*)(lua_State *L);
// Tells that the running request's global table may be reachable from
// something that outlives the request (getfenv, _G, a handler closure
// held as a value): it must never become another request's.
using EnvEscapesFn = void (*)();

void setHooks(CurrentPolicyFn policy, PushEnvFn env,
              EnvEscapesFn escapes = nullptr);
const Policy *currentPolicy();

// Lua that runs on a thread other than the worker's (the VMs of
// ngx.run_worker_thread) gets `p` as its policy for everything it calls
// on this thread: the hooks read the worker's running request and must
// not be called from it; its refusals are not counted. Null: back to the
// hooks.
void setThreadPolicy(const Policy *p);

// Raises "capability 'X' is not allowed in this location (lua_sandbox P)"
// and counts it when the running request's policy lacks `c`. For APIs
// implemented in C++: call it first thing.
void require(lua_State *L, Capability c);

// `shared` plus the dictionary name check, for ngx.shared.DICT: raises
// when the running code may not use `dict` (or not write to it).
void requireShared(lua_State *L, std::string_view dict, bool write = true);

// The same check without raising, for the FFI fast path of shared dicts.
// Inline for the usual policy, which grants every dictionary read-write.
bool sharedAllowedListed(const Policy *p, std::string_view dict, bool write);

inline bool sharedAllowed(std::string_view dict, bool write)
{
    const Policy *p = currentPolicy();
    if (p == nullptr) {
        return true;
    }
    if (p->allows(Capability::Shared) && p->shared_dicts.empty()
        && p->shared_readonly.empty())
    {
        return true;
    }
    return sharedAllowedListed(p, dict, write);
}

// Per-worker refusal counters, for the metrics endpoint.
void countRefusal(Capability c);
uint64_t refusals(Capability c);
uint64_t totalRefusals();

// Told of every refusal (the metrics of the nginx side, which knows the
// running request's location).
using RefusalHookFn = void (*)(Capability c);
void setRefusalHook(RefusalHookFn fn);

// ---- the VM side ----

// Wraps the dynamic checks into the worker's globals and prepares the
// view builder. Once per VM, after the ngx table and the prelude exist.
bool install(lua_State *L, std::string *err);

// Pushes a fresh request environment for `p` (which must isolate): one
// table whose metatable is the policy's prebuilt one. False, pushing
// nothing, when the view could not be built (out of memory).
bool pushNewEnv(lua_State *L, const Policy *p);
// Builds `p`'s view in L's VM now (pushNewEnv would build it at its
// first call, inside a request's time slice). False when it failed.
bool prepareEnv(lua_State *L, const Policy *p);
// Why the last pushNewEnv or prepareEnv failed.
const std::string &envError();

}  // namespace luaguard::sandbox
