-- balancer_by_lua of `upstream backends`: round robin over the peers for
-- the first try of a request, the next peer when a try failed.
local balancer = require "ngx.balancer"

local _M = {}

local peers = {}


function _M.configure(list)
    peers = list
end


function _M.pick()
    local ctx = ngx.ctx
    local i
    if not balancer.get_last_failure() then
        -- One counter in shared memory: the workers take turns with one
        -- another too, not each on its own.
        local n = ngx.shared.balancer:incr("next", 1, 0)
        i = (n - 1) % #peers + 1
        ctx.tried = {}
        -- Each peer at most once per request.
        local ok, err = balancer.set_more_tries(#peers - 1)
        if not ok then
            ngx.log(ngx.ERR, "set_more_tries: ", err)
        end
    else
        i = ctx.peer % #peers + 1
    end
    ctx.peer = i
    local peer = peers[i]
    ctx.tried[#ctx.tried + 1] = peer.name
    local ok, err = balancer.set_current_peer(peer.host, peer.port)
    if not ok then
        ngx.log(ngx.ERR, "backend ", peer.name, ": ", err)
        return ngx.exit(500)
    end
end


return _M
