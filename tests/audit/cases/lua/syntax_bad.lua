-- a brace inside a string and an unclosed function
local s = "}"
local function f()
    ngx.say(s)
ngx.say("x")
-- expect: lua-syntax (LuaJIT reports the missing end at the end of the file)