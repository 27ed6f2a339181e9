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
local R = C.luaguard_kv_result()
local new_tab = require "table.new"
local ffi_str = ffi.string
local type, floor, setmetatable = type, math.floor, setmetatable
local c_get_headers = req.get_headers
local c_get_uri_args = req.get_uri_args
local c_get_post_args = req.get_post_args
local c_resp_get_headers = resp.get_headers
local INT_MAX = 2147483647

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

-- The n pairs of R as a table: a repeated key's values become an array,
-- a null value (an argument without '=') is true.
local function build(n)
    local t = new_tab(0, n)
    local kv = R.kv
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
    return t
end

local function headers(c_list, c_fn)
    return function(max, raw)
        local m = max_arg(max)
        local n = m and c_list(m, raw and 1 or 0) or -1
        if n < 0 then
            return c_fn(max, raw)
        end
        local t = build(n)
        if not raw then
            setmetatable(t, headers_mt)
        end
        if R.truncated ~= 0 then
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
        local n = m and C.luaguard_req_get_args(which, m) or -1
        if n < 0 then
            return c_fn(max)
        end
        local t = build(n)
        if R.truncated ~= 0 then
            return t, "truncated"
        end
        return t
    end
end

req.get_uri_args = args(0, c_get_uri_args)
req.get_post_args = args(1, c_get_post_args)
