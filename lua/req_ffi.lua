-- ngx.req.get_headers' fast path (see src/api/req.cpp): the C side lists
-- the headers as pointers in one call and the table is built here, where
-- LuaJIT compiles the loop; a lua_CFunction pushing key and value through
-- the C API costs several API calls per header. Anything unusual goes to
-- the C function, which gives the exact errors. `cdef` is the declarations
-- of src/api/ffi_abi.hpp. The cdata never leaves this file: request code
-- gets a plain table.
local cdef, req, headers_mt = ...
local ffi = require "ffi"
ffi.cdef(cdef)
local C = ffi.C
local R = C.luaguard_kv_result()
local new_tab = require "table.new"
local ffi_str = ffi.string
local type, floor, setmetatable = type, math.floor, setmetatable
local c_get_headers = req.get_headers
local INT_MAX = 2147483647

req.get_headers = function(max, raw)
    if max == nil then
        max = 100
    elseif type(max) ~= "number" or max ~= floor(max) or max > INT_MAX then
        return c_get_headers(max, raw)
    elseif max < 0 then
        max = 0
    end
    local n = C.luaguard_req_get_headers(max, raw and 1 or 0)
    if n < 0 then
        return c_get_headers(max, raw)
    end
    local t = new_tab(0, n)
    local kv = R.kv
    for i = 0, n - 1 do
        local e = kv[i]
        local k = ffi_str(e.key, e.klen)
        local v = ffi_str(e.value, e.vlen)
        local old = t[k]
        if old == nil then
            t[k] = v
        elseif type(old) == "table" then
            old[#old + 1] = v
        else
            t[k] = {old, v}
        end
    end
    if not raw then
        setmetatable(t, headers_mt)
    end
    if R.truncated ~= 0 then
        return t, "truncated"
    end
    return t
end
