-- luacheck for the Lua compiled into the module (lua/*.lua); `make lint`.
std = "luajit"
max_line_length = 80
-- The files run before the sandbox, with the real globals: they fill `ngx`
-- and (the prelude) wrap a few standard functions for every request.
globals = {"ngx", "ndk"}
files["lua/prelude.lua"] = {globals = {"coroutine", "require", "xpcall"}}
-- The sandbox guards the string functions every VM shares.
files["lua/sandbox.lua"] = {globals = {"string"}}
