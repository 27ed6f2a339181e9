-- What strict code cannot do: each attempt answers its error.
ngx.header["Content-Type"] = "text/plain"

local function try(what, f)
    local ok, err = pcall(f)
    ngx.say(what, ": ", ok and "allowed" or "refused: "
                       .. tostring(err):gsub("^[^:]*:%d+: ", ""))
end

try("io.open", function() return io.open("/etc/passwd") end)
try("os.execute", function() return os.execute("id") end)
try("require ffi", function() return require "ffi" end)
try("string.dump", function() return string.dump(try) end)
try("ngx.shared.ratelimit", function()
    return assert(ngx.shared.ratelimit):get("demo")
end)
try("connect to the inventory", function()
    local sock = ngx.socket.tcp()
    return assert(sock:connect("127.0.0.4", ngx.var.server_port))
end)
ngx.say("tostring({}): ", tostring({}))
