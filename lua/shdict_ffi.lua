-- ngx.shared.DICT's hot methods (get, get_stale, set, safe_set, add,
-- safe_add, replace, incr) in Lua over FFI calls to luaguard_shdict_*
-- (src/api/shdict.cpp): LuaJIT compiles these calls into traces, where a
-- lua_CFunction would end the trace on every call. Argument checks mirror
-- the C methods, which stay as the fallbacks. `cdef` is the declarations
-- of src/api/ffi_abi.hpp.
local methods, cdef = ...
local ffi = require "ffi"
ffi.cdef(cdef)
local C = ffi.C
-- The C methods, for what the fast path hands back: a refusal (-2) is
-- raised by them with the sandbox's message.
local slow = {}
for k, v in pairs(methods) do slow[k] = v end
local out = ffi.new("struct luaguard_shdict_out")
local ffi_string = ffi.string
local type, tostring, tonumber, error = type, tostring, tonumber, error
local errs = {"not found", "exists", "no memory", "not a number",
              "value not a list", "value is a list"}

-- Traces cannot pass a light userdata to a void * parameter: each dict
-- table's zone is converted to a pointer cdata once and cached. The C side
-- still checks the pointer against the configured zones on every call.
local ptrs = setmetatable({}, {__mode = "k"})
local function zone(self)
    local p = ptrs[self]
    if p then return p end
    if type(self) ~= "userdata" then error('bad "zone" argument', 3) end
    -- The C side validates the pointer on every call: a foreign userdata
    -- only ever gets 'bad "zone" argument'.
    p = ffi.cast("void **", self)[0]
    ptrs[self] = p
    return p
end

local function checkKey(key)
    if key == nil then return nil, "nil key" end
    if type(key) ~= "string" then key = tostring(key) end
    local n = #key
    if n == 0 then return nil, "empty key" end
    if n > 65535 then return nil, "key too long" end
    return key
end

local function value()
    local t = out.type
    if t == 4 then return ffi_string(out.str, out.len) end
    if t == 3 then return out.num end
    return out.num ~= 0
end

local function get(self, key, stale)
    local z = zone(self)
    local k, err = checkKey(key)
    if not k then return nil, err end
    local rc = C.luaguard_shdict_get(z, k, #k, stale, out)
    if rc == -2 then
        return (stale == 0 and slow.get or slow.get_stale)(self, key)
    end
    if rc == 1 then return nil end
    if rc < 0 then error('bad "zone" argument', 2) end
    if rc ~= 0 then return nil, errs[rc] end
    local v = value()
    local flags = out.flags
    if stale == 0 then
        if flags == 0 then return v end
        return v, flags
    end
    return v, flags ~= 0 and flags or nil, out.stale ~= 0
end

methods.get = function(self, key) return get(self, key, 0) end
methods.get_stale = function(self, key) return get(self, key, 1) end

local store_names = {[0] = {[0] = "set", [1] = "safe_set"},
                     [1] = {[0] = "add", [1] = "safe_add"},
                     [2] = {[0] = "replace", [1] = "replace"}}

local function store(self, op, safe, key, val, exptime, flags)
    local z = zone(self)
    local k, err = checkKey(key)
    if not k then return nil, err end
    local vt, str, len, num = 0, nil, 0, 0
    local tv = type(val)
    if tv == "string" then
        vt, str, len = 4, val, #val
    elseif tv == "number" then
        vt, num = 3, val
    elseif tv == "boolean" then
        vt, num = 1, val and 1 or 0
    elseif tv ~= "nil" then
        return nil, "bad value type"
    end
    if exptime == nil then
        exptime = 0
    elseif type(exptime) ~= "number" or exptime < 0 then
        error('bad "exptime" argument', 2)
    end
    if flags == nil then
        flags = 0
    elseif type(flags) ~= "number" then
        error('bad "flags" argument', 2)
    end
    if vt == 0 and op ~= 0 then
        return false, "attempt to add or replace nil values", false
    end
    local rc = C.luaguard_shdict_store(z, op, safe, k, #k, vt, str, len, num,
                                       exptime, flags, out)
    if rc == 0 then return true, nil, out.forcible ~= 0 end
    if rc == -2 then
        return slow[store_names[op][safe]](self, key, val, exptime, flags)
    end
    if rc < 0 then error('bad "zone" argument', 2) end
    return false, errs[rc], out.forcible ~= 0
end

methods.set = function(self, k, v, e, f)
    return store(self, 0, 0, k, v, e, f)
end
methods.safe_set = function(self, k, v, e, f)
    return store(self, 0, 1, k, v, e, f)
end
methods.add = function(self, k, v, e, f)
    return store(self, 1, 0, k, v, e, f)
end
methods.safe_add = function(self, k, v, e, f)
    return store(self, 1, 1, k, v, e, f)
end
methods.replace = function(self, k, v, e, f)
    return store(self, 2, 0, k, v, e, f)
end

methods.incr = function(self, key, delta, init, init_ttl)
    local z = zone(self)
    local k, err = checkKey(key)
    if not k then return nil, err end
    local d = tonumber(delta)
    if not d then
        error('bad "value" argument: number expected, got ' .. type(delta), 2)
    end
    local has_init = 0
    if init ~= nil then
        if type(init) ~= "number" then
            error("bad init arg: number expected, got " .. type(init), 2)
        end
        has_init = 1
    else
        init = 0
    end
    if init_ttl ~= nil then
        if has_init == 0 then
            error('must provide "init" when providing "init_ttl"', 2)
        end
        if type(init_ttl) ~= "number" then
            error("bad init_ttl arg: number expected, got " .. type(init_ttl),
                  2)
        end
        if init_ttl < 0 then error('bad "init_ttl" argument', 2) end
    else
        init_ttl = 0
    end
    local rc = C.luaguard_shdict_incr(z, k, #k, d, has_init, init, init_ttl,
                                      out)
    if rc == -2 then return slow.incr(self, key, delta, init, init_ttl) end
    if rc == 0 then
        if has_init == 0 then return out.num end
        return out.num, nil, out.forcible ~= 0
    end
    if rc < 0 then error('bad "zone" argument', 2) end
    if rc == 3 then return nil, errs[rc], out.forcible ~= 0 end
    return nil, errs[rc]
end
