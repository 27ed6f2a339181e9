-- Bearer tokens: base64url(JSON claims) "." base64url(HMAC-SHA1(key,
-- claims)). The key is random per start of nginx (made in init_by_lua,
-- before the workers fork, so all of them share it): a restart or a
-- reload signs anew and the old tokens stop working. A real deployment
-- would read the key from a secret store instead.
local b64 = require "ngx.base64"
local cjson = require "cjson.safe"

local _M = {}

local key

local TTL = 3600


function _M.init()
    local f = assert(io.open("/dev/urandom", "rb"))
    key = assert(f:read(32))
    f:close()
end


local function sign(payload)
    return b64.encode_base64url(ngx.hmac_sha1(key, payload))
end


function _M.issue(user, plan)
    local claims = { sub = user, plan = plan, exp = ngx.time() + TTL }
    local payload = b64.encode_base64url(cjson.encode(claims))
    return payload .. "." .. sign(payload), claims
end


-- The claims of a valid, unexpired token; nil and why otherwise.
function _M.verify(token)
    local payload, mac = string.match(token or "", "^([%w_-]+)%.([%w_-]+)$")
    if not payload then
        return nil, "malformed token"
    end
    -- Both sides are digests of the same length made here: comparing them
    -- tells an attacker nothing about the key.
    if sign(payload) ~= mac then
        return nil, "bad signature"
    end
    local json = b64.decode_base64url(payload)
    local claims = json and cjson.decode(json)
    if type(claims) ~= "table" or type(claims.exp) ~= "number" then
        return nil, "malformed claims"
    end
    if claims.exp <= ngx.time() then
        return nil, "token expired"
    end
    return claims
end


return _M
