-- A module: its state is per worker, shared on purpose, as in OpenResty.
local _M = {}

local hits = 0

function _M.index()
    hits = hits + 1
    ngx.say("luaguard example app (worker ", ngx.worker.id(), ", ",
            hits, " hits on this worker)")
    ngx.say("")
    ngx.say("  /hello?name=you   a greeting")
    ngx.say("  /headers          headers set from Lua")
    ngx.say("  /sleep            ngx.sleep yields to nginx")
    ngx.say("  /runaway          an endless loop, stopped after 250 ms (500)")
    ngx.say("  /memory-bomb      stopped at 32 MiB (500)")
    ngx.say("  /global           request globals do not leak")
end

return _M
