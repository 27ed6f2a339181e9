-- Runs once per VM, before any configuration code. Receives the sentinel
-- value that marks yields owned by the nginx driver (I/O waits, ngx.exit)
-- and a probe that tells whether a budget is stopping the running code.
local sentinel, stopping = ...

-- User coroutines inside a handler may call APIs that wait on nginx
-- (ngx.sleep, sockets). Such a wait yields the sentinel; the wrappers pass
-- it up to the entry thread so the driver suspends the whole chain, then
-- hand the results back down when nginx resumes it.
local co_create, co_resume, co_yield, co_status =
    coroutine.create, coroutine.resume, coroutine.yield, coroutine.status
local error, select = error, select

local function pass(co, ok, ...)
    if ok and select("#", ...) == 1 and (...) == sentinel
        and co_status(co) == "suspended"
    then
        return pass(co, co_resume(co, co_yield(sentinel)))
    end
    return ok, ...
end

coroutine.resume = function(co, ...)
    return pass(co, co_resume(co, ...))
end

local function unwrap(ok, ...)
    if not ok then
        error((...), 0)
    end
    return ...
end

coroutine.wrap = function(f)
    local co = co_create(f)
    return function(...)
        return unwrap(pass(co, co_resume(co, ...)))
    end
end

package.loaded.ngx = ngx

-- Modules of lua-resty-core that luaguard provides register themselves in
-- package.preload (lua/resty_core.lua: every name of lua-resty-core
-- 0.1.25); any other "ngx.*" or "resty.core.*" name must not fall
-- through to the system's lua-resty-core, which needs lua-nginx-module's
-- C symbols. It fails with an error naming what is missing.
local preload = package.preload
local find, sub = string.find, string.sub
table.insert(package.loaders, 2, function(name)
    if preload[name] then
        return nil
    end
    if find(name, "^ngx%.") or sub(name, 1, 11) == "resty.core." then
        return function()
            error("module '" .. name .. "' is not implemented in luaguard yet",
                  2)
        end
    end
    return nil
end)

-- require marks a module as loading in package.loaded while its chunk
-- runs, and Lua 5.1 leaves that mark when the chunk fails: every later
-- require of it in this worker then fails with "loop or previous error
-- loading module". A failure that belongs to one request (its memory
-- budget, a refused allocation) must not break the module for the next.
local real_require, loaded, pcall, rawequal =
    require, package.loaded, pcall, rawequal
-- The mark is a private light userdata (which GC64 builds even show as a
-- number): read it from inside a load.
local loading_mark
preload["luaguard.probe"] = function(name) loading_mark = loaded[name] end
real_require("luaguard.probe")
preload["luaguard.probe"], loaded["luaguard.probe"] = nil, nil

local function settle(name, ok, ...)
    if not ok then
        if rawequal(loaded[name], loading_mark) then
            loaded[name] = nil
        end
        error((...), 0)  -- unchanged: require adds no position either
    end
    return ...
end
require = function(name)
    return settle(name, pcall(real_require, name))
end

-- A budget stop is not the script's to handle: xpcall's message handler
-- is not called for it. LuaJIT runs the handler of an error raised in a
-- hook (where budgets raise theirs) with hooks off, so no budget could
-- stop a loop in it: the watchdog would end the whole worker.
local real_xpcall = xpcall
xpcall = function(f, handler, ...)
    if type(handler) ~= "function" then
        return real_xpcall(f, handler, ...)  -- its own argument error
    end
    return real_xpcall(f, function(e)
        if stopping() then
            return e
        end
        return handler(e)
    end, ...)
end
