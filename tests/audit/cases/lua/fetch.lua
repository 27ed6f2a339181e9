-- Handlers pass request data to module functions: not followed (the
-- module's functions are analysed with clean parameters).
local _M = {}

function _M.get(uri)
    return ngx.location.capture(uri) -- expect-miss: ssrf
end

return _M
