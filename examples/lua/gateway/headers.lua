-- header_filter_by_lua of the gateway: every response, Lua's, a proxied
-- backend's or nginx's own error pages, leaves with these.
local request = require "gateway.request"

local _M = {}


function _M.harden()
    local h = ngx.header
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "no-referrer"
    h["Content-Security-Policy"] = "default-src 'none'; frame-ancestors 'none'"
    h["Cross-Origin-Resource-Policy"] = "same-origin"
    h["Cache-Control"] = "no-store"
    -- What a backend says about itself is nobody else's business.
    h["X-Powered-By"] = nil
    h["X-Backend-Version"] = nil
    h["X-Request-Id"] = request.id()
    local tried = ngx.ctx.tried
    if tried then
        h["X-Upstream-Tries"] = table.concat(tried, ",")
    end
end


return _M
