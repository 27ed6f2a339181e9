-- access_by_lua of /api/: the bearer token, then the user's rate limit.
local cjson = require "cjson.safe"
local limit_req = require "resty.limit.req"
local token = require "gateway.token"

local _M = {}

-- 1 request/s per user, with bursts of 6 more; past that, 429 at once
-- (resty.limit.req's "nodelay" use: the delay it returns is not waited).
-- Low, so that the demo's loop of curl calls meets it.
local RATE, BURST = 1, 6

local limiter


local function refuse(status, message, extra)
    ngx.status = status
    for k, v in pairs(extra or {}) do
        ngx.header[k] = v
    end
    ngx.say(cjson.encode({ error = message }))
    return ngx.exit(ngx.HTTP_OK)   -- the response is sent: end here
end


function _M.check()
    local auth = ngx.var.http_authorization
    local bearer = auth and string.match(auth, "^Bearer%s+(%S+)$")
    if not bearer then
        return refuse(401, "a bearer token is required (GET /token)",
                      { ["WWW-Authenticate"] = 'Bearer realm="luaguard"' })
    end
    local claims, err = token.verify(bearer)
    if not claims then
        return refuse(401, err, { ["WWW-Authenticate"] =
            'Bearer realm="luaguard", error="invalid_token"' })
    end
    ngx.ctx.user = claims.sub
    ngx.ctx.claims = claims

    if not limiter then
        limiter = assert(limit_req.new("ratelimit", RATE, BURST))
    end
    local delay, lerr = limiter:incoming(claims.sub, true)
    if not delay then
        if lerr == "rejected" then
            return refuse(429, "rate limit exceeded",
                          { ["Retry-After"] = "1" })
        end
        ngx.log(ngx.ERR, "rate limiter: ", lerr)
        return refuse(500, "internal error")
    end
end


return _M
