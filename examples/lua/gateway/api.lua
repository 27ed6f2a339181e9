-- The gateway's own endpoints (content_by_lua).
local cjson = require "cjson.safe"
local inventory = require "gateway.inventory"
local request = require "gateway.request"
local token = require "gateway.token"

local _M = {}

-- Demo users. A real gateway asks its identity provider instead.
local USERS = {
    demo = { password = "demo", plan = "free" },
}

local MAX_ITEMS = 20


local function reply(status, t)
    ngx.status = status
    ngx.say(cjson.encode(t))
    return ngx.exit(ngx.HTTP_OK)   -- the response is sent: end here
end


function _M.index()
    reply(200, {
        service = "luaguard example gateway",
        endpoints = {
            ["GET /token"] = "basic auth (demo:demo) in, bearer token out",
            ["GET /api/whoami"] = "the token's claims (bearer token, "
                                  .. "rate limited)",
            ["POST /api/order"] = "JSON order in, priced JSON out",
            ["GET /api/price/SKU"] = "one price from the inventory service",
            ["GET /api/backend"] = "proxied to backend a or b "
                                   .. "(?fail=a: a answers 503)",
            ["GET /metrics"] = "Prometheus metrics",
            ["GET /tenant/acme/NAME"] = "tenant scripts under "
                                        .. "lua_sandbox strict",
            ["GET /demo/..."] = "runaway, memory-bomb, global, sleep, hello",
        },
    })
end


function _M.token()
    local auth = ngx.var.http_authorization
    local b64 = auth and string.match(auth, "^Basic%s+(%S+)$")
    local creds = b64 and ngx.decode_base64(b64)
    local user, password = string.match(creds or "", "^([^:]*):(.*)$")
    local account = user and USERS[user]
    if not account or account.password ~= password then
        ngx.header["WWW-Authenticate"] = 'Basic realm="luaguard example"'
        return reply(401, { error = "unknown user or wrong password" })
    end
    ngx.ctx.user = user
    -- Plain text, so that TOKEN=$(curl ...) takes it as it is.
    ngx.header["Content-Type"] = "text/plain"
    ngx.say((token.issue(user, account.plan)))
end


function _M.whoami()
    local c = ngx.ctx.claims
    reply(200, { user = c.sub, plan = c.plan, expires = c.exp,
                 client = ngx.var.remote_addr,
                 request_id = request.id() })
end


-- {"items": [{"sku": "apple", "qty": 3}, ...]} in; each line priced by the
-- inventory service, one pooled connection for all of them.
function _M.order()
    if ngx.req.get_method() ~= "POST" then
        ngx.header["Allow"] = "POST"
        return reply(405, { error = "POST a JSON order" })
    end
    ngx.req.read_body()
    local order, err = cjson.decode(ngx.req.get_body_data() or "")
    if type(order) ~= "table" or type(order.items) ~= "table" then
        return reply(400, { error = "invalid JSON order: "
                                    .. (err or "no items") })
    end
    if #order.items == 0 or #order.items > MAX_ITEMS then
        return reply(400, { error = "1 to " .. MAX_ITEMS .. " items" })
    end
    local lines, total, reused = {}, 0, {}
    for i, item in ipairs(order.items) do
        local qty = type(item) == "table" and item.qty
        if type(item) ~= "table" or type(item.sku) ~= "string"
           or type(qty) ~= "number" or qty < 1 or qty % 1 ~= 0 then
            return reply(400, { error = "item " .. i
                                        .. ": want {sku, qty >= 1}" })
        end
        local price, used = inventory.price(item.sku)
        if price == nil then
            ngx.log(ngx.ERR, "inventory: ", used)
            return reply(502, { error = "inventory unavailable" })
        end
        if not price then
            return reply(422, { error = "unknown sku " .. item.sku })
        end
        local cents = price.price_cents * qty
        total = total + cents
        lines[i] = { sku = item.sku, qty = qty,
                     unit_cents = price.price_cents, cents = cents }
        reused[i] = used
    end
    reply(200, { user = ngx.ctx.user, lines = lines, total_cents = total,
                 -- times each call's connection had been used before:
                 -- after the first call, the pool's connection comes back
                 inventory_connection_reuse = reused })
end


function _M.price()
    local price, used = inventory.price(ngx.var.sku)
    if price == nil then
        ngx.log(ngx.ERR, "inventory: ", used)
        return reply(502, { error = "inventory unavailable" })
    end
    if not price then
        return reply(404, { error = "unknown sku" })
    end
    price.connection_reuse = used
    reply(200, price)
end


function _M.not_found()
    reply(404, { error = "no such endpoint" })
end


return _M
