-- The services behind the gateway, so that the example needs nothing
-- outside this nginx. Plain lua-nginx-module code.
local cjson = require "cjson.safe"

local _M = {}

local PRICES = { apple = 45, pear = 60, plum = 30, fig = 120 }


-- Backend "a" or "b" (127.0.0.2, 127.0.0.3). `?fail=NAME` makes that
-- backend answer 503, as one that is down would: the gateway then tries
-- the other one.
function _M.backend(name)
    ngx.header["X-Powered-By"] = "example-backend"
    ngx.header["X-Backend-Version"] = "1.0.3"
    if ngx.var.arg_fail == name then
        ngx.status = 503
        ngx.say(cjson.encode({ error = "backend " .. name .. " is down" }))
        return ngx.exit(ngx.HTTP_OK)
    end
    ngx.say(cjson.encode({ backend = name, uri = ngx.var.request_uri }))
end


-- GET /price/SKU on the inventory service (127.0.0.4). Every answer has
-- a Content-Length (not chunked), so that the client's parser stays small.
function _M.price()
    local sku = string.match(ngx.var.uri, "^/price/(%a+)$")
    local cents = sku and PRICES[sku]
    local body = cjson.encode(cents and { sku = sku, price_cents = cents }
                              or { error = "no such sku" })
    ngx.status = cents and 200 or 404
    ngx.header["Content-Length"] = #body
    ngx.print(body)
end


return _M
