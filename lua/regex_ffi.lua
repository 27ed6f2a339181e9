-- ngx.re's fast path (see src/api/regex.cpp): match, find, gmatch, sub,
-- gsub and ngx.re.split in Lua over FFI calls to luaguard_re_*, so LuaJIT
-- can compile them into traces. Anything unusual goes to the C functions
-- passed in, which produce the exact errors. `cdef` is the declarations
-- of src/api/ffi_abi.hpp.
local cdef, c_match, c_find, c_gmatch, c_sub, c_gsub = ...
local ffi = require "ffi"
local C = ffi.C
ffi.cdef(cdef)
local R = C.luaguard_re_result()
local re_exec = C.luaguard_re_exec
local new_tab = require "table.new"
local type, sub, byte, ffi_string = type, string.sub, string.byte, ffi.string
local str_find = string.find
local FALLBACK = -1000
local NOMATCH = -1

-- Name tables of cached patterns by serial; bounded by clearing.
local names_cache, names_count = {}, 0
local group_out = ffi.new("int[1]")

local function get_names()
    local serial = R.serial
    if serial ~= 0 then
        local t = names_cache[serial]
        if t then
            return t
        end
    end
    local n = R.nnames
    local t = new_tab(2 * n, 0)
    for i = 0, n - 1 do
        local p = C.luaguard_re_name(R.re, i, group_out)
        t[2 * i + 1] = ffi_string(p)
        t[2 * i + 2] = group_out[0]
    end
    if serial ~= 0 then
        if names_count >= 4096 then
            names_cache, names_count = {}, 0
        end
        names_cache[serial] = t
        names_count = names_count + 1
    end
    return t
end

-- Handles of compile-once patterns by options and pattern string, so the
-- hot path finds its compiled pattern with two table lookups. Any
-- eviction from the C cache bumps R.gen and drops them all.
local handles, handles_gen = {}, -1

local function handle(regex, opts)
    if R.gen ~= handles_gen then
        handles, handles_gen = {}, R.gen
        return nil
    end
    local t = handles[opts]
    return t and t[regex]
end

-- After a call that found or compiled `regex`: keep its handle if cached.
local function remember(regex, opts)
    if R.serial == 0 then
        return
    end
    if R.gen ~= handles_gen then
        handles, handles_gen = {}, R.gen
    end
    local t = handles[opts]
    if not t then
        t = {}
        handles[opts] = t
    end
    t[regex] = R.re
end

-- ctx.pos as a 0-based offset; nil when the C path must handle ctx.
local function start_offset(ctx)
    if ctx == nil then
        return 0
    end
    if type(ctx) ~= "table" then
        return nil
    end
    local p = ctx.pos
    if p == nil then
        return 0
    end
    if type(p) ~= "number" or p % 1 ~= 0 then
        return nil
    end
    if p > 1 then
        return p - 1
    end
    return 0
end

-- One search from `pos`, shared by match and find: pcre2's return code
-- (the groups in R.ov), or FALLBACK when the C functions must do it.
local function search(subj, regex, opts, pos)
    local h = handle(regex, opts)
    local rc = re_exec(h, regex, #regex, opts, #opts, subj, #subj, pos, 0)
    if rc ~= FALLBACK and h == nil then
        remember(regex, opts)
    end
    return rc
end

local build

local function match(subj, regex, opts, ctx, res)
    if opts == nil then
        opts = ""
    end
    local pos = start_offset(ctx)
    if type(subj) ~= "string" or type(regex) ~= "string"
       or type(opts) ~= "string" or pos == nil
       or (res ~= nil and type(res) ~= "table")
    then
        return c_match(subj, regex, opts, ctx, res)
    end
    local rc = search(subj, regex, opts, pos)
    if rc == FALLBACK then
        return c_match(subj, regex, opts, ctx, res)
    end
    if rc < 0 then
        if rc == NOMATCH then
            return nil
        end
        return nil, "pcre_exec() failed: " .. rc
    end
    if ctx then
        ctx.pos = R.ov[1] + 1
    end
    return build(subj, res)
end

-- The match table for the last exec: [0..ncap] and named groups.
build = function(subj, res)
    local ov, ncap, nnames = R.ov, R.ncap, R.nnames
    local m = res or new_tab(ncap, nnames + 1)
    for i = 0, ncap do
        local a = ov[2 * i]
        if a >= 0 then
            m[i] = sub(subj, a + 1, ov[2 * i + 1])
        else
            m[i] = false
        end
    end
    if nnames > 0 then
        local names = get_names()
        local n = #names
        if R.dupnames == 0 then
            for j = 1, n, 2 do
                m[names[j]] = m[names[j + 1]]
            end
        else
            -- "D": each name maps to the values its groups matched.
            local j = 1
            while j <= n do
                local name, t, k = names[j], nil, 0
                while j <= n and names[j] == name do
                    local v = m[names[j + 1]]
                    if v then
                        t = t or {}
                        k = k + 1
                        t[k] = v
                    end
                    j = j + 2
                end
                if t then
                    m[name] = t
                end
            end
        end
    end
    return m
end

local function find(subj, regex, opts, ctx, nth)
    if opts == nil then
        opts = ""
    end
    local pos = start_offset(ctx)
    if nth == nil then
        nth = 0
    end
    if type(subj) ~= "string" or type(regex) ~= "string"
       or type(opts) ~= "string" or pos == nil
       or type(nth) ~= "number" or nth % 1 ~= 0
    then
        return c_find(subj, regex, opts, ctx, nth)
    end
    local rc = search(subj, regex, opts, pos)
    if rc == FALLBACK then
        return c_find(subj, regex, opts, ctx, nth)
    end
    if rc < 0 then
        if rc == NOMATCH then
            return nil
        end
        return nil, nil, "pcre_exec() failed: " .. rc
    end
    if nth < 0 then
        nth = 0
    end
    if nth > R.ncap then
        return nil, nil, "nth out of bound"
    end
    local ov = R.ov
    if ctx then
        ctx.pos = ov[1] + 1
    end
    local a = ov[2 * nth]
    if a < 0 then
        return nil, nil
    end
    return a + 1, ov[2 * nth + 1]
end

-- Compile-once patterns iterate here; others keep the C iterator, which
-- holds its compiled pattern instead of compiling it at every step.
local function gmatch(subj, regex, opts)
    if type(subj) ~= "string" or type(regex) ~= "string"
       or type(opts) ~= "string" or not str_find(opts, "o", 1, true)
    then
        return c_gmatch(subj, regex, opts)
    end
    local len = #subj
    -- Compiles (or finds) the pattern now, so errors surface here.
    local first = handle(regex, opts)
    if re_exec(first, regex, #regex, opts, #opts, subj, len, len + 1, 0)
       == FALLBACK
    then
        return c_gmatch(subj, regex, opts)
    end
    if first == nil then
        remember(regex, opts)
    end
    local pos, done, checked = 0, false, 0
    return function()
        if done then
            return nil
        end
        local h = handle(regex, opts)
        local rc = re_exec(h, regex, #regex, opts, #opts, subj, len, pos,
                           checked)
        if h == nil and rc ~= FALLBACK then
            remember(regex, opts)
        end
        checked = 1
        if rc < 0 then
            done = true
            if rc == NOMATCH then
                return nil
            end
            if rc == FALLBACK then
                return nil, "no memory"
            end
            return nil, "pcre_exec() failed: " .. rc
        end
        local ov = R.ov
        local from, to = ov[0], ov[1]
        if from == to then
            if to >= len then
                done = true
            end
            pos = to + 1
            if R.utf ~= 0 then
                while pos < len do
                    local b = byte(subj, pos + 1)
                    if b < 0x80 or b >= 0xC0 then
                        break
                    end
                    pos = pos + 1
                end
            end
        else
            pos = to
        end
        return build(subj, nil)
    end
end

-- Function replacements call back into Lua per match: C API path.
local function substitute(subj, regex, replace, opts, global, c_fn)
    if opts == nil then
        opts = ""
    end
    if type(subj) ~= "string" or type(regex) ~= "string"
       or type(replace) ~= "string" or type(opts) ~= "string"
    then
        return c_fn(subj, regex, replace, opts)
    end
    local h = handle(regex, opts)
    local n = C.luaguard_re_subst(h, regex, #regex, opts, #opts, subj, #subj,
                                  replace, #replace, global)
    if n == FALLBACK then
        return c_fn(subj, regex, replace, opts)
    end
    if h == nil then
        remember(regex, opts)
    end
    if n < 0 then
        if n == -1001 then
            return nil, nil, "failed to compile the replacement template"
        end
        return nil, nil, "pcre_exec() failed: " .. n
    end
    if n == 0 then
        return subj, 0
    end
    return ffi_string(R.out, R.outlen), n
end

-- require("ngx.re").split: the fields come from luaguard_re_split();
-- the C function is the fallback for errors and unusual arguments.
local c_split

local function split(subj, regex, opts, ctx, max, res)
    local o, mx = opts, max
    if o == nil then
        o = ""
    end
    if mx == nil then
        mx = 0
    end
    local pos = start_offset(ctx)
    if type(subj) ~= "string" or type(regex) ~= "string"
       or type(o) ~= "string" or pos == nil or type(mx) ~= "number"
       or mx % 1 ~= 0 or (res ~= nil and type(res) ~= "table")
    then
        return c_split(subj, regex, opts, ctx, max, res)
    end
    local h = handle(regex, o)
    local n = C.luaguard_re_split(h, regex, #regex, o, #o, subj, #subj, pos,
                                  mx)
    if n == FALLBACK then
        return c_split(subj, regex, opts, ctx, max, res)
    end
    if h == nil then
        remember(regex, o)
    end
    if n < 0 then
        return nil, "pcre_exec() failed: " .. n
    end
    local t = res or new_tab(n, 0)
    local ov = R.ov
    for i = 1, n do
        t[i] = sub(subj, ov[2 * i - 2] + 1, ov[2 * i - 1])
    end
    if res then
        local i = n + 1
        while t[i] ~= nil do
            t[i] = nil
            i = i + 1
        end
    end
    return t
end

local c_loader = package.preload["ngx.re"]
package.preload["ngx.re"] = function(...)
    local m = c_loader(...)
    c_split = m.split
    m.split = split
    return m
end

ngx.re.match = match
ngx.re.find = find
ngx.re.gmatch = gmatch
ngx.re.sub = function(subj, regex, replace, opts)
    return substitute(subj, regex, replace, opts, 0, c_sub)
end
ngx.re.gsub = function(subj, regex, replace, opts)
    return substitute(subj, regex, replace, opts, 1, c_gsub)
end
