-- a module found on lua_package_path: audited like the handlers
local _M = {}

local function args()
    return ngx.req.get_uri_args()
end

function _M.run()
    local a = args()
    local fn = loadstring("return " .. (a.expr or "0")) -- expect: code-injection
    ngx.say(tonumber(fn and fn()) or 0)
end

return _M
