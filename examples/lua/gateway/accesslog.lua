-- log_by_lua of the gateway: one JSON object per request and line.
local cjson = require "cjson.safe"
local request = require "gateway.request"

local _M = {}

-- Opened in init_by_lua by the master (as root), so the workers (nobody)
-- can append to a file in a directory they may not write. Line buffered:
-- each line is one write(2) to an O_APPEND file, so the workers' lines
-- never interleave.
local file


function _M.open(path)
    file = assert(io.open(path, "a"))
    file:setvbuf("line")
end


local function entry()
    local var = ngx.var
    local ctx = ngx.ctx
    return {
        time = ngx.req.start_time(),
        request_id = request.id(),
        client = var.remote_addr,
        method = var.request_method,
        uri = var.uri,
        status = ngx.status,
        bytes_sent = tonumber(var.bytes_sent),
        duration_ms = math.floor((ngx.now() - ngx.req.start_time()) * 1000
                                 + 0.5),
        user = ctx.user,
        upstream = ctx.tried and table.concat(ctx.tried, ","),
        rate_limited = ngx.status == 429 or nil,
    }
end


function _M.write()
    file:write(cjson.encode(entry()), "\n")
end


-- For locations whose sandbox has no file access (lua_sandbox strict).
function _M.write_errlog()
    ngx.log(ngx.NOTICE, "access ", cjson.encode(entry()))
end


return _M
