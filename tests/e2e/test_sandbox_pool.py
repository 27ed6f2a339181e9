"""Handler closures are pooled (src/runtime/code.hpp): a closure one
request ran serves a later request, with that request's environment. What
must never follow from it: one request's globals reaching another, through
the closure's environment or anything else it holds."""

import threading

import pytest


# Workers read the modules from the test prefix (private to root).
pytestmark = pytest.mark.workers_as_root

# Semaphores shared by the requests of one worker, to order them without
# sleeping.
RELAY = {
    "lua/relay.lua": """
local semaphore = require "ngx.semaphore"
return {
    a_ready = semaphore.new(),
    go = semaphore.new(),
    b_done = semaphore.new(),
    result = semaphore.new(),
}
""",
}

HTTP = """
    lua_package_path "{prefix}/lua/?.lua;;";
    lua_shared_dict out 1m;
"""


def test_globals_never_survive_a_reused_closure(nginx):
    n = nginx(server="""
        location /t {
            rewrite_by_lua_block {
                ngx.ctx.seen = tostring(mine)
                mine = ngx.var.arg_v
            }
            access_by_lua_block { ngx.ctx.seen2 = tostring(mine2) mine2 = 1 }
            content_by_lua_block {
                ngx.say(ngx.ctx.seen, " ", ngx.ctx.seen2, " ", tostring(c),
                        " ", mine)
                c = 1
            }
            log_by_lua_block { assert(c == 1 and mine2 == 1) logged = 1 }
        }
""")
    for v in ("a", "b", "c", "d"):
        assert n.get("/t?v=" + v).text == f"nil nil nil {v}\n"


def test_a_handler_given_another_environment_never_runs_again(nginx):
    # A handler's closure stays with the request's environment when that
    # environment goes to the next request (src/runtime/vm.hpp,
    # EnvClosures). A request that left the environment clean but gave the
    # closure a table of its own with setfenv must not hand that table to
    # the next request through the closure.
    n = nginx(server="""
        location /t { content_by_lua_block {
            if ngx.var.arg_who == "a" then
                setfenv(1, { ngx = ngx, tostring = tostring,
                             leak = "from a" })
                ngx.say("a set")
                return
            end
            ngx.say("b sees ", tostring(leak))
        } }
""")
    for _ in range(3):
        assert n.get("/t?who=a").text == "a set\n"
        assert n.get("/t?who=b").text == "b sees nil\n"


def test_requests_suspended_in_one_handler_keep_their_own_globals(nginx):
    # A waits inside the handler while B runs the same handler: each has a
    # closure of its own.
    n = nginx(http=HTTP, files=RELAY, server="""
        location /t { content_by_lua_block {
            local relay = require "relay"
            local who = ngx.var.arg_who
            mine = who
            if who == "a" then
                relay.a_ready:post()
                assert(relay.go:wait(10))
            else
                assert(relay.a_ready:wait(10))
                relay.go:post()
            end
            ngx.say(who, " ", mine, " ", tostring(_G == getfenv(1)))
        } }
""")
    res = {}
    a = threading.Thread(target=lambda: res.update(a=n.get("/t?who=a")))
    a.start()
    res["b"] = n.get("/t?who=b")
    a.join(30)
    assert res["b"].text == "b b true\n"
    assert res["a"].text == "a a true\n"


def test_a_closure_request_code_kept_is_never_reused(nginx):
    # Request A gets hold of its own handler closure and leaves it to a
    # timer; B then runs the same handler. Were A's closure reused for B,
    # its environment would be B's and A's timer would read B's globals.
    n = nginx(http=HTTP, files=RELAY, server="""
        location /t { content_by_lua_block {
            local relay = require "relay"
            local who = ngx.var.arg_who
            mine = who
            if who == "a" then
                local me = debug.getinfo(1, "f").func
                assert(ngx.timer.at(0, function()
                    assert(relay.b_done:wait(10))
                    local env = getfenv(me)
                    ngx.shared.out:set("r", tostring(env.mine) .. " "
                                       .. tostring(rawget(env, "mine")))
                    relay.result:post()
                end))
            else
                relay.b_done:post()
            end
            ngx.say(who)
        } }
        location /r { content_by_lua_block {
            assert(require("relay").result:wait(10))
            ngx.say(ngx.shared.out:get("r"))
        } }
""")
    assert n.get("/t?who=a").text == "a\n"
    assert n.get("/t?who=b").text == "b\n"
    assert n.get("/r").text == "a a\n"


def test_getinfo_levels_and_views_stay_as_they_were(nginx):
    # debug.getinfo in request code is a wrapper (it notes closures handed
    # out): its levels still count from the caller, and nothing it or
    # getfenv hands out makes the shared view writable.
    n = nginx(server="""
        location /t { content_by_lua_block {
            local function f()
                return debug.getinfo(1, "f").func == f
                       and debug.getinfo(2, "f").func ~= f
            end
            local me = debug.getinfo(1, "f").func
            local view = getmetatable(getfenv(me)).__index
            local ok = pcall(function() view.string = {} end)
            local ok2 = pcall(rawset, view, "x", 1)
            ngx.say(tostring(f()), " ", tostring(getfenv(me) == _G), " ",
                    tostring(getfenv(0) == _G), " ", tostring(ok), " ",
                    tostring(ok2), " ", tostring(string.len ~= nil), " ",
                    tostring(debug.getinfo(100)))
        } }
""")
    for _ in range(2):
        assert n.get("/t").text == \
            "true true true false false true nil\n"
