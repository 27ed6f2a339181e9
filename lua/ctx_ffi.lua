-- ngx's __index (see src/api/core.cpp, ngxIndex): ngx.ctx without a
-- lua_CFunction call. A metamethod that is a C function ends the trace
-- LuaJIT records, so every handler that read ngx.ctx ran interpreted, each
-- read a C call; here the read is a Lua call the trace takes in, asking the
-- running request's cell of `cells` (the VM's, identified by `vm`) through
-- the FFI. A request without its table yet, and every other key, go to
-- the C function, which creates the table and gives the exact errors.
local cdef, c_index, cells, vm = ...
local ffi = require "ffi"
ffi.cdef(cdef)
local ctx_cell = ffi.C.luaguard_ctx_cell
vm = ffi.cast("const void *", vm)

return function(t, k)
    if k == "ctx" then
        local cell = ctx_cell(vm)
        if cell ~= 0 then
            return cells[cell]
        end
    end
    return c_index(t, k)
end
