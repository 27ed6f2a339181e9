#include "security/sandbox.hpp"

#include <sys/random.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>

#include "runtime/code.hpp"
#include "runtime/lj_cells.h"
#include "runtime/embedded.hpp"

namespace luaguard::sandbox {

namespace {

const char *const kNames[kCapabilityCount] = {
    "io", "os", "ffi", "debug", "bytecode", "loadlib", "cmodule", "socket",
    "subrequest", "timer", "shared", "exec", "pipe"};

constexpr uint32_t bit(Capability c)
{
    return 1u << static_cast<int>(c);
}

constexpr uint32_t kAll = (1u << kCapabilityCount) - 1;

// `default`: what a lua-nginx-module script needs, minus loading binary
// chunks from request code and package.loadlib.
constexpr uint32_t kDefault = kAll & ~(bit(Capability::Bytecode)
                                       | bit(Capability::Loadlib));

// `strict`: tenant code. No files, processes, ffi, debug, binary chunks,
// native code or shared dictionaries unless granted by name.
constexpr uint32_t kStrict = bit(Capability::Socket)
                             | bit(Capability::Subrequest)
                             | bit(Capability::Timer)
                             | bit(Capability::Exec);

CurrentPolicyFn g_policy_hook = nullptr;
PushEnvFn g_env_hook = nullptr;
EnvEscapesFn g_escape_hook = nullptr;
uint64_t g_refusals[kCapabilityCount];
RefusalHookFn g_refusal_hook = nullptr;
// Set on a thread that is not the worker's (setThreadPolicy).
thread_local bool t_foreign = false;
thread_local const Policy *t_policy = nullptr;
// Whether any thread ever set a policy of its own: until one does,
// currentPolicy() does not read t_foreign (a __tls_get_addr call from a
// shared object, on every capability check). A thread that sets one sees
// its own store of true before its reads of t_foreign.
std::atomic<bool> g_foreign_seen{false};

bool foreignThread()
{
    return g_foreign_seen.load(std::memory_order_relaxed) && t_foreign;
}

// Every refusal is counted here: the per-worker counter and the metrics.
void bump(Capability c)
{
    if (t_foreign) {
        return;  // the counters and the metrics hook are the worker's
    }
    g_refusals[static_cast<int>(c)]++;
    if (g_refusal_hook) {
        g_refusal_hook(c);
    }
}

char kBuilderKey;
char kClosureEnvKey;

// Why the views of a policy could not be built (a budget stop while the
// first request of a worker builds them, say): for the request's log line.
std::string g_env_error;

const Policy *makeDefault()
{
    static Policy p;
    p.isolate = true;
    p.allowed = kDefault;
    p.label = "default";
    return &p;
}

[[noreturn]] void raise(lua_State *L, int level, const std::string &msg)
{
    luaL_where(L, level);
    lua_pushlstring(L, msg.data(), msg.size());
    lua_concat(L, 2);
    lua_error(L);
    __builtin_unreachable();
}

std::string refusalText(Capability c, const Policy *p)
{
    return std::string("capability '") + capabilityName(c)
           + "' is not allowed in this location (lua_sandbox "
           + p->label + ")";
}

void refuseAt(lua_State *L, int level, Capability c, const Policy *p)
{
    bump(c);
    raise(L, level, refusalText(c, p));
}

Capability checkCapability(lua_State *L, int idx)
{
    Capability c;
    size_t len;
    const char *name = luaL_checklstring(L, idx, &len);
    if (!capabilityFromName(std::string_view(name, len), &c)) {
        luaL_error(L, "unknown capability '%s'", name);
    }
    return c;
}

// ---- helpers handed to the Lua half ----

int luaAllowed(lua_State *L)
{
    Capability c = checkCapability(L, 1);
    const Policy *p = currentPolicy();
    lua_pushboolean(L, p == nullptr || p->allows(c));
    return 1;
}

// refuse(cap [, level]): raises at `level` (2, the default: the caller of
// the Lua function that called refuse).
int luaRefuse(lua_State *L)
{
    Capability c = checkCapability(L, 1);
    int level = static_cast<int>(luaL_optinteger(L, 2, 2));
    const Policy *p = currentPolicy();
    if (p == nullptr) {
        p = &defaultPolicy();  // unreachable in practice: nothing refuses
    }
    refuseAt(L, level, c, p);
    return 0;
}

void envEscapes()
{
    if (!t_foreign && g_escape_hook) {
        g_escape_hook();
    }
}

// escaped(f): request code holds `f` as a value (see lua/sandbox.lua);
// through it, the environment of the request that runs it.
int luaEscaped(lua_State *L)
{
    if (lua_isfunction(L, 1)) {
        markEscaped(L, 1);
        envEscapes();
    }
    return 0;
}

// env_escapes(): the running request's globals were handed out.
int luaEnvEscapes(lua_State *)
{
    envEscapes();
    return 0;
}

int luaCurrentEnv(lua_State *L)
{
    if (!foreignThread() && g_env_hook && g_env_hook(L)) {
        return 1;
    }
    lua_pushnil(L);
    return 1;
}

// strict(): whether the running code is strict code (its view is the
// allowlist). For the few worker-wide functions that behave differently
// for it (string.dump, string.format's %p and addresses).
int luaStrict(lua_State *L)
{
    const Policy *p = currentPolicy();
    lua_pushboolean(L, p != nullptr && p->strict);
    return 1;
}

// closure_env(t): the environment LuaJIT gives a closure without globals
// that request code makes (lua/sandbox.lua). Held in the registry for as
// long as the VM lives, as the patch asks.
int luaClosureEnv(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
#ifdef LUAGUARD_CHECKHOOK
    lua_pushlightuserdata(L, &kClosureEnvKey);
    lua_pushvalue(L, 1);
    lua_rawset(L, LUA_REGISTRYINDEX);
    luaguard_closure_env(L, 1);
#endif
    return 0;
}

// seed(): four 32-bit words from the kernel's CSPRNG, for a request's own
// math.random state: nothing another request can observe predicts them.
int luaSeed(lua_State *L)
{
    uint32_t w[4];
    size_t got = 0;
    while (got < sizeof(w)) {
        ssize_t n = getrandom(reinterpret_cast<char *>(w) + got,
                              sizeof(w) - got, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return luaL_error(L, "getrandom() failed: %s", strerror(errno));
        }
        got += static_cast<size_t>(n);
    }
    for (uint32_t v : w) {
        lua_pushnumber(L, static_cast<lua_Number>(v));
    }
    return 4;
}

std::string capsList()
{
    std::string out;
    for (const char *n : kNames) {
        out += out.empty() ? "" : ", ";
        out += n;
    }
    return out;
}

}  // namespace

const char *capabilityName(Capability c)
{
    int i = static_cast<int>(c);
    return i >= 0 && i < kCapabilityCount ? kNames[i] : "?";
}

bool capabilityFromName(std::string_view name, Capability *out)
{
    for (int i = 0; i < kCapabilityCount; i++) {
        if (name == kNames[i]) {
            *out = static_cast<Capability>(i);
            return true;
        }
    }
    return false;
}

const Policy &defaultPolicy()
{
    static const Policy *p = makeDefault();
    return *p;
}

bool parse(const std::vector<std::string> &args, Policy *out,
           std::string *err)
{
    if (args.empty()) {
        *err = "missing profile: off, default or strict";
        return false;
    }
    const std::string &profile = args[0];
    Policy p;
    if (profile == "off") {
        if (args.size() > 1) {
            *err = "\"off\" takes no capability changes";
            return false;
        }
        p.isolate = false;
        p.allowed = kAll;
    } else if (profile == "default") {
        p.allowed = kDefault;
    } else if (profile == "strict") {
        p.allowed = kStrict;
        p.strict = true;
    } else {
        *err = "unknown profile \"" + profile
               + "\": expected off, default or strict";
        return false;
    }
    p.label = profile;

    for (size_t i = 1; i < args.size(); i++) {
        const std::string &a = args[i];
        if (a.size() < 2 || (a[0] != '+' && a[0] != '-')) {
            *err = "invalid capability change \"" + a
                   + "\": expected +name or -name";
            return false;
        }
        bool grant = a[0] == '+';
        std::string_view name(a.data() + 1, a.size() - 1);
        std::string_view list;
        size_t eq = name.find('=');
        if (eq != std::string_view::npos) {
            list = name.substr(eq + 1);
            name = name.substr(0, eq);
            if (name != "shared" || !grant || list.empty()) {
                *err = "invalid capability change \"" + a
                       + "\": only +shared=dict[,dict...] takes a list";
                return false;
            }
        }
        Capability c;
        if (!capabilityFromName(name, &c)) {
            *err = "unknown capability \"" + std::string(name)
                   + "\": expected one of " + capsList();
            return false;
        }
        if (grant) {
            p.allowed |= bit(c);
        } else {
            p.allowed &= ~bit(c);
            if (c == Capability::Shared) {
                p.shared_dicts.clear();
            }
        }
        while (!list.empty()) {
            size_t comma = list.find(',');
            std::string_view dict = list.substr(0, comma);
            if (dict.empty()) {
                *err = "empty shared dict name in \"" + a + "\"";
                return false;
            }
            if (dict.size() > 3 && dict.substr(dict.size() - 3) == ":ro") {
                dict = dict.substr(0, dict.size() - 3);
                p.shared_readonly.emplace_back(dict);
            }
            p.shared_dicts.emplace_back(dict);
            list = comma == std::string_view::npos ? std::string_view()
                                                   : list.substr(comma + 1);
        }
        p.label += " " + a;
    }
    *out = std::move(p);
    return true;
}

void setHooks(CurrentPolicyFn policy, PushEnvFn env, EnvEscapesFn escapes)
{
    g_policy_hook = policy;
    g_env_hook = env;
    g_escape_hook = escapes;
}

const Policy *currentPolicy()
{
    if (foreignThread()) {
        return t_policy;
    }
    return g_policy_hook ? g_policy_hook() : nullptr;
}

void setThreadPolicy(const Policy *p)
{
    if (p != nullptr) {
        g_foreign_seen.store(true, std::memory_order_relaxed);
    }
    t_foreign = p != nullptr;
    t_policy = p;
}

void require(lua_State *L, Capability c)
{
    const Policy *p = currentPolicy();
    if (p && !p->allows(c)) {
        refuseAt(L, 1, c, p);
    }
}

namespace {

bool listed(const std::vector<std::string> &v, std::string_view s)
{
    return std::find(v.begin(), v.end(), s) != v.end();
}

}  // namespace

bool sharedAllowedListed(const Policy *p, std::string_view dict, bool write)
{
    if (!p->allows(Capability::Shared)) {
        return false;
    }
    if (!p->shared_dicts.empty() && !listed(p->shared_dicts, dict)) {
        return false;
    }
    return !write || !listed(p->shared_readonly, dict);
}

void requireShared(lua_State *L, std::string_view dict, bool write)
{
    const Policy *p = currentPolicy();
    if (p == nullptr) {
        return;
    }
    if (!p->allows(Capability::Shared)) {
        refuseAt(L, 1, Capability::Shared, p);
    }
    if (!p->shared_dicts.empty()
        && std::find(p->shared_dicts.begin(), p->shared_dicts.end(), dict)
               == p->shared_dicts.end())
    {
        bump(Capability::Shared);
        raise(L, 1, "shared dict '" + std::string(dict)
                        + "' is not allowed in this location (lua_sandbox "
                        + p->label + ")");
    }
    if (write && listed(p->shared_readonly, dict)) {
        bump(Capability::Shared);
        raise(L, 1, "shared dict '" + std::string(dict)
                        + "' is read-only in this location (lua_sandbox "
                        + p->label + ")");
    }
}

void countRefusal(Capability c)
{
    int i = static_cast<int>(c);
    if (i >= 0 && i < kCapabilityCount) {
        bump(c);
    }
}

void setRefusalHook(RefusalHookFn fn)
{
    g_refusal_hook = fn;
}

uint64_t refusals(Capability c)
{
    int i = static_cast<int>(c);
    return i >= 0 && i < kCapabilityCount ? g_refusals[i] : 0;
}

uint64_t totalRefusals()
{
    uint64_t n = 0;
    for (uint64_t v : g_refusals) {
        n += v;
    }
    return n;
}

bool install(lua_State *L, std::string *err)
{
    lua_createtable(L, 0, 8);
    lua_pushcfunction(L, luaClosureEnv);
    lua_setfield(L, -2, "closure_env");
    lua_pushcfunction(L, luaEscaped);
    lua_setfield(L, -2, "escaped");
    lua_pushcfunction(L, luaStrict);
    lua_setfield(L, -2, "strict");
    lua_pushcfunction(L, luaSeed);
    lua_setfield(L, -2, "seed");
    lua_pushcfunction(L, luaAllowed);
    lua_setfield(L, -2, "allowed");
    lua_pushcfunction(L, luaRefuse);
    lua_setfield(L, -2, "refuse");
    lua_pushcfunction(L, luaCurrentEnv);
    lua_setfield(L, -2, "current_env");
    lua_pushcfunction(L, luaEnvEscapes);
    lua_setfield(L, -2, "env_escapes");
    if (!runEmbedded(L, kLua_sandbox, kLua_sandbox_len, "=luaguard.sandbox",
                     1, 1, err)) {
        return false;
    }
    lua_pushlightuserdata(L, &kBuilderKey);
    lua_insert(L, -2);
    lua_rawset(L, LUA_REGISTRYINDEX);
    return true;
}

namespace {

// Builds the policy's view in this VM (first request of the worker) and
// keeps its env metatable in the VM's registry under the policy's
// address: a policy inherited by locations of several lua_vm has one view
// in each. False (nothing pushed) when the build fails, which takes
// running out of memory.
bool pushMeta(lua_State *L, const Policy *p)
{
    if (p->metas.push(L)) {
        return true;
    }
    lua_pushlightuserdata(L, const_cast<Policy *>(p));
    lua_rawget(L, LUA_REGISTRYINDEX);
    if (!lua_isnil(L, -1)) {
        return true;
    }
    lua_pop(L, 1);
    lua_pushlightuserdata(L, &kBuilderKey);
    lua_rawget(L, LUA_REGISTRYINDEX);
    lua_createtable(L, 0, kCapabilityCount + 1);
    for (int i = 0; i < kCapabilityCount; i++) {
        lua_pushboolean(L, p->allows(static_cast<Capability>(i)));
        lua_setfield(L, -2, kNames[i]);
    }
    lua_pushboolean(L, p->strict);
    lua_setfield(L, -2, "strict");
    // Views depend on the capabilities and the profile only: locations
    // with the same set share one.
    lua_pushinteger(L, static_cast<lua_Integer>(p->allowed)
                           | (p->strict ? lua_Integer(1) << 31 : 0));
    if (lua_pcall(L, 2, 1, 0) != 0) {
        const char *msg = lua_tostring(L, -1);
        g_env_error = msg ? msg : "error object";
        lua_pop(L, 1);
        return false;
    }
    if (!p->metas.keep(L)) {
        lua_pushlightuserdata(L, const_cast<Policy *>(p));
        lua_pushvalue(L, -2);
        lua_rawset(L, LUA_REGISTRYINDEX);
    }
    return true;
}

}  // namespace

const std::string &envError()
{
    return g_env_error;
}

bool prepareEnv(lua_State *L, const Policy *p)
{
    if (!pushMeta(L, p)) {
        return false;
    }
    lua_pop(L, 1);
    return true;
}

bool pushNewEnv(lua_State *L, const Policy *p)
{
    if (!pushMeta(L, p)) {
        return false;
    }
    // One field: `ngx` (the view's, kept in the metatable at [1], its name
    // at [2]), read by nearly every handler, found in the environment
    // itself instead of through the view: one metatable lookup less per
    // use, about 150 instructions. Every other name goes through the view.
    // `_G` is answered by the view (the environment of the code that
    // reads it), so rawset(_G, ...) and _G.x = ... stay private too;
    // iteration hides `ngx` while it is the view's (lua/sandbox.lua).
#if LUAGUARD_LJ_INTERNALS
    if (luaguard_env_new(L)) {
        return true;
    }
#endif
    lua_createtable(L, 0, 1);
    lua_rawgeti(L, -2, 2);
    lua_rawgeti(L, -3, 1);
    lua_rawset(L, -3);
    lua_insert(L, -2);
    lua_setmetatable(L, -2);
    return true;
}

}  // namespace luaguard::sandbox
