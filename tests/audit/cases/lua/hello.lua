ngx.say("hello from a file")
