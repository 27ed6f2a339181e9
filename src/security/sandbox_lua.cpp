// The Lua half of the sandbox. Kept in a C++ raw string so the build needs
// no new embedding step. Runs once per VM with the worker's real globals;
// see sandbox.hpp for the design and docs/security.md for the rules.

namespace luaguard::sandbox {

extern const char kSandboxLua[];

const char kSandboxLua[] = R"LUA(
local C = ...
local allowed, refuse, current_env = C.allowed, C.refuse, C.current_env

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
local tinsert, tremove, tsort = table.insert, table.remove, table.sort
local package = package
local searchpath = package.searchpath

local weak_k = { __mode = "k" }

-- Every table request code must not modify, by name: real library tables,
-- their proxies and the metatables involved. Shared by all views.
local protected = real_setmetatable({}, weak_k)
-- proxy -> the real table behind it.
local real_of = real_setmetatable({}, weak_k)

protected[real_G] = "_G"
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

-- Modules whose loading needs a capability.
local module_caps = {
    ffi = "ffi",
    ["jit.util"] = "debug", ["jit.profile"] = "debug",
    ["jit.dump"] = "debug", ["jit.v"] = "debug", ["jit.p"] = "debug",
    ["jit.bcsave"] = "debug", ["jit.zone"] = "debug",
}

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

local function build(caps)
    local V = {}                       -- the view
    local M = { __index = V }          -- every request env's metatable
    local map = real_setmetatable({}, weak_k)  -- real -> proxy, this view

    protected[V] = "_G"
    protected[M] = "_G metatable"

    local function env()
        return current_env() or real_setmetatable({}, M)
    end

    local deep_proxy

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

    local function newindex_for(real, name, forward)
        if forward then
            return function(_, k, v)
                if forward[k] then
                    forward_to(real, k, v)
                    return
                end
                readonly_error(name, k)
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
        return function(_, k)
            readonly_error(name, k)
        end
    end

    -- Functions read through a module's proxy get their first argument
    -- unwrapped when it is that same proxy: `mod:new()` hands the module
    -- its own table as `self` (classes that do setmetatable(o, self) keep
    -- working). Other proxies stay proxies: a generic helper in a module
    -- must not become a way to write to `string`.
    local function method_of(f, real, p, cache)
        local w = cache[f]
        if w == nil then
            w = function(a1, ...)
                if a1 == p then
                    a1 = real
                end
                return f(a1, ...)
            end
            cache[f] = w
        end
        return w
    end

    -- Values reached through it become proxies too. Used for modules and
    -- worker-level tables: always live, one function call per access.
    deep_proxy = function(real, name)
        local p = {}
        local cache = real_setmetatable({}, weak_k)
        local mt = {
            __index = function(_, k)
                local v = real[k]
                local t = type(v)
                if t == "table" then
                    return to_proxy(v, name .. "." .. tostring(k))
                end
                if t == "function" then
                    return method_of(v, real, p, cache)
                end
                return v
            end,
            __newindex = newindex_for(real, name),
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
    -- lookup once JIT-compiled); table fields get their own proxies,
    -- stored raw, built now: library sub-tables are not replaced later.
    local function fast_proxy(real, name, forward, overrides)
        local existing = map[real]
        if existing then
            return existing
        end
        local p = {}
        map[real] = p
        protected[real] = protected[real] or name
        for k, v in next, real do
            if type(v) == "table" and type(k) == "string" and v ~= real_G
                and not (overrides and overrides[k] ~= nil)
            then
                rawset(p, k, fast_proxy(v, name .. "." .. k))
            end
        end
        if overrides then
            for k, v in next, overrides do
                rawset(p, k, v)
            end
        end
        local mt = { __index = real,
                     __newindex = newindex_for(real, name, forward) }
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

    -- A table every access to which is refused (a denied library).
    local function denied_table(cap, keep)
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

    local function next_(t, k)
        local real = type(t) == "table" and real_of[t]
        if not real then
            return next(t, k)
        end
        local nk, nv = next(real, k)
        if filtered[t] then
            while nk ~= nil do
                nv = t[nk]
                if nv ~= nil then
                    return nk, nv
                end
                nk = next(real, nk)
            end
            return nil
        end
        if type(nv) == "table" then
            nv = to_proxy(nv, protected[t] .. "." .. tostring(nk))
        end
        return nk, nv
    end

    local function pairs_(t)
        local real = type(t) == "table" and real_of[t]
        if not real then
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
            return i, to_proxy(v, protected[t] .. "[" .. i .. "]")
        end, t, 0
    end

    local function getfenv_(f)
        local r
        if f == nil then
            r = real_getfenv(2)
        elseif type(f) == "number" then
            r = real_getfenv(f > 0 and f + 1 or f)
        else
            r = real_getfenv(f)
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
        if cur == real_G or protected[cur] then
            error("cannot change the environment of a function shared "
                  .. "with other requests", 2)
        end
        local r = real_setfenv(target, t)
        return r
    end

    local function getmetatable_(x)
        local mt = real_getmetatable(x)
        if type(mt) == "table" and protected[mt] then
            return to_proxy(mt)
        end
        return mt
    end

    local function setmetatable_(t, mt)
        check_writable(t, "setmetatable")
        if type(mt) == "table" and real_of[mt] then
            mt = real_of[mt]           -- metamethods are looked up raw
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
        real_setfenv(fn, type(fenv) == "table" and fenv or env())
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

    ov.string = fast_proxy(string, "string")
    ov.table = fast_proxy(table, "table", nil, guarded_table)
    ov.math = fast_proxy(math, "math")
    ov.coroutine = fast_proxy(coroutine, "coroutine")
    ov.bit = fast_proxy(bit, "bit")
    ov.os = fast_proxy(os, "os")
    ov.ngx = fast_proxy(ngx, "ngx", { ctx = true, status = true })
    if caps.io then
        ov.io = fast_proxy(io, "io")
    else
        ov.io = denied_table("io")
    end
    if caps.debug then
        ov.debug = fast_proxy(debug, "debug")
        ov.jit = fast_proxy(jit, "jit")
    else
        -- What error handlers and log helpers use stays.
        ov.debug = denied_table("debug", { traceback = debug.traceback,
                                           getinfo = debug.getinfo })
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
        if cap and not caps[cap] then
            refuse(cap, 3)
        end
    end

    local tclear
    local function require_(name)
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
        return to_proxy(v, "module '" .. tostring(name) .. "'")
    end

    -- package: path and cpath read-only; loaded, preload and loaders
    -- filtered so they hand out only what require would.
    local loaded_view = real_setmetatable({}, {
        __index = function(_, k)
            local v = ov[k]
            if v ~= nil then
                return v
            end
            if k == "_G" then
                return env()
            end
            if module_caps[k] and not caps[module_caps[k]] then
                return nil
            end
            return to_proxy(package.loaded[k], "module '" .. tostring(k)
                                                .. "'")
        end,
        __newindex = function(_, k) readonly_error("package.loaded", k) end,
    })
    real_of[loaded_view] = package.loaded
    protected[loaded_view] = "package.loaded"
    filtered[loaded_view] = true

    local preload_view = real_setmetatable({}, {
        __index = function(_, k)
            if module_caps[k] and not caps[module_caps[k]] then
                return nil
            end
            return package.preload[k]
        end,
        __newindex = function(_, k) readonly_error("package.preload", k) end,
    })
    real_of[preload_view] = package.preload
    protected[preload_view] = "package.preload"
    filtered[preload_view] = true

    local loaders_view = {}
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
        loaders = fast_proxy(loaders_view, "package.loaders"),
        -- the real one hands out the worker's _G as __index
        seeall = function(m)
            check_writable(m, "package.seeall")
            real_setmetatable(m, { __index = env() })
        end,
    })

    -- ---- assemble ----
    local base = {
        pairs = pairs_, ipairs = ipairs_, next = next_,
        getfenv = getfenv_, setfenv = setfenv_,
        getmetatable = getmetatable_, setmetatable = setmetatable_,
        rawset = rawset_, load = load_, loadstring = loadstring_,
        loadfile = loadfile_, dofile = dofile_, require = require_,
        module = module_,
    }
    for i = 1, #std_names do
        local k = std_names[i]
        local v = ov[k] or base[k]
        if v == nil then
            v = real_G[k]
            if type(v) == "table" then
                v = to_proxy(v, k)
            end
        end
        rawset(V, k, v)
    end

    -- Modules loaded so far (init_by_lua) are worker state: read-only to
    -- request code from now on.
    for k, v in next, package.loaded do
        if type(v) == "table" and not protected[v] and not libraries[k] then
            protected[v] = "module '" .. tostring(k) .. "'"
        end
    end

    real_setmetatable(V, {
        __index = function(_, k)
            local v = real_G[k]
            if type(v) == "table" then
                return to_proxy(v, tostring(k))
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
)LUA";

}  // namespace luaguard::sandbox
