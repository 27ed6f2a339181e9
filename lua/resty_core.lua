-- The module names of lua-resty-core 0.1.25, on luaguard's own API.
--
-- lua-resty-core reimplements ngx.* in Lua over lua-nginx-module's
-- ngx_http_lua_ffi_* C functions and, once required, replaces the ngx.*
-- functions with its own. luaguard's ngx.* is built in, so here each
-- module only exports what lua-resty-core's exports (helpers libraries
-- use, version fields) and changes nothing when required: libraries that
-- require them for side effects or helpers load unchanged.
--
-- Functions whose only purpose is to hand lua-nginx-module internals to
-- FFI code (compiled-regex cdata, FFI string buffers for its C calls) are
-- either given a working equivalent or raise an error naming them
-- (docs/compatibility.md, "lua-resty-core modules").
--
-- Runs once per VM, before the sandbox is installed, with the worker's
-- real globals. Receives the C helpers of src/api/resty_core.cpp.
local C = ...

local ngx = ngx
local type, error, select, tostring, pairs, getmetatable =
    type, error, select, tostring, pairs, getmetatable
local find, lower, gsub, char = string.find, string.lower, string.gsub,
                                string.char
local ceil = math.ceil
local preload = package.preload

local VERSION = "0.1.25"
local subsystem = ngx.config.subsystem

local function define(name, open)
    preload[name] = open
end

local function versioned(field)
    return function()
        return { [field or "version"] = VERSION }
    end
end

-- An exported function that exists to hand lua-nginx-module internals to
-- FFI code: present (libraries probe for it), raising when called.
local function internal(modname, fname, instead)
    return function()
        error(modname .. "." .. fname .. " is not available in luaguard: "
              .. "it hands out lua-nginx-module internals for FFI calls"
              .. (instead and ("; use " .. instead) or ""), 2)
    end
end

-- ---- resty.core.base ----

define("resty.core.base", function()
    -- not before: table.clear, once required, is a field of `table`
    local new_tab = require "table.new"
    local clear_tab = require "table.clear"
    local ffi = require "ffi"
    local ffi_new = ffi.new
    local need_ffi = C.need_ffi
    local c_buf_type = ffi.typeof("char[?]")
    local str_buf_size, str_buf, size_ptr, errmsg = 4096, nil, nil, nil
    local FREE_LIST_REF = 0

    local _M = new_tab(0, 24)
    _M.version = VERSION
    _M.new_tab = new_tab
    _M.clear_tab = clear_tab

    -- FFI buffers: raw memory, so only for code that may use ffi.
    function _M.get_errmsg_ptr()
        need_ffi()
        if not errmsg then
            errmsg = ffi_new("char *[1]")
        end
        return errmsg
    end

    function _M.set_string_buf_size(size)
        if size <= 0 then
            return
        end
        str_buf = nil
        str_buf_size = ceil(size)
    end

    function _M.get_string_buf_size()
        return str_buf_size
    end

    function _M.get_size_ptr()
        need_ffi()
        if not size_ptr then
            size_ptr = ffi_new("size_t[1]")
        end
        return size_ptr
    end

    function _M.get_string_buf(size, must_alloc)
        need_ffi()
        if size > str_buf_size or must_alloc then
            return ffi_new(c_buf_type, size)
        end
        if not str_buf then
            str_buf = ffi_new(c_buf_type, str_buf_size)
        end
        return str_buf
    end

    function _M.ref_in_table(tb, key)
        if key == nil then
            return -1
        end
        local ref = tb[FREE_LIST_REF]
        if ref and ref ~= 0 then
            tb[FREE_LIST_REF] = tb[ref]
        else
            ref = #tb + 1
        end
        tb[ref] = key
        return ref
    end

    function _M.allows_subsystem(...)
        for i = 1, select("#", ...) do
            if select(i, ...) == subsystem then
                return
            end
        end
        error("unsupported subsystem: " .. subsystem, 2)
    end

    _M.FFI_OK = 0
    _M.FFI_NO_REQ_CTX = -100
    _M.FFI_BAD_CONTEXT = -101
    _M.FFI_ERROR = -1
    _M.FFI_AGAIN = -2
    _M.FFI_BUSY = -3
    _M.FFI_DONE = -4
    _M.FFI_DECLINED = -5

    -- An opaque handle of the running request (nil outside one): what
    -- libraries test for "am I in a request". lua-nginx-module's
    -- ngx_http_lua_ffi_* functions it would be passed to do not exist
    -- here (LuaJIT names the missing symbol).
    _M.get_request = C.request

    return _M
end)

-- ---- modules whose work luaguard's built-in API already does ----

for _, name in pairs({ "var", "shdict", "hash", "uri", "exit", "base64",
                       "phase", "ndk", "socket", "coroutine", "param" })
do
    define("resty.core." .. name, versioned())
end
define("resty.core.worker", versioned("_VERSION"))

define("resty.core.time", function()
    local msec = C.monotonic_msec
    return {
        version = VERSION,
        monotonic_msec = msec,
        monotonic_time = function()
            return msec() / 1000
        end,
    }
end)

define("resty.core.utils", function()
    return {
        version = VERSION,
        str_replace_char = function(str, f, replace)
            if not find(str, f, nil, true) then
                return str
            end
            -- one byte each, as the C function takes them
            local from = gsub(char(f:byte()), "%W", "%%%0")
            local to = gsub(char(replace:byte()), "%%", "%%%%")
            return (gsub(str, from, to))
        end,
    }
end)

define("resty.core.ctx", function()
    return {
        _VERSION = VERSION,
        -- lua-nginx-module uses `ctx` only when the request has no
        -- ngx.ctx yet (its SSL phases); reading ngx.ctx creates it.
        get_ctx_table = function()
            return ngx.ctx
        end,
    }
end)

-- ngx.* keys computed by functions (ngx.ctx, ngx.status are luaguard's):
-- more can be registered, as lua-resty-core allows. The ngx table is
-- every request's, so registering is for code outside requests (init
-- phases, modules loaded there).
define("resty.core.misc", function()
    local getters, setters
    local function install()
        if getters then
            return
        end
        getters, setters = {}, {}
        local mt = getmetatable(ngx)
        local c_index, c_newindex = mt.__index, mt.__newindex
        mt.__index = function(t, k)
            local f = getters[k]
            if f then
                return f()
            end
            return c_index(t, k)
        end
        mt.__newindex = function(t, k, v)
            local f = setters[k]
            if f then
                return f(v)
            end
            return c_newindex(t, k, v)
        end
    end
    local function register(which)
        return function(key, func)
            if C.in_request() then
                error("resty.core.misc: magic keys of ngx are registered "
                      .. "by init_by_lua* code, not by request code: ngx "
                      .. "is shared by every request", 2)
            end
            install()
            if which == "get" then
                getters[key] = func
            else
                setters[key] = func
            end
        end
    end
    return {
        _VERSION = VERSION,
        register_ngx_magic_key_getter = register("get"),
        register_ngx_magic_key_setter = register("set"),
    }
end)

define("resty.core.regex", function()
    local M = "resty.core.regex"
    local instead = "ngx.re.match, ngx.re.find, ngx.re.sub, ngx.re.gsub"
    return {
        version = VERSION,
        -- luaguard's substitution buffers size themselves
        set_buf_grow_ratio = function() end,
        is_regex_cache_empty = C.regex_cache_empty,
        re_match_compile = internal(M, "re_match_compile", instead),
        re_sub_compile = internal(M, "re_sub_compile", instead),
        collect_captures = internal(M, "collect_captures", instead),
        destroy_compiled_regex = internal(M, "destroy_compiled_regex",
                                          instead),
        check_buf_size = internal(M, "check_buf_size"),
    }
end)

-- Header setters with lua-resty-core's signatures and errors, over
-- ngx.req.set_header / ngx.header. Adding (override false) keeps the
-- values already there.
local function header_values(old, value)
    local vals = {}
    if type(old) == "table" then
        for i = 1, #old do
            vals[#vals + 1] = old[i]
        end
    elseif old ~= nil then
        vals[1] = old
    end
    if type(value) == "table" then
        for i = 1, #value do
            vals[#vals + 1] = tostring(value[i])
        end
    else
        vals[#vals + 1] = tostring(value)
    end
    return vals
end

local function set_req_header(name, value, override)
    if not C.request() then
        error("no request found", 3)
    end
    if name == nil then
        error("bad 'name' argument: string expected, got nil", 3)
    end
    if type(name) ~= "string" then
        name = tostring(name)
    end
    if override then
        return ngx.req.set_header(name, value)
    end
    if value == nil then
        error("bad 'value' argument: string or table expected, got nil", 3)
    end
    if type(value) == "table" and #value == 0 then
        error("bad 'value' argument: non-empty table expected", 3)
    end
    local old = ngx.req.get_headers(0)[lower(name)]
    if old == nil and type(value) ~= "table" then
        return ngx.req.set_header(name, value)
    end
    return ngx.req.set_header(name, header_values(old, value))
end

define("resty.core.request", function()
    return { version = VERSION, set_req_header = set_req_header }
end)

local function set_resp_header(_, key, value, no_override)
    if not C.request() then
        error("no request found")
    end
    if type(key) ~= "string" then
        key = tostring(key)
    end
    if not no_override then
        ngx.header[key] = value
        return
    end
    if value == nil then
        error("invalid header value", 3)
    end
    if type(value) == "table" and #value == 0 then
        return
    end
    local old = ngx.header[key]
    if old == nil and type(value) ~= "table" then
        ngx.header[key] = value
        return
    end
    ngx.header[key] = header_values(old, value)
end

define("resty.core.response", function()
    return { version = VERSION, set_resp_header = set_resp_header }
end)

define("ngx.req", function()
    return {
        version = VERSION,
        add_header = function(key, value)
            set_req_header(key, value, false)
        end,
    }
end)

define("ngx.resp", function()
    return {
        version = VERSION,
        add_header = function(key, value)
            set_resp_header(nil, key, value, true)
        end,
    }
end)

-- ---- ngx.errlog ----
-- The capture buffer of lua_capture_error_log is src/api/errlog.cpp's.
define("ngx.errlog", function()
    local errlog_get, errlog_set_filter = C.errlog_get, C.errlog_set_filter
    return {
        version = VERSION,
        set_filter_level = function(level)
            if not level then
                return nil, [[missing "level" argument]]
            end
            if type(level) ~= "number" then
                error("bad argument #1 to 'set_filter_level' (number "
                      .. "expected, got " .. type(level) .. ")", 2)
            end
            return errlog_set_filter(level)
        end,
        get_logs = function(max, res)
            max = max or 10
            -- lua-resty-core sizes its result table first: a non-number
            -- fails there, with this message
            local _ = max * 3
            if res ~= nil and type(res) ~= "table" then
                error("bad argument #2 to 'get_logs' (table expected, got "
                      .. type(res) .. ")", 2)
            end
            return errlog_get(max, res)
        end,
        get_sys_filter_level = C.sys_filter_level,
        raw_log = function(level, msg)
            if type(level) ~= "number" then
                error("bad argument #1 to 'raw_log' (must be a number)", 2)
            end
            if type(msg) ~= "string" then
                error("bad argument #2 to 'raw_log' (must be a string)", 2)
            end
            if not C.raw_log(level, msg) then
                error("bad log level", 2)
            end
        end,
    }
end)

-- ---- ndk.set_var (src/api/ndk.cpp) ----
-- The global `ndk` of lua-nginx-module: ndk.set_var.DIRECTIVE(value)
-- runs the filter of a directive registered through ngx_devel_kit.
do
    local ndk_find, ndk_call = C.ndk_find, C.ndk_call
    local getinfo = debug.getinfo
    local set_var = setmetatable({}, {
        __index = function(_, name)
            local cmd = type(name) == "string" and ndk_find(name)
            if not cmd then
                -- blame the indexing code, not the sandbox's read-only
                -- proxy between it and this table
                local level = 2
                while (getinfo(level, "S") or {}).source
                      == "=luaguard.sandbox" do
                    level = level + 1
                end
                error('ndk.set_var: directive "' .. tostring(name)
                      .. '" not found or does not use ndk_set_var_value',
                      level)
            end
            return function(value)
                return ndk_call(cmd, tostring(value))
            end
        end,
        __newindex = function()
            error("not allowed", 2)
        end,
    })
    ndk = { set_var = set_var }
end

-- ---- ngx.get_raw_phase ----
-- lua-resty-core's (resty/core/phase.lua): the numeric context of the
-- phase, for its coroutine wrappers; `r` is get_request()'s handle.
do
    local get_phase = ngx.get_phase
    local raw = {
        set = 0x0001, rewrite = 0x0002, access = 0x0004, content = 0x0008,
        log = 0x0010, header_filter = 0x0020, body_filter = 0x0040,
        timer = 0x0080, init_worker = 0x0100, balancer = 0x0200,
        ssl_cert = 0x0400, ssl_session_store = 0x0800,
        ssl_session_fetch = 0x1000, exit_worker = 0x2000,
        ssl_client_hello = 0x4000, server_rewrite = 0x8000,
    }
    ngx.get_raw_phase = function(r)
        local n = r ~= nil and raw[get_phase()]
        if not n then
            error("no request found", 2)
        end
        return n
    end
end

-- ---- ngx.pipe ----
define("ngx.pipe", function()
    return C.pipe_module()   -- api/pipe.cpp
end)

-- ---- resty.core itself: loads them all, as lua-resty-core's does ----
define("resty.core", function()
    local names = { "var", "worker", "regex", "shdict", "time", "hash",
                    "uri", "exit", "base64", "request", "response",
                    "phase", "ndk", "socket", "coroutine", "param", "misc",
                    "ctx" }
    for i = 1, #names do
        require("resty.core." .. names[i])
    end
    return { version = VERSION }
end)
