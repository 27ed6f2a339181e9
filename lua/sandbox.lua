-- The Lua half of the sandbox (src/security/sandbox.cpp runs it once per
-- VM, with the worker's real globals and a table of C helpers as its
-- argument). See src/security/sandbox.hpp for the design and
-- docs/security.md for the rules.
local C = ...
local allowed, refuse, current_env = C.allowed, C.refuse, C.current_env
local strict_now, seed = C.strict, C.seed
local mark_escaped, env_escapes = C.escaped, C.env_escapes

local real_G = _G
local type, next, error, tostring, select, pcall =
    type, next, error, tostring, select, pcall
local rawget, rawset = rawget, rawset
local real_getmetatable, real_setmetatable = getmetatable, setmetatable
local real_getfenv, real_setfenv = getfenv, setfenv
local real_pairs, real_ipairs = pairs, ipairs
local real_load, real_loadfile, real_require = load, loadfile, require
local byte, sub, find, concat = string.byte, string.sub, string.find,
                                table.concat
local io_open = io.open
local gsub, real_format, real_dump = string.gsub, string.format,
                                     string.dump
local real_tostring, real_unpack = tostring, unpack
local real_collectgarbage = collectgarbage
local dbg_getmetatable, getregistry = debug.getmetatable, debug.getregistry
local real_traceback = debug.traceback
local bxor, rshift, lshift, rol, tobit =
    bit.bxor, bit.rshift, bit.lshift, bit.rol, bit.tobit
local floor = math.floor
local co_resume, co_wrap = coroutine.resume, coroutine.wrap
local tinsert, tremove, tsort = table.insert, table.remove, table.sort
local package = package
local searchpath = package.searchpath

local weak_k = { __mode = "k" }

-- A closure made by request code whose code reads and writes no globals
-- (nor makes a closure that does) gets this empty table as its
-- environment instead of the request's (scripts/luajit-patches/
-- uncaptured-env.patch): a timer callback or a sort comparator then keeps
-- no request's globals, and a handler making only such closures leaves its
-- environment free for the next request. Request environments are known
-- to LuaJIT by this table being their metatable's metatable (build). It is
-- shared by every request: never handed out (getfenv answers the running
-- request's environment for it, what the closure's maker would have got)
-- and read-only.
local closure_env = real_setmetatable({}, {
    __newindex = function()
        error("attempt to modify the environment of closures without "
              .. "globals", 2)
    end,
    __metatable = false,
})
C.closure_env(closure_env)

-- getfenv's answer for an environment r it found.
local function fenv_answer(r)
    if r == closure_env then
        return current_env() or closure_env
    end
    return r
end

-- The metatables of request environments, one per view (build). A request
-- environment that nothing outside its request can reach is handed to the
-- next request when it ends (ngx/phases.cpp, recycleEnv): whatever hands
-- one to Lua code says so (env_escapes), here for worker code (modules)
-- through getfenv and debug.getfenv; request code's own getfenv, _G and
-- load* do it in the view.
local env_metas = real_setmetatable({}, weak_k)
do
    local getfenv = real_getfenv       -- its name in argument errors
    local tonumber = tonumber
    local function escapes(r)
        if env_metas[real_getmetatable(r)] then
            env_escapes()
        end
        return r
    end
    _G.getfenv = function(f)
        local level = f == nil and 1 or type(f) ~= "function" and tonumber(f)
        local r
        if level and level > 0 then
            r = getfenv(level + 1)     -- this function is one level more
        else
            r = getfenv(f)
        end
        return escapes(fenv_answer(r))
    end
    local debug_getfenv = debug.getfenv
    rawset(debug, "getfenv", function(o)
        local r = debug_getfenv(o)
        return escapes(fenv_answer(r))
    end)
end

-- Every table request code must not modify, by name: real library tables,
-- their proxies and the metatables involved. Shared by all views.
local protected = real_setmetatable({}, weak_k)
-- proxy -> the real table behind it.
local real_of = real_setmetatable({}, weak_k)

protected[real_G] = "_G"
protected[closure_env] = "closure environment"
protected[real_getmetatable("")] = "string metatable"
protected[real_getmetatable(io.stdout)] = "file metatable"

-- ---------------------------------------------------------------------
-- Dynamic checks, in the worker's own globals: they follow the running
-- request's policy wherever the call comes from (request code or a module
-- it calls), and allow everything outside requests (init, init_worker).

local function guard(tbl, names, cap)
    for i = 1, #names do
        local f = tbl[names[i]]
        if f ~= nil then
            tbl[names[i]] = function(...)
                if not allowed(cap) then
                    refuse(cap)
                end
                return f(...)
            end
        end
    end
end

guard(io, { "open", "popen", "lines", "input", "output", "read", "write",
            "close", "tmpfile" }, "io")
guard(os, { "execute", "exit", "getenv", "remove", "rename", "tmpname" },
      "os")
guard(real_G, { "loadfile", "dofile" }, "io")
guard(package, { "loadlib" }, "loadlib")

local function first_byte_of_file(file)
    local f = io_open(file, "rb")
    if not f then
        return nil
    end
    local c = f:read(1)
    f:close()
    return c
end

-- What a fresh VM has (LuaJIT's and luaguard's own names): strict code
-- sees none of it but what its allowlist names, so a name a new LuaJIT
-- adds stays out. Globals set later (init_by_lua, modules) are not here.
local builtin_globals, builtin_modules = {}, {}
for k in next, real_G do
    builtin_globals[k] = true
end
for k in next, package.preload do
    builtin_modules[k] = true
end
for k in next, package.loaded do
    builtin_modules[k] = true
end

-- Worker-wide functions strict code reaches by method syntax on strings
-- (the string metatable is the VM's): they check the running policy.
-- string.dump hands out the bytecode (and constants) of any function.
string.dump = function(f, strip)
    if strict_now() and not allowed("bytecode") then
        error("string.dump is not available in this location "
              .. "(lua_sandbox strict)", 2)
    end
    return real_dump(f, strip)
end

-- Per-request ids in place of addresses (tostring and string.format of
-- tables, functions, threads and userdata in strict code): an address
-- tells where other requests' objects live.
local ids = real_setmetatable({}, weak_k)   -- env -> { map, n }

local function opaque(v)
    local t = type(v)
    local mt = dbg_getmetatable(v)
    if t ~= "cdata" and type(mt) == "table"
        and rawget(mt, "__tostring") ~= nil
    then
        return real_tostring(v)
    end
    if t == "userdata" and real_tostring(v) == "userdata: NULL" then
        return "userdata: NULL"                -- ngx.null
    end
    local env = current_env() or real_G
    local st = ids[env]
    if st == nil then
        st = { map = real_setmetatable({}, weak_k), n = 0 }
        ids[env] = st
    end
    local id = st.map[v]
    if id == nil then
        st.n = st.n + 1
        id = st.n
        st.map[v] = id
    end
    local s = real_format("0x%08x", id)
    if t == "cdata" then
        -- "cdata<int *>: 0x..." keeps its type; an int64 prints digits
        return (gsub(real_tostring(v), "0x%x+", s))
    end
    return t .. ": " .. s
end

local function strict_tostring(...)
    local v = ...
    local t = type(v)
    if select("#", ...) == 0 or t == "string" or t == "number"
        or t == "boolean" or t == "nil"
    then
        return real_tostring(...)
    end
    return opaque(v)
end

local function plain_args(...)
    for i = 1, select("#", ...) do
        local t = type((select(i, ...)))
        if t ~= "string" and t ~= "number" and t ~= "boolean"
            and t ~= "nil"
        then
            return false
        end
    end
    return true
end

-- Whether a format string has a %p spec (plain `p`s and `%%p` do not
-- count).
local function scan_p(fmt)
    if not find(fmt, "p", 1, true) then
        return false
    end
    local pos = 1
    while true do
        local a, b, spec = find(fmt, "%%[-+ #0]*%d*%.?%d*(.)", pos)
        if a == nil then
            return false
        end
        if spec == "p" then
            return true
        end
        pos = b + 1
    end
end

-- scan_p's answers for short format strings, shared by every request of
-- the VM: a format used again costs one lookup instead of a search.
-- Strings are never collected from a weak table, so this one is bounded
-- and starts over when full.
local FMT_CACHE_MAX, FMT_CACHE_LEN = 256, 64
local fmt_has_p, fmt_cached = {}, 0

local function vet_format(fmt)
    local p = scan_p(fmt)
    if #fmt <= FMT_CACHE_LEN then
        if fmt_cached >= FMT_CACHE_MAX then
            fmt_has_p, fmt_cached = {}, 0
        end
        fmt_has_p[fmt] = p
        fmt_cached = fmt_cached + 1
    end
    return p
end

-- %p prints an address and %s of a table one: for strict code the first
-- is refused, the second prints the per-request id.
local function strict_format(fmt, has_p, ...)
    if has_p then
        error("bad argument #1 to 'format' (invalid option '%p': "
              .. "addresses are not shown in lua_sandbox strict)", 2)
    end
    local n = select("#", ...)
    local args = { ... }
    for i = 1, n do
        local t = type(args[i])
        if t ~= "string" and t ~= "number" and t ~= "boolean"
            and t ~= "nil"
        then
            args[i] = opaque(args[i])
        end
    end
    return real_format(fmt, real_unpack(args, 1, n))
end

-- Tail calls keep the caller's position in format's own errors.
string.format = function(fmt, ...)
    if type(fmt) ~= "string" then
        return real_format(fmt, ...)
    end
    local has_p = fmt_has_p[fmt]
    if has_p == nil then
        has_p = vet_format(fmt)
    end
    if (not has_p and plain_args(...)) or not strict_now() then
        return real_format(fmt, ...)
    end
    return strict_format(fmt, has_p, ...)
end

-- require's searchers: binary Lua modules need `bytecode`, C modules
-- `cmodule`, judged by the running request's policy.
local loaders = package.loaders
local lua_searcher, c_searcher, croot_searcher =
    loaders[2], loaders[3], loaders[4]

loaders[2] = function(name)
    if not allowed("bytecode") then
        local file = searchpath(name, package.path)
        if file and first_byte_of_file(file) == "\27" then
            refuse("bytecode")
        end
    end
    return lua_searcher(name)
end

loaders[3] = function(name)
    if not allowed("cmodule") and searchpath(name, package.cpath) then
        refuse("cmodule")
    end
    return c_searcher(name)
end

if croot_searcher then
    loaders[4] = function(name)
        local root = name:match("^([^.]+)%.")
        if root and not allowed("cmodule")
            and searchpath(root, package.cpath)
        then
            refuse("cmodule")
        end
        return croot_searcher(name)
    end
end

-- ---------------------------------------------------------------------
-- Views: what request code of one policy sees behind its globals.

local function readonly_error(name, k)
    error("attempt to modify read-only table '" .. name .. "' (field '"
          .. tostring(k) .. "') from request code", 3)
end

local function has_newindex(t)
    local mt = real_getmetatable(t)
    return type(mt) == "table" and rawget(mt, "__newindex") ~= nil
end

-- ngx.var, ngx.header and ngx.arg: empty tables whose C __index and
-- __newindex read and write the running request's state and never look at
-- the table they are called for. A proxy of one takes those functions as
-- its own metamethods: a read or a write is one C call, as without the
-- sandbox (a write through the generic path was a Lua call and a rawget
-- more, a read a table hop more).
local computed = real_setmetatable({}, weak_k)
local function note_computed()           -- once ngx is complete (build)
    for _, k in next, { "var", "header", "arg" } do
        local t = type(ngx) == "table" and rawget(ngx, k)
        local mt = type(t) == "table" and real_getmetatable(t)
        if mt and next(t) == nil and type(mt) == "table"
            and type(rawget(mt, "__index")) == "function"
            and type(rawget(mt, "__newindex")) == "function"
        then
            computed[t] = mt
        end
    end
end

-- ---------------------------------------------------------------------
-- Per-request patches (`default`): request code may replace fields of
-- ngx.*, of library tables and of module tables, as test suites do to
-- mock time and I/O. The write goes to the request's own overlay, never
-- to the shared table: the request that patched sees it, no other one
-- does (docs/security.md). Strict refuses every such write.

-- The overlay lives in the request's environment, under a private key
-- (a weak table keyed by environments would keep every one alive: the
-- patches are the request's closures, whose environment it is). Tables
-- are named in it by tokens: an overlay found by iterating _G hands out
-- no shared table. env[PATCHES] -> token -> k -> v.
local PATCHES = {}
local NIL = {}                              -- a field patched to nil
local tokens = real_setmetatable({}, weak_k)   -- real -> its token

-- The running request's patch of real[k]: found, value.
local function patch_of(real, k)
    local env = current_env()
    local pe = env and rawget(env, PATCHES)
    local pr = pe and pe[tokens[real] or NIL]
    local v = pr and pr[k]
    if v == nil then
        return false
    end
    if v == NIL then
        return true, nil
    end
    return true, v
end

-- A function replaced by a function: the shared table gets, once per
-- worker and field, a dispatcher that calls the running request's patch
-- or the original. Module code reading the field when it calls it (and
-- references taken once the dispatcher is there) then sees the patch in
-- the patching request only. The tail call keeps the caller's stack
-- level (ngx.log's file:line).
local dispatched = real_setmetatable({}, weak_k)   -- real -> k -> true

-- Views' copies of library tables that have sub-tables (see fast_proxy):
-- real -> list of { copy, overrides }.
local copies = real_setmetatable({}, weak_k)

local overlay

local function dispatch(real, k, orig)
    local d = dispatched[real]
    if d == nil then
        d = {}
        dispatched[real] = d
    end
    if d[k] then
        return
    end
    d[k] = true
    local function dispatcher(...)
        local found, f = patch_of(real, k)
        if found then
            return f(...)
        end
        return orig(...)
    end
    rawset(real, k, dispatcher)
    local list = copies[real]
    for i = 1, list and #list or 0 do
        local c = list[i]
        if c.overrides and c.overrides[k] ~= nil then
            overlay(real)      -- a view's own function stands there
        else
            rawset(c.copy, k, dispatcher)
        end
    end
end

-- Other patches (values, new fields, nil) are seen through request code's
-- proxies of the table: those of a table with such a patch (one ever, in
-- this worker) look the overlay up first; the others keep their plain
-- __index. real -> true once switched; real -> list of switch functions.
local overlaid = real_setmetatable({}, weak_k)
local switches = real_setmetatable({}, weak_k)

overlay = function(real)
    if overlaid[real] then
        return
    end
    overlaid[real] = true
    local list = switches[real]
    for i = 1, list and #list or 0 do
        list[i]()
    end
end

local function add_patch(real, name, k, v)
    local env = current_env()
    if env == nil or env == real_G then
        readonly_error(name, k)
    end
    local pe = rawget(env, PATCHES)
    if pe == nil then
        pe = {}
        rawset(env, PATCHES, pe)
    end
    local token = tokens[real]
    if token == nil then
        token = {}
        tokens[real] = token
    end
    local pr = pe[token]
    if pr == nil then
        pr = {}
        pe[token] = pr
    end
    local orig = rawget(real, k)
    if v == nil then
        pr[k] = NIL
    else
        pr[k] = v
    end
    if type(orig) == "function" and type(v) == "function" then
        dispatch(real, k, orig)
    else
        overlay(real)
    end
end

-- Modules whose loading needs a capability. string.buffer and
-- thread.exdata hand out cdata (raw memory) without the ffi table.
local module_caps = {
    ffi = "ffi", ["string.buffer"] = "ffi",
    ["thread.exdata"] = "ffi", ["thread.exdata2"] = "ffi",
    ["jit.util"] = "debug", ["jit.profile"] = "debug",
    ["jit.dump"] = "debug", ["jit.v"] = "debug", ["jit.p"] = "debug",
    ["jit.bcsave"] = "debug", ["jit.zone"] = "debug", ["jit.opt"] = "debug",
}

-- ---------------------------------------------------------------------
-- The strict allowlist. Its view is built from these names only; every
-- built-in global or module not listed is absent (docs/security.md).
-- tests/e2e/test_sandbox_adversarial.py walks the result.

local strict_globals = {
    "assert", "collectgarbage", "dofile", "error", "getfenv",
    "getmetatable", "ipairs", "load", "loadfile", "loadstring", "next",
    "pairs", "pcall", "print", "rawequal", "rawget", "rawset", "require",
    "select", "setfenv", "setmetatable", "tonumber", "tostring", "type",
    "unpack", "xpcall", "_VERSION",
    "string", "table", "math", "coroutine", "os", "io", "debug", "jit",
    "bit", "ngx", "package",
}

local strict_libs = {
    string = { "byte", "char", "find", "format", "gmatch", "gsub", "len",
               "lower", "match", "rep", "reverse", "sub", "upper" },
    table = { "concat", "foreach", "foreachi", "getn", "insert", "maxn",
              "move", "remove", "sort" },
    math = { "abs", "acos", "asin", "atan", "atan2", "ceil", "cos", "cosh",
             "deg", "exp", "floor", "fmod", "frexp", "huge", "ldexp", "log",
             "log10", "max", "min", "modf", "pi", "pow", "rad", "random",
             "randomseed", "sin", "sinh", "sqrt", "tan", "tanh" },
    coroutine = { "create", "isyieldable", "resume", "running", "status",
                  "wrap", "yield" },
    -- execute .. tmpname refuse unless the location grants `os`
    os = { "clock", "date", "difftime", "time", "execute", "exit",
           "getenv", "remove", "rename", "tmpname" },
    bit = { "arshift", "band", "bnot", "bor", "bswap", "bxor", "lshift",
            "rol", "ror", "rshift", "tobit", "tohex" },
    package = { "config", "cpath", "loaded", "loadlib", "path", "seeall" },
}

-- Built-in modules strict code may require (besides the libraries above,
-- luaguard's ngx.* and resty.core.* modules: lua/resty_core.lua).
local strict_modules = {
    ["table.new"] = true, ["table.clear"] = true, ["table.nkeys"] = true,
    ["table.isarray"] = true, ["table.isempty"] = true,
    ["table.clone"] = true, ["resty.core"] = true, _G = true,
}

local function strict_module_ok(name)
    return not builtin_modules[name] or strict_modules[name]
           or find(name, "^ngx%.") ~= nil
           or find(name, "^resty%.core%.") ~= nil
end

-- collectgarbage options that would switch the worker's collector off or
-- retune it for every request: refused to request code in every
-- isolating profile. Strict code keeps "count" only.
local gc_tuning = { stop = true, setpause = true, setstepmul = true }

local function collectgarbage_for(caps)
    local label = caps.strict and "strict" or "default"
    return function(opt, arg)
        local o = opt
        if o == nil then
            o = "collect"
        end
        if (caps.strict and o ~= "count") or gc_tuning[o] then
            error("collectgarbage('" .. tostring(o) .. "') is not allowed "
                  .. "in request code (lua_sandbox " .. label .. ")", 2)
        end
        return real_collectgarbage(opt, arg)
    end
end

-- ---- a PRNG per request (strict): xoshiro128** on 32-bit words ----
-- math.randomseed of one request never makes another's math.random
-- predictable: each request starts from the kernel's CSPRNG.

local prng = real_setmetatable({}, weak_k)   -- env -> { s0, s1, s2, s3 }

local function next32(s)
    local s0, s1, s2, s3 = s[1], s[2], s[3], s[4]
    local r = rol(tobit(s1 * 5), 7)
    r = tobit(r * 9)
    local t = lshift(s1, 9)
    s2 = bxor(s2, s0)
    s3 = bxor(s3, s1)
    s1 = bxor(s1, s2)
    s0 = bxor(s0, s3)
    s2 = bxor(s2, t)
    s3 = rol(s3, 11)
    s[1], s[2], s[3], s[4] = s0, s1, s2, s3
    return r
end

local function prng_state()
    local env = current_env() or real_G
    local s = prng[env]
    if s == nil then
        local a, b, c, d = seed()
        s = { tobit(a), tobit(b), tobit(c), tobit(d) }
        if a == 0 and b == 0 and c == 0 and d == 0 then
            s[1] = 1
        end
        prng[env] = s
    end
    return s
end

local function random_(...)
    local s = prng_state()
    -- 53 bits: [0, 1)
    local r = (rshift(next32(s), 5) * 67108864 + rshift(next32(s), 6))
              / 9007199254740992
    local n = select("#", ...)
    if n == 0 then
        return r
    end
    local m, u = ...
    if type(m) ~= "number" then
        m = tonumber(m)
        if m == nil then
            error("bad argument #1 to 'random' (number expected, got "
                  .. type((...)) .. ")", 2)
        end
    end
    if n == 1 then
        m, u = 1, m
    elseif type(u) ~= "number" then
        u = tonumber(u)
        if u == nil then
            error("bad argument #2 to 'random' (number expected, got "
                  .. type((select(2, ...))) .. ")", 2)
        end
    end
    m, u = floor(m), floor(u)
    return floor(r * (u - m + 1)) + m
end

local function randomseed_(x)
    if type(x) ~= "number" then
        local given = type(x)
        x = tonumber(x)
        if x == nil then
            error("bad argument #1 to 'randomseed' (number expected, got "
                  .. given .. ")", 2)
        end
    end
    local s = prng_state()
    s[1], s[2] = tobit(x % 4294967296), tobit(floor(x / 4294967296))
    s[3], s[4] = tobit(0x9E3779B9), tobit(0x7F4A7C15)
    for _ = 1, 16 do
        next32(s)
    end
end

-- debug.traceback without code addresses ("[C]: at 0x...").
local function traceback_(a1, a2, a3)
    local s
    if type(a1) == "thread" then
        s = real_traceback(a1, a2, a3)
    else
        s = real_traceback(a1, (a2 or 1) + 1)
    end
    if type(s) == "string" then
        s = gsub(s, "0x%x+", "?")
    end
    return s
end

-- debug.getinfo for request code. Handler closures are pooled: the one a
-- run used serves a later run (with that request's environment) once it
-- returned. A closure request code got hold of as a value (a `func` field)
-- could be kept, by a timer for example, and would then see the later
-- request's globals: it is marked, and never goes back to its pool.
-- Levels count from the caller, one frame above this one.
local real_getinfo = debug.getinfo
local function getinfo_(a1, ...)
    local getinfo = real_getinfo       -- its name in argument errors
    local info
    if type(a1) == "number" and a1 > 0 then
        info = getinfo(a1 + 1, ...)
    else
        info = getinfo(a1, ...)
    end
    local f = type(info) == "table" and rawget(info, "func")
    if type(f) == "function" then
        mark_escaped(f)
    end
    return info
end

-- Standard names copied into each view (looked up raw: fast and JIT
-- friendly). Anything else falls through to the live worker globals.
local std_names = {
    "assert", "collectgarbage", "error", "gcinfo", "getfenv",
    "getmetatable", "ipairs", "load", "loadfile", "loadstring", "module",
    "newproxy", "next", "pairs", "pcall", "print", "rawequal", "rawget",
    "rawlen", "rawset", "require", "select", "setfenv", "setmetatable",
    "tonumber", "tostring", "type", "unpack", "xpcall", "_VERSION",
    "dofile", "string", "table", "math", "coroutine", "os", "io", "debug",
    "package", "bit", "jit", "ngx",
}

local libraries = {
    string = true, table = true, math = true, coroutine = true, os = true,
    io = true, debug = true, bit = true, jit = true, ngx = true,
    package = true,
}

local views = {}   -- capability bits -> env metatable

-- Registry tables (luaguard's and LuaJIT's metatables): shared by every
-- request, read-only to request code. api_mts: the metatables of
-- luaguard's own API objects, the only userdata strict code is handed.
local api_mts = real_setmetatable({}, weak_k)

local function scan_registry()
    for k, v in next, getregistry() do
        if type(k) == "string" and type(v) == "table" then
            protected[v] = protected[v] or "metatable '" .. k .. "'"
            if sub(k, 1, 9) == "luaguard." then
                api_mts[v] = true
            end
        end
    end
    local shared = rawget(ngx, "shared")
    for _, d in next, type(shared) == "table" and shared or {} do
        local mt = dbg_getmetatable(d)
        if type(d) == "userdata" and mt then
            api_mts[mt] = true
        end
    end
end

-- An API metatable made after the views were built (a module's first
-- require makes its objects' metatable) is found by scanning again; a
-- metatable found not to be one is remembered, so each costs one scan.
local not_api_mts = real_setmetatable({}, weak_k)

local function is_api_mt(mt)
    if api_mts[mt] then
        return true
    end
    if not_api_mts[mt] then
        return false
    end
    scan_registry()
    if api_mts[mt] then
        return true
    end
    not_api_mts[mt] = true
    return false
end

-- The table require consults for loaded modules.
local LOADED = getregistry()._LOADED

-- Whether a module table holds only C functions and plain values.
local function c_functions_only(t)
    for _, v in next, t do
        local tv = type(v)
        if tv == "function" then
            if real_getinfo(v, "S").what ~= "C" then
                return false
            end
        elseif tv == "table" or tv == "userdata" or tv == "cdata"
            or tv == "thread"
        then
            return false
        end
    end
    return true
end

local function build(caps)
    local strict = caps.strict
    note_computed()
    local V = {}                       -- the view
    -- Every request env's metatable. [1] and [2] (the view's ngx and its
    -- name, set below) live in its array part, where the C side reads them
    -- without a hash lookup.
    local M = real_setmetatable({ false, false, __index = V }, closure_env)
    env_metas[M] = true
    local map = real_setmetatable({}, weak_k)  -- real -> proxy, this view

    protected[V] = "_G"
    protected[M] = "_G metatable"
    scan_registry()

    local function env()
        return current_env() or real_setmetatable({}, M)
    end

    local deep_proxy, inbound, state_value, denied_table

    -- The proxy request code sees for a table value, or the value.
    local function to_proxy(v, name)
        if type(v) ~= "table" then
            return v
        end
        local p = map[v]
        if p then
            return p
        end
        if v == real_G then
            return env()
        end
        if real_of[v] then
            return v                   -- already a proxy
        end
        if protected[v] or name then
            -- A library the location may not use (ffi, jit.*,
            -- string.buffer), reached through a module that keeps it.
            for mod, cap in next, module_caps do
                if not caps[cap] and rawget(package.loaded, mod) == v then
                    p = denied_table(cap)
                    map[v] = p
                    return p
                end
            end
            return deep_proxy(v, protected[v] or name)
        end
        return v
    end

    -- Assigns through the real table's own __newindex. Its errors name
    -- this chunk as their position; they are raised again at the caller.
    local function assign(t, k, v)
        t[k] = v
    end
    local function forward_to(real, k, v)
        local ok, err = pcall(assign, real, k, v)
        if not ok then
            if type(err) == "string" then
                local _, e = find(err, "^luaguard%.sandbox:%d+: ")
                if e then
                    err = sub(err, e + 1)
                end
            end
            error(err, 3)
        end
    end

    -- `patchable`: ngx.*, library and module tables take per-request
    -- patches (not strict); package, metatables and worker globals stay
    -- read-only.
    local function refuse_or_patch(real, name, patchable)
        if patchable and not strict then
            return function(_, k, v)
                add_patch(real, name, k, v)
            end
        end
        return function(_, k)
            readonly_error(name, k)
        end
    end

    local function newindex_for(real, name, forward, patchable)
        local other = refuse_or_patch(real, name, patchable)
        if forward then
            return function(t, k, v)
                if forward[k] then
                    forward_to(real, k, v)
                    return
                end
                other(t, k, v)
            end
        end
        if has_newindex(real) then
            -- A computed table (ngx.var, ngx.header, ngx.arg): writes go
            -- to its own __newindex, which validates them.
            return function(_, k, v)
                if rawget(real, k) ~= nil then
                    readonly_error(name, k)
                end
                forward_to(real, k, v)
            end
        end
        return other
    end

    -- ---- the strict membrane ----
    -- Values that come from modules and worker state into strict code
    -- (fields, function results, errors, callback arguments, coroutine
    -- results) pass `inbound`: cdata and userdata other than luaguard's
    -- API objects are refused, functions come wrapped so that what they
    -- return passes it too, tables holding such values come as proxies
    -- that refuse them when read.

    -- Tables of the view itself (libraries, the view): their values are
    -- vetted, iteration hands them out as they are.
    local vetted = real_setmetatable({}, weak_k)
    vetted[V] = true
    local own_mt = real_setmetatable({}, weak_k)   -- set by request code
    local own_env = real_setmetatable({}, weak_k)  -- setfenv by it
    local obj_of = real_setmetatable({}, weak_k)   -- object proxy -> real
    local fn_cache = real_setmetatable({}, weak_k)
    local cb_cache = real_setmetatable({}, weak_k)
    local wrapped = real_setmetatable({}, weak_k)  -- wrapper -> function

    local function foreign(v)
        local t = type(v)
        if t == "cdata" then
            return "cdata"
        end
        if t == "userdata" then
            local mt = dbg_getmetatable(v)
            if mt ~= nil and not is_api_mt(mt) then
                return "userdata"
            end
        end
        return nil
    end

    local function refuse_foreign(kind, name, level)
        error((name or "a value") .. " is " .. kind .. ": cdata and "
              .. "foreign userdata do not reach code in lua_sandbox "
              .. "strict", level or 3)
    end

    -- Whether a table (or one within reach) holds such values.
    local function dirty(t, seen, depth)
        if seen[t] then
            return false
        end
        seen[t] = true
        local n = 0
        for k, v in next, t do
            n = n + 1
            if n > 4096 or foreign(k) or foreign(v) then
                return true
            end
            if type(v) == "table" and not protected[v] and not map[v]
                and not real_of[v]
            then
                if depth >= 8 or dirty(v, seen, depth + 1) then
                    return true
                end
            end
        end
        return false
    end

    local filter_results, outbound_args

    -- Functions read through a module's proxy get their first argument
    -- unwrapped when it is that same proxy: `mod:new()` hands the module
    -- its own table as `self` (classes that do setmetatable(o, self) keep
    -- working). Other proxies stay proxies: a generic helper in a module
    -- must not become a way to write to `string`.
    local function method_of(f, real, p, cache, name)
        local w = cache[f]
        if w == nil then
            if strict then
                w = function(...)
                    return filter_results(name,
                                          f(outbound_args(real, p, ...)))
                end
            else
                w = function(a1, ...)
                    if a1 == p then
                        a1 = real
                    end
                    return f(a1, ...)
                end
            end
            cache[f] = w
            wrapped[w] = f
        end
        return w
    end

    -- Strict functions handed to module code: their arguments pass the
    -- membrane when the module calls them back.
    local function wrap_cb(f)
        local orig = wrapped[f]
        if orig then
            return orig                -- the module's own function back
        end
        local w = cb_cache[f]
        if w == nil then
            w = function(...)
                return f(filter_results("a callback argument", ...))
            end
            cb_cache[f] = w
        end
        return w
    end

    outbound_args = function(real, p, ...)
        local n = select("#", ...)
        local change = false
        for i = 1, n do
            local a = select(i, ...)
            if (p ~= nil and a == p) or type(a) == "function"
                or (type(a) == "table" and obj_of[a])
            then
                change = true
                break
            end
        end
        if not change then
            return ...
        end
        local args = { ... }
        for i = 1, n do
            local a = args[i]
            if i == 1 and p ~= nil and a == p then
                args[i] = real
            elseif type(a) == "function" then
                args[i] = wrap_cb(a)
            elseif type(a) == "table" and obj_of[a] then
                args[i] = obj_of[a]
            end
        end
        return real_unpack(args, 1, n)
    end

    -- A writable proxy for an object a module handed out (a table with
    -- the module's metatable, or holding cdata): methods work, fields
    -- holding cdata are refused when read.
    local function object_proxy(real, name)
        local p = {}
        local cache = real_setmetatable({}, weak_k)
        real_setmetatable(p, {
            __index = function(_, k)
                local v = real[k]
                if type(v) == "function" then
                    return method_of(v, real, p, cache, name)
                end
                return inbound(v, name .. "." .. tostring(k))
            end,
            __newindex = function(_, k, v)
                if type(v) == "table" and obj_of[v] then
                    v = obj_of[v]
                end
                real[k] = v
            end,
        })
        protected[p] = name
        real_of[p] = real
        obj_of[p] = real
        map[real] = p
        return p
    end

    -- A value a function returned (or raised, or yielded).
    inbound = function(v, name)
        local t = type(v)
        if t == "string" or t == "number" or t == "boolean" or t == "nil"
            or t == "thread"
        then
            return v
        end
        if t == "function" then
            if wrapped[v] or cb_cache[v] then
                return v
            end
            return method_of(v, nil, nil, fn_cache, name)
        end
        if t == "table" then
            local p = map[v]
            if p then
                return p
            end
            if v == real_G then
                return env()
            end
            if real_of[v] then
                return v
            end
            if protected[v] then
                return to_proxy(v, protected[v])
            end
            local mt = dbg_getmetatable(v)
            if mt == M or (mt ~= nil and is_api_mt(mt)) then
                return v
            end
            if (mt ~= nil and not own_mt[mt]) or dirty(v, {}, 0) then
                return object_proxy(v, name or "a table")
            end
            return v
        end
        local kind = foreign(v)
        if kind then
            refuse_foreign(kind, name, 4)
        end
        return v
    end

    filter_results = function(name, ...)
        local n = select("#", ...)
        if n == 0 then
            return
        end
        if n == 1 then
            return inbound((...), name)
        end
        local r = { ... }
        for i = 1, n do
            r[i] = inbound(r[i], name)
        end
        return real_unpack(r, 1, n)
    end

    -- A value read from worker state (module fields, worker globals):
    -- tables come as read-only proxies.
    state_value = function(v, name)
        local t = type(v)
        if t == "table" then
            local mt = dbg_getmetatable(v)
            if strict and mt ~= nil and is_api_mt(mt) then
                return v
            end
            return to_proxy(v, name)
        end
        if strict then
            if t == "function" then
                return inbound(v, name)
            end
            local kind = foreign(v)
            if kind then
                refuse_foreign(kind, name, 4)
            end
        end
        return v
    end

    -- Values reached through it become proxies too. Used for modules and
    -- worker-level tables: always live, one function call per access.
    deep_proxy = function(real, name)
        local p = {}
        local cache = real_setmetatable({}, weak_k)
        local mt = {
            __index = function(_, k)
                local v
                if overlaid[real] then
                    local found, pv = patch_of(real, k)
                    if found then
                        v = pv
                    else
                        v = real[k]
                    end
                else
                    v = real[k]
                end
                local t = type(v)
                if t == "table" then
                    return state_value(v, name .. "." .. tostring(k))
                end
                if t == "function" then
                    return method_of(v, real, p, cache, name)
                end
                if strict then
                    return state_value(v, name .. "." .. tostring(k))
                end
                return v
            end,
            __newindex = newindex_for(real, name, nil,
                                      find(name, "^module '") ~= nil),
        }
        real_setmetatable(p, mt)
        protected[real] = protected[real] or name
        protected[p] = name
        protected[mt] = name
        real_of[p] = real
        map[real] = p
        return p
    end

    -- Library tables: __index is the real table (as fast as a direct
    -- lookup once JIT-compiled). The proxy itself stays empty: every
    -- write reaches its __newindex (a field stored raw in it would be a
    -- write to every request's proxy). A table with table fields (ngx)
    -- or fields of the view's own is read through a copy instead, built
    -- now, where those fields are their proxies (library sub-tables are
    -- not replaced later); fields added to the real table later are
    -- read through to it. One lookup either way. `fixed`: not patchable
    -- (package), and only its table fields are copied. `read_through`:
    -- the copy's __index instead of the real table, when the real table's
    -- own __index answers computed fields and reads the table for the
    -- rest (ngx: ngx.ctx in one hop less).
    local function fast_proxy(real, name, forward, overrides, fixed,
                              read_through)
        local existing = map[real]
        if existing then
            return existing
        end
        local p = {}
        map[real] = p
        vetted[real] = true
        protected[real] = protected[real] or name
        local nested = overrides ~= nil
        for k, v in next, real do
            if type(v) == "table" and type(k) == "string" and v ~= real_G
            then
                nested = true
                break
            end
        end
        local base = real
        if nested then
            local copy = {}
            for k, v in next, real do
                if type(v) == "table" and type(k) == "string"
                    and v ~= real_G
                then
                    if not (overrides and overrides[k] ~= nil) then
                        copy[k] = fast_proxy(v, name .. "." .. k, nil, nil,
                                             fixed)
                    end
                elseif not fixed then
                    -- package keeps reading path and cpath live
                    copy[k] = v
                end
            end
            if overrides then
                for k, v in next, overrides do
                    copy[k] = v
                end
            end
            base = real_setmetatable(copy, { __index = read_through or real })
            protected[copy] = name
            map[copy] = p
            local list = copies[real]
            if list == nil then
                list = {}
                copies[real] = list
            end
            list[#list + 1] = { copy = copy, overrides = overrides }
        end
        local mt = { __index = base,
                     __newindex = newindex_for(real, name, forward,
                                               not fixed) }
        local cmt = computed[real]
        if cmt then
            mt.__index = rawget(cmt, "__index")
            mt.__newindex = rawget(cmt, "__newindex")
        end
        -- Once a request patches a value here, reads look its overlay up.
        local function switch()
            mt.__index = function(_, k)
                local found, v = patch_of(real, k)
                if found then
                    return v
                end
                return base[k]
            end
        end
        if overlaid[real] then
            switch()
        else
            local list = switches[real]
            if list == nil then
                list = {}
                switches[real] = list
            end
            list[#list + 1] = switch
        end
        local rmt = real_getmetatable(real)
        if type(rmt) == "table" then
            protected[rmt] = name .. " metatable"
            if rawget(rmt, "__call") then
                mt.__call = function(_, ...) return real(...) end
            end
        end
        real_setmetatable(p, mt)
        protected[p] = name
        protected[mt] = name
        real_of[p] = real
        return p
    end

    -- Strict: a library from its allowlist. The listed functions are
    -- copied into a hidden table the proxy reads; nothing else exists.
    local function listed_proxy(real, name, names, overrides)
        local hidden = {}
        for i = 1, #names do
            local k = names[i]
            local v = overrides and overrides[k]
            if v == nil then
                v = real[k]
            end
            hidden[k] = v
        end
        local p = real_setmetatable({}, {
            __index = hidden,
            __newindex = function(_, k) readonly_error(name, k) end,
        })
        protected[hidden] = name
        vetted[hidden] = true
        protected[p] = name
        real_of[p] = hidden
        map[real] = p
        protected[real] = protected[real] or name
        return p
    end

    -- A table every access to which is refused (a denied library).
    denied_table = function(cap, keep)
        local p = {}
        if keep then
            for k, v in next, keep do
                p[k] = v
            end
        end
        real_setmetatable(p, {
            __index = function() refuse(cap) end,
            __newindex = function() refuse(cap) end,
        })
        protected[p] = cap
        return p
    end

    local function check_writable(t, what)
        if type(t) == "table" and protected[t] then
            error("attempt to modify read-only table '" .. protected[t]
                  .. "' from request code (" .. what .. ")", 3)
        end
    end

    -- ---- base functions ----

    -- Proxies whose values are filtered (package.loaded, .preload):
    -- iteration goes through the same filter, skipping what it hides.
    local filtered = real_setmetatable({}, weak_k)

    -- next over a request environment skips the overlay's key.
    -- A request environment's own fields, without the overlay and
    -- without the `ngx` every environment starts with.
    local function env_next(t, k)
        local nk, nv = next(t, k)
        while nk == PATCHES
            or (nk == "ngx" and nv == rawget(M, 1)
                and real_getmetatable(t) == M)
        do
            nk, nv = next(t, nk)
        end
        if nk == nil then
            return nil                 -- one value, as next gives
        end
        return nk, nv
    end

    local function next_(t, k)
        local real = type(t) == "table" and real_of[t]
        if not real then
            return env_next(t, k)
        end
        local nk, nv = next(real, k)
        if filtered[t] or (strict and obj_of[t]) then
            while nk ~= nil do
                nv = t[nk]
                if nv ~= nil then
                    return nk, nv
                end
                nk = next(real, nk)
            end
            return nil
        end
        if strict and nk ~= nil and not vetted[real] then
            if foreign(nk) then
                refuse_foreign(foreign(nk), "a key of " .. protected[t], 3)
            end
            return nk, state_value(nv, protected[t] .. "."
                                       .. tostring(nk))
        end
        if type(nv) == "table" then
            nv = to_proxy(nv, protected[t] .. "." .. tostring(nk))
        end
        return nk, nv
    end

    local function pairs_(t)
        local real = type(t) == "table" and real_of[t]
        if not real then
            if type(t) == "table" and (rawget(t, PATCHES) ~= nil
                                       or real_getmetatable(t) == M)
            then
                return env_next, t, nil
            end
            return real_pairs(t)
        end
        return next_, t, nil
    end

    local function ipairs_(t)
        local real = type(t) == "table" and real_of[t]
        if not real then
            return real_ipairs(t)
        end
        return function(_, i)
            i = i + 1
            local v = real[i]
            if v == nil then
                return nil
            end
            if strict and not vetted[real] then
                return i, state_value(v, protected[t] .. "[" .. i .. "]")
            end
            return i, to_proxy(v, protected[t] .. "[" .. i .. "]")
        end, t, 0
    end

    local function getfenv_(f)
        env_escapes()
        local r
        if f == nil then
            r = real_getfenv(2)
        elseif type(f) == "number" then
            r = real_getfenv(f > 0 and f + 1 or f)
        else
            r = real_getfenv(f)
        end
        if r == closure_env then
            r = env()
        end
        if strict and type(r) == "table" and r ~= real_G
            and real_getmetatable(r) ~= M and not own_env[r]
        then
            -- a module's private environment (a stack level below
            -- module code): worker state
            return state_value(r, "an environment")
        end
        return to_proxy(r)
    end

    local function setfenv_(f, t)
        local target = f
        if type(f) == "number" then
            if f <= 0 then
                error("setfenv(0) is not allowed in request code", 2)
            end
            target = f + 1
        end
        local cur = real_getfenv(target)
        -- A closure without globals has the shared closure_env: it is
        -- request code's own all the same (worker code's has its maker's).
        if cur ~= closure_env and (cur == real_G or protected[cur]) then
            error("cannot change the environment of a function shared "
                  .. "with other requests", 2)
        end
        if type(t) == "table" then
            own_env[t] = true
        end
        local r = real_setfenv(target, t)
        return r
    end

    local function getmetatable_(x)
        local mt = real_getmetatable(x)
        if type(x) == "userdata" and type(mt) == "table"
            and (strict or is_api_mt(mt))
        then
            -- luaguard's objects: their metatables hold __gc and the
            -- methods of every such object in the worker
            return nil
        end
        if type(mt) == "table" then
            if protected[mt] then
                return to_proxy(mt)
            end
            if strict and not own_mt[mt] and real_of[mt] == nil then
                -- set by a module: its class, worker state
                return state_value(mt, "a metatable")
            end
        end
        return mt
    end

    local function setmetatable_(t, mt)
        check_writable(t, "setmetatable")
        if type(mt) == "table" and real_of[mt] then
            mt = real_of[mt]           -- metamethods are looked up raw
        elseif strict and type(mt) == "table" then
            own_mt[mt] = true
        end
        return real_setmetatable(t, mt)
    end

    local function rawset_(t, k, v)
        check_writable(t, "rawset")
        return rawset(t, k, v)
    end

    local function is_binary(s)
        return type(s) == "string" and byte(s, 1) == 27
    end

    local function load_(chunk, chunkname, mode, fenv)
        if type(chunk) == "function" then
            -- Read it all first so the first byte can be judged.
            local parts, n = {}, 0
            while true do
                local s = chunk()
                if s == nil or s == "" then
                    break
                end
                if type(s) ~= "string" then
                    return nil, "reader function must return a string"
                end
                n = n + 1
                parts[n] = s
            end
            chunk = concat(parts)
            chunkname = chunkname or "=(load)"
        end
        if not caps.bytecode then
            if is_binary(chunk) then
                refuse("bytecode")
            end
            mode = "t"
        end
        local fn, err = real_load(chunk, chunkname, mode)
        if not fn then
            return nil, err
        end
        if type(fenv) == "table" and not strict then
            real_setfenv(fn, fenv)
        else
            -- strict: a chunk always gets the request's own table
            real_setfenv(fn, env())
        end
        return fn
    end

    local function loadstring_(s, chunkname)
        return load_(s, chunkname)
    end

    local function loadfile_(path, mode)
        if not allowed("io") then
            refuse("io")
        end
        if not caps.bytecode then
            if path and first_byte_of_file(path) == "\27" then
                refuse("bytecode")
            end
            mode = "t"
        end
        local fn, err = real_loadfile(path, mode)
        if not fn then
            return nil, err
        end
        real_setfenv(fn, env())
        return fn
    end

    local function dofile_(path)
        local fn, err = loadfile_(path)
        if not fn then
            error(err, 2)
        end
        return fn()
    end

    local function module_()
        error("module() is not available to request code (lua_sandbox); "
              .. "write modules as files loaded with require", 2)
    end

    -- Strict: what pcall, xpcall and coroutines hand back passes the
    -- membrane (an error raised by module code may be any value). A
    -- refused error value becomes a message: catching never raises.
    local function error_value(e)
        local kind = foreign(e)
        if kind then
            return "an error value was " .. kind .. " (refused in "
                   .. "lua_sandbox strict)"
        end
        return inbound(e, "an error value")
    end

    local function caught(ok, ...)
        if ok then
            return filter_results("a result", true, ...)
        end
        return false, error_value((...))
    end

    local function pcall_(f, ...)
        return caught(pcall(f, ...))
    end

    local function xpcall_(f, handler, ...)
        local h = handler
        if type(handler) == "function" then
            h = function(e)
                return handler(error_value(e))
            end
        end
        return caught(xpcall(f, h, ...))
    end

    local function resume_(co, ...)
        return caught(co_resume(co, ...))
    end

    local function wrap_(f)
        local w = co_wrap(f)
        return function(...)
            return filter_results("a coroutine result", w(...))
        end
    end

    -- ---- the library views ----

    local guarded_table = {
        insert = function(t, ...)
            check_writable(t, "table.insert")
            return tinsert(t, ...)
        end,
        remove = function(t, ...)
            check_writable(t, "table.remove")
            return tremove(t, ...)
        end,
        sort = function(t, ...)
            check_writable(t, "table.sort")
            return tsort(t, ...)
        end,
    }
    if table.move then
        local tmove = table.move
        guarded_table.move = function(a1, f, e, t, a2)
            check_writable(a2 or a1, "table.move")
            return tmove(a1, f, e, t, a2)
        end
    end

    local ov = {}   -- names with a view of their own

    local loaded_view, preload_view, loaders_view
    local function strict_package()
        return listed_proxy(package, "package", strict_libs.package, {
            loaded = loaded_view,
            seeall = function(m)
                check_writable(m, "package.seeall")
                real_setmetatable(m, { __index = env() })
            end,
        })
    end

    if strict then
        local L = strict_libs
        local names = L.string
        if caps.bytecode then
            names = { "dump", real_unpack(names) }
        end
        ov.string = listed_proxy(string, "string", names)
        ov.table = listed_proxy(table, "table", L.table, guarded_table)
        ov.math = listed_proxy(math, "math", L.math,
                               { random = random_,
                                 randomseed = randomseed_ })
        ov.coroutine = listed_proxy(coroutine, "coroutine", L.coroutine,
                                    { resume = resume_, wrap = wrap_ })
        ov.bit = listed_proxy(bit, "bit", L.bit)
        ov.os = listed_proxy(os, "os", L.os)
    else
        ov.string = fast_proxy(string, "string")
        ov.table = fast_proxy(table, "table", nil, guarded_table)
        ov.math = fast_proxy(math, "math")
        ov.coroutine = fast_proxy(coroutine, "coroutine")
        ov.bit = fast_proxy(bit, "bit")
        ov.os = fast_proxy(os, "os")
    end
    local ngx_mt = real_getmetatable(ngx)
    ov.ngx = fast_proxy(ngx, "ngx", { ctx = true, status = true }, nil, nil,
                        ngx_mt and ngx_mt.__index)
    if caps.io then
        ov.io = fast_proxy(io, "io")
    else
        ov.io = denied_table("io")
    end
    if caps.debug then
        ov.debug = fast_proxy(debug, "debug", nil, { getinfo = getinfo_ })
        ov.jit = fast_proxy(jit, "jit")
    elseif strict then
        -- Error handlers keep traceback (without code addresses); jit
        -- keeps its version constants.
        ov.debug = denied_table("debug", { traceback = traceback_ })
        ov.jit = denied_table("debug", { version = jit.version,
                                         version_num = jit.version_num,
                                         os = jit.os, arch = jit.arch })
    else
        -- What error handlers and log helpers use stays.
        ov.debug = denied_table("debug", { traceback = debug.traceback,
                                           getinfo = getinfo_ })
        ov.jit = denied_table("debug", { version = jit.version,
                                         version_num = jit.version_num,
                                         os = jit.os, arch = jit.arch,
                                         status = jit.status })
    end
    map[io] = ov.io
    map[debug] = ov.debug
    map[jit] = ov.jit

    local function capable_module(name)
        local cap = module_caps[name]
        if cap then
            if not caps[cap] then
                refuse(cap, 3)
            end
        elseif strict and not strict_module_ok(name) and ov[name] == nil
        then
            error("module '" .. tostring(name) .. "' is not available in "
                  .. "this location (lua_sandbox strict)", 3)
        end
    end

    local function hidden_module(k)
        if module_caps[k] then
            return not caps[module_caps[k]]
        end
        return strict and not strict_module_ok(k) and ov[k] == nil
    end

    -- A C module's proxy: a fast proxy whose functions are the wrappers a
    -- module's deep proxy hands out (method_of: the module as `self`
    -- unwrapped, every argument passed on as given), made at once.
    local function module_proxy(real, name)
        local p
        local wrappers, made = {}, {}
        for k, f in next, real do
            if type(f) == "function" then
                local w = made[f]
                if w == nil then
                    w = function(a1, ...)
                        if a1 == p then
                            a1 = real
                        end
                        return f(a1, ...)
                    end
                    made[f] = w
                    wrapped[w] = f
                end
                wrappers[k] = w
            end
        end
        p = fast_proxy(real, name, nil, wrappers)
        return p
    end

    local tclear
    -- "module 'x'" per name, made once: require runs on hot paths
    -- (balancer_by_lua, handlers that require at each call).
    local module_labels = {}
    -- name -> { the module's table, what require_ handed out for it }: a
    -- module required again is found with two lookups while
    -- package.loaded still holds that table (what is handed out depends
    -- on the table and this view only, the checks on the name).
    local required = {}
    local function require_first(name)
        capable_module(name)
        local v = ov[name]
        if v ~= nil then
            return v
        end
        v = real_require(name)
        if name == "table.clear" then
            tclear = tclear or function(t)
                check_writable(t, "table.clear")
                return v(t)
            end
            return tclear
        end
        local label = module_labels[name]
        if label == nil then
            label = "module '" .. tostring(name) .. "'"
            module_labels[name] = label
        end
        if type(v) ~= "table" or v == real_G then
            return state_value(v, label)
        end
        if not strict and map[v] == nil and builtin_modules[name]
            and not module_caps[name] and c_functions_only(v)
        then
            -- luaguard's own C modules (ngx.balancer, ngx.semaphore, ...)
            -- read like ngx.*: no function call per field read.
            -- fast_proxy registers the proxy before it is complete: a
            -- refused allocation must not leave it half made for the
            -- next request.
            local ok, err = pcall(module_proxy, v, label)
            if not ok then
                map[v] = nil
                error(err, 0)
            end
        end
        local r = state_value(v, label)
        required[name] = { v, r }
        return r
    end

    -- Apart from require_first, which makes a closure: LuaJIT compiles
    -- this one. Its tail call keeps the error levels of the checks.
    local function require_(name)
        local hit = required[name]
        if hit ~= nil and rawget(LOADED, name) == hit[1] then
            return hit[2]
        end
        return require_first(name)
    end

    -- package: path and cpath read-only; loaded, preload and loaders
    -- filtered so they hand out only what require would.
    loaded_view = real_setmetatable({}, {
        __index = function(_, k)
            local v = ov[k]
            if v ~= nil then
                return v
            end
            if k == "_G" then
                return env()
            end
            if hidden_module(k) then
                return nil
            end
            return state_value(package.loaded[k], "module '"
                                                  .. tostring(k) .. "'")
        end,
        __newindex = function(_, k) readonly_error("package.loaded", k) end,
    })
    real_of[loaded_view] = package.loaded
    protected[loaded_view] = "package.loaded"
    filtered[loaded_view] = true

    if strict then
        -- No preload, loaders or searchpath: a loader called directly
        -- would hand out a module's table unproxied.
        ov.package = strict_package()
    else
        preload_view = real_setmetatable({}, {
            __index = function(_, k)
                if hidden_module(k) then
                    return nil
                end
                return package.preload[k]
            end,
            __newindex = function(_, k)
                readonly_error("package.preload", k)
            end,
        })
        real_of[preload_view] = package.preload
        protected[preload_view] = "package.preload"
        filtered[preload_view] = true

        loaders_view = {}
        for i, f in real_ipairs(loaders) do
            loaders_view[i] = function(name, ...)
                local cap = module_caps[name]
                if cap and not caps[cap] then
                    return "\n\tcapability '" .. cap .. "' is not allowed"
                end
                return f(name, ...)
            end
        end
        ov.package = fast_proxy(package, "package", nil, {
            loaded = loaded_view, preload = preload_view,
            loaders = fast_proxy(loaders_view, "package.loaders", nil, nil,
                                 true),
            -- the real one hands out the worker's _G as __index
            seeall = function(m)
                check_writable(m, "package.seeall")
                real_setmetatable(m, { __index = env() })
            end,
        }, true)
    end

    -- ---- assemble ----
    local base = {
        pairs = pairs_, ipairs = ipairs_, next = next_,
        getfenv = getfenv_, setfenv = setfenv_,
        getmetatable = getmetatable_, setmetatable = setmetatable_,
        rawset = rawset_, load = load_, loadstring = loadstring_,
        loadfile = loadfile_, dofile = dofile_, require = require_,
        module = module_, collectgarbage = collectgarbage_for(caps),
    }
    if strict then
        base.tostring = strict_tostring
        base.pcall = pcall_
        base.xpcall = xpcall_
    end
    local names = strict and strict_globals or std_names
    for i = 1, #names do
        local k = names[i]
        local v = ov[k] or base[k]
        if v == nil then
            v = real_G[k]
            if type(v) == "table" then
                v = to_proxy(v, k)
            end
        end
        rawset(V, k, v)
    end

    -- What each request environment holds raw (src/security/sandbox.cpp,
    -- pushNewEnv): the view's ngx, and its name.
    rawset(M, 1, rawget(V, "ngx"))
    rawset(M, 2, "ngx")

    -- Modules loaded so far (init_by_lua) are worker state: read-only to
    -- request code from now on.
    for k, v in next, package.loaded do
        if type(v) == "table" and not protected[v] and not libraries[k] then
            protected[v] = "module '" .. tostring(k) .. "'"
        end
    end

    real_setmetatable(V, {
        __index = function(_, k)
            if k == "_G" then
                -- A request's environment holds no `_G` of its own (one
                -- field less to fill per request): the environment of
                -- the function that looked the name up is its `_G`.
                local e = real_getfenv(2)
                if real_getmetatable(e) == M then
                    env_escapes()
                    return e
                end
                return env()
            end
            if strict and builtin_globals[k] then
                return nil             -- not on the allowlist
            end
            local v = real_G[k]
            if type(v) == "table" or strict then
                return state_value(v, tostring(k))
            end
            return v
        end,
        __newindex = function(_, k) readonly_error("_G", k) end,
    })

    return M
end

return function(caps, key)
    local M = views[key]
    if M == nil then
        M = build(caps)
        views[key] = M
    end
    return M
end
