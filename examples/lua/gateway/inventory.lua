-- A client of the inventory service (127.0.0.4) over a cosocket: HTTP/1.1
-- with keepalive, the connection parked in the worker's pool after each
-- answer and taken again by the next call, in this request or a later one.
local cjson = require "cjson.safe"

local _M = {}

local host, port

local POOL_IDLE_MS, POOL_SIZE = 60000, 16


function _M.configure(h, p)
    host, port = h, p
end


local function fail(sock, err)
    sock:close()
    return nil, err
end


-- The price of `sku`: {sku =, price_cents =} or nil, plus how many times
-- the connection had been used before (0: a new one), or nil, err.
function _M.price(sku)
    local sock = ngx.socket.tcp()
    sock:settimeouts(1000, 1000, 1000)
    local ok, err = sock:connect(host, port)
    if not ok then
        return nil, "connect: " .. err
    end
    local reused = sock:getreusedtimes()

    ok, err = sock:send("GET /price/" .. ngx.escape_uri(sku)
                        .. " HTTP/1.1\r\nHost: inventory\r\n\r\n")
    if not ok then
        return fail(sock, "send: " .. err)
    end
    local status_line
    status_line, err = sock:receive("*l")
    if not status_line then
        return fail(sock, "receive: " .. err)
    end
    local status = tonumber(string.match(status_line, "^HTTP/1%.1 (%d%d%d)"))
    local length, keepalive = nil, true
    while true do
        local line
        line, err = sock:receive("*l")
        if not line then
            return fail(sock, "receive: " .. err)
        end
        if line == "" then
            break
        end
        local name, value = string.match(line, "^([^:]+):%s*(.-)%s*$")
        name = name and string.lower(name)
        if name == "content-length" then
            length = tonumber(value)
        elseif name == "connection" and string.lower(value) == "close" then
            keepalive = false
        end
    end
    if not status or not length then
        return fail(sock, "unexpected answer: " .. status_line)
    end
    local body
    body, err = sock:receive(length)
    if not body then
        return fail(sock, "receive: " .. err)
    end
    if keepalive then
        sock:setkeepalive(POOL_IDLE_MS, POOL_SIZE)
    else
        sock:close()
    end
    if status == 404 then
        return false, reused
    end
    local item = cjson.decode(body)
    if status ~= 200 or type(item) ~= "table" then
        return nil, "inventory answered " .. status
    end
    return item, reused
end


return _M
