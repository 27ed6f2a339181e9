-- The fast path of ngx.req.get_headers, get_uri_args, get_post_args and
-- ngx.resp.get_headers (see src/api/req.cpp and resp.cpp): the C side
-- lists the pairs as pointers in one call and the table is built here,
-- where LuaJIT compiles the loop; a lua_CFunction pushing key and value
-- through the C API costs several API calls per pair. Anything unusual
-- goes to the C functions, which give the exact errors. `cdef` is the
-- declarations of src/api/ffi_abi.hpp. The cdata never leaves this file:
-- request code gets plain tables.
local cdef, req, resp, headers_mt = ...
local ffi = require "ffi"
ffi.cdef(cdef)
local C = ffi.C
local new_tab = require "table.new"
local ffi_str = ffi.string
local type, floor, setmetatable, tonumber = type, math.floor, setmetatable,
                                          tonumber
local c_get_headers = req.get_headers
local c_get_uri_args = req.get_uri_args
local c_get_post_args = req.get_post_args
local c_resp_get_headers = resp.get_headers
local list_t = ffi.typeof("luaguard_kv_list_t")
local kv_t = ffi.typeof("luaguard_kv_t[?]")
local buf_t = ffi.typeof("char[?]")
local INT_MAX = 2147483647

-- The list the C side fills, with the arrays it points to (which it
-- anchors). A call takes it and gives it back once its table is built: a
-- call made meanwhile (from a finalizer) makes a list of its own, and an
-- error halfway only leaves the next call to make a new one.
local spare

local function grow(s, nkv, nbuf)
    local l = s[1]
    nkv = nkv < 64 and 64 or nkv
    nbuf = nbuf < 1024 and 1024 or nbuf
    s[2], s[3] = kv_t(nkv), buf_t(nbuf)
    l.kv, l.buf, l.kv_cap, l.buf_cap = s[2], s[3], nkv, nbuf
end

local function take()
    local s = spare
    if s then
        spare = nil
        return s
    end
    s = {list_t()}
    grow(s, 0, 0)
    return s
end

-- The max argument as the C functions read it, or nil for anything but an
-- integer (left to them).
local function max_arg(max)
    if max == nil then
        return 100
    end
    if type(max) ~= "number" or max ~= floor(max) or max > INT_MAX then
        return nil
    end
    return max < 0 and 0 or max
end

-- Fills a list with c_list(list, a, b): the list and the number of pairs,
-- or nil when the C function must answer.
local function fill(c_list, a, b)
    local s = take()
    local l = s[1]
    local n = c_list(l, a, b)
    if n == -2 then
        grow(s, tonumber(l.need_kv), tonumber(l.need_buf))
        n = c_list(l, a, b)
    end
    if n < 0 then
        spare = s
        return nil
    end
    return s, n
end

-- The n pairs of list s as a table: a repeated key's values become an
-- array, a null value (an argument without '=') is true. Gives s back.
local function build(s, n)
    local t = new_tab(0, n)
    local kv = s[2]
    for i = 0, n - 1 do
        local e = kv[i]
        local k = ffi_str(e.key, e.klen)
        local v = true
        if e.value ~= nil then
            v = ffi_str(e.value, e.vlen)
        end
        local old = t[k]
        if old == nil then
            t[k] = v
        elseif type(old) == "table" then
            old[#old + 1] = v
        else
            t[k] = {old, v}
        end
    end
    local truncated = s[1].truncated ~= 0
    spare = s
    return t, truncated
end

local function headers(c_list, c_fn)
    return function(max, raw)
        local m = max_arg(max)
        local s, n
        if m then
            s, n = fill(c_list, m, raw and 1 or 0)
        end
        if not s then
            return c_fn(max, raw)
        end
        local t, truncated = build(s, n)
        if not raw then
            setmetatable(t, headers_mt)
        end
        if truncated then
            return t, "truncated"
        end
        return t
    end
end

req.get_headers = headers(C.luaguard_req_get_headers, c_get_headers)
resp.get_headers = headers(C.luaguard_resp_get_headers, c_resp_get_headers)

local function args(which, c_fn)
    return function(max)
        local m = max_arg(max)
        local s, n
        if m then
            s, n = fill(C.luaguard_req_get_args, which, m)
        end
        if not s then
            return c_fn(max)
        end
        local t, truncated = build(s, n)
        if truncated then
            return t, "truncated"
        end
        return t
    end
end

req.get_uri_args = args(0, c_get_uri_args)
req.get_post_args = args(1, c_get_post_args)
