-- Tenant code: runs under lua_sandbox strict in the VM "acme".
ngx.header["Content-Type"] = "application/json"
local name = ngx.var.arg_name or "world"
ngx.say(string.format('{"tenant":"acme","hello":"%s"}',
                      (string.gsub(name, '[^%w ._-]', ""))))
