-- The __index of ngx and of ngx.var (see src/api/core.cpp ngxIndex and
-- src/api/var.cpp varIndex), in Lua: a metamethod that is a lua_CFunction
-- ends the trace LuaJIT records, so every handler that read ngx.ctx or
-- ngx.var ran interpreted. Here the read is a Lua call the trace takes in,
-- asking the C side through the FFI, for the VM named by `vm` (its cells
-- table's address). Whatever the fast path does not answer (a request
-- without its ngx.ctx table yet, a number key, another phase, every other
-- field) goes to the C functions, which give the exact errors.
local cdef, ngx_c_index, var_c_index, cells, vm = ...
local ffi = require "ffi"
ffi.cdef(cdef)
local C = ffi.C
local ctx_cell, var_get = C.luaguard_ctx_cell, C.luaguard_var_get
local ffi_string, type = ffi.string, type
vm = ffi.cast("const void *", vm)
-- Where var_get puts the value: nginx's memory, copied at once.
local value = ffi.new("luaguard_var_value_t")

local function ngx_index(t, k)
    if k == "ctx" then
        local cell = ctx_cell(vm)
        if cell ~= 0 then
            return cells[cell]
        end
    end
    return ngx_c_index(t, k)
end

local function var_index(t, k)
    if type(k) == "string" then
        local rc = var_get(vm, k, #k, value)
        if rc == 1 then
            return ffi_string(value.data, value.len)
        end
        if rc == 0 then
            return nil
        end
    end
    return var_c_index(t, k)
end

return ngx_index, var_index
