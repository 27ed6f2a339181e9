-- Lists the Lua API a module offers, one "name kind" line each: the ngx
-- table (recursively), the methods of the objects it hands out, and the
-- members of every module in `modules` that `require` finds. The caller
-- defines `modules` and `method_names` (the dictionary methods to look
-- for) before this chunk. kind: "value", "pending" (luaguard's placeholder for
-- an API it does not have yet), "missing" (a module require refused) or
-- "member" (a field of a module table).
local out, seen = {}, {}
-- Filled per request or per configuration, not API names.
local skip = {["ngx.shared"] = true, ["ngx.var"] = true, ["ngx.ctx"] = true,
              ["ngx.header"] = true, ["ngx.arg"] = true}

local function pending(v)
    local mt = type(v) == "table" and getmetatable(v)
    return mt and type(mt.__name) == "string" and mt.__call ~= nil
end

local function walk(t, prefix, depth)
    if seen[t] or depth > 4 then
        return
    end
    seen[t] = true
    for k, v in pairs(t) do
        if type(k) == "string" and k:sub(1, 1) ~= "_" then
            local name = prefix .. "." .. k
            if pending(v) then
                out[#out + 1] = name .. " pending"
            else
                out[#out + 1] = name .. " value"
                if type(v) == "table" and not skip[name] then
                    walk(v, name, depth + 1)
                end
            end
        end
    end
end

-- Methods, by name: lua-nginx-module's objects are tables with a
-- metatable, luaguard's dictionaries userdata; indexing finds both.
local function methods(obj, prefix, names)
    for _, k in ipairs(names) do
        local ok, v = pcall(function() return obj[k] end)
        if ok and type(v) == "function" then
            out[#out + 1] = prefix .. ":" .. k .. " value"
        end
    end
    local mt = getmetatable(obj)
    if #names == 0 and type(mt) == "table" and type(mt.__index) == "table"
    then
        for k, v in pairs(mt.__index) do
            if type(k) == "string" and type(v) == "function"
               and k:sub(1, 1) ~= "_" then
                out[#out + 1] = prefix .. ":" .. k .. " value"
            end
        end
    end
end

walk(ngx, "ngx", 0)
methods(ngx.socket.tcp(), "tcpsock", {})
methods(ngx.socket.udp(), "udpsock", {})
methods(ngx.shared.d, "ngx.shared.DICT", method_names)
for _, m in ipairs(modules) do
    local ok, mod = pcall(require, m)
    if not ok then
        out[#out + 1] = 'require "' .. m .. '" missing'
    else
        out[#out + 1] = 'require "' .. m .. '" value'
        if m:sub(1, 4) == "ngx." and type(mod) == "table" then
            for k in pairs(mod) do
                if type(k) == "string" and k:sub(1, 1) ~= "_" then
                    out[#out + 1] = m .. "." .. k .. " member"
                end
            end
        end
    end
end
local ok, sema = pcall(require, "ngx.semaphore")
if ok then
    methods(sema.new(0), "semaphore", {"wait", "post", "count"})
end
table.sort(out)
ngx.say(table.concat(out, "\n"))
