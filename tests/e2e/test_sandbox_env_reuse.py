"""A request's environment that nothing outside the request could reach is
handed to the next request of the same policy (ngx/phases.cpp,
recycleEnv): what must never follow from it is a table someone kept
becoming another request's globals. Each way of getting hold of a request
environment must keep it from being reused; the attacks below keep one,
write to it from elsewhere and look for the write in later requests."""

import pytest


# Workers read the modules from the test prefix (private to root).
pytestmark = pytest.mark.workers_as_root


MODULES = {
    # Shared by every request of the worker, on purpose.
    "lua/keep.lua": """
local M = {}
-- Request code cannot write into a module's table (its writes are its
-- own), but the module's functions keep what they are given.
function M.store(v) M.env = v end
function M.grab() M.env = getfenv(2) end
function M.grab_debug() M.env = debug.getfenv(debug.getinfo(2, "f").func) end
return M
""",
}

HTTP = """
    lua_package_path "{prefix}/lua/?.lua;;";
"""

# Each keeps its request's environment (or a function that has it as its
# environment) in the shared module table.
LEAKS = {
    "getfenv": 'require("keep").store(getfenv(1))',
    "getfenv_no_arg": 'require("keep").store(getfenv())',
    "global_G": 'require("keep").store(_G)',
    "closure": 'local function f() return marker end '
               'require("keep").store(f)',
    "getinfo_func": 'require("keep").store(debug.getinfo(1, "f").func)',
    "loadstring": 'require("keep").store(loadstring("return marker"))',
    "load": 'require("keep").store(load("return marker"))',
    "module_getfenv": 'require("keep").grab()',
    "module_debug_getfenv": 'require("keep").grab_debug()',
}


def server(leak):
    return """
        location = /leak {
            content_by_lua_block { %s ngx.say("kept") }
        }
        location = /write {
            lua_sandbox off;
            content_by_lua_block {
                local kept = require("keep").env
                local env = type(kept) == "function" and getfenv(kept)
                            or kept
                rawset(env, "marker", "written from elsewhere")
                ngx.say("written")
            }
        }
        location = /victim {
            content_by_lua_block { ngx.say(tostring(marker)) }
        }
""" % leak


# With the collector stopped (init_worker), what the VM's memory grows by
# per request of `path`; the server has COUNT's location.
COUNT = """
        location = /count {
            lua_sandbox off;
            content_by_lua_block {
                ngx.say(collectgarbage("count") * 1024)
            }
        }
"""
STOPPED = """
    init_worker_by_lua_block { collectgarbage("stop") }
"""


def growth(n, path, expect, times=200):
    assert n.get(path).text == expect  # the first request makes one
    before = float(n.get("/count").text)
    for _ in range(times):
        n.get(path)
    return (float(n.get("/count").text) - before) / times


@pytest.mark.asan_fast
@pytest.mark.parametrize("how", sorted(LEAKS))
def test_a_kept_environment_is_never_another_requests(nginx, how):
    n = nginx(http=HTTP, files=MODULES, server=server(LEAKS[how]))
    # Environments are reused last in, first out: the victim would get the
    # kept one straight after the request that kept it.
    assert n.get("/victim").text == "nil\n"
    # The second keeps the table put in the cell the first one's had
    # (recycleEnv), with the handler's closure kept there.
    for _ in range(2):
        assert n.get("/leak").text == "kept\n"
    assert n.get("/write").text == "written\n"
    for _ in range(3):
        assert n.get("/victim").text == "nil\n"


# A semaphore shared by the worker: a timer callback waits on it until a
# request (lua_sandbox off) posts it, after the requests under test.
RELAY = {"lua/relay.lua": """
return { go = require("ngx.semaphore").new() }
"""}

@pytest.mark.asan_fast
@pytest.mark.parametrize("profile", ["default", "strict"])
def test_a_timer_closure_keeps_its_environment_from_reuse(nginx, profile):
    """Strict code cannot hand its globals to a module, but a timer
    callback is a closure with the request's environment: it runs after
    the request ended (here: once released) and writes a global. Two
    requests keep one each: the second runs the handler's closure kept
    with the environment's cell, which gets a new table (recycleEnv)."""
    files = dict(MODULES, **RELAY)
    # One lua_sandbox line for both: environments are reused within the
    # policy of one directive.
    n = nginx(http=HTTP + "lua_sandbox %s;" % profile, files=files,
              server="""
        location = /leak {
            content_by_lua_block {
                ngx.timer.at(0, function()
                    require("relay").go:wait(10)
                    marker = "written by the timer"
                    ngx.log(ngx.NOTICE, "timer wrote")
                end)
                ngx.say("kept")
            }
        }
        location = /release {
            lua_sandbox off;
            content_by_lua_block { require("relay").go:post(2) ngx.say("go") }
        }
        location = /victim {
            content_by_lua_block { ngx.say(tostring(marker)) }
        }
""")
    for _ in range(2):
        assert n.get("/leak").text == "kept\n"
        assert n.get("/victim").text == "nil\n"
    assert n.get("/release").text == "go\n"
    n.wait_log(r"timer wrote(.|\n)*timer wrote")
    for _ in range(3):
        assert n.get("/victim").text == "nil\n"


def test_replacing_ngx_stays_in_the_request(nginx):
    """A reused environment gets the view's `ngx` back."""
    n = nginx(server="""
        location = /five {
            content_by_lua_block {
                local n = ngx
                ngx = 5
                n.say(tostring(ngx))
            }
        }
        location = /other {
            content_by_lua_block {
                local n = ngx
                ngx = { say = function() end }
                n.say(type(ngx.say))
            }
        }
        location = /t {
            content_by_lua_block { ngx.say(type(ngx.say)) }
        }
""")
    for path in ("/five", "/t", "/other", "/t", "/five", "/five", "/t"):
        expect = {"/five": "5\n", "/other": "function\n",
                  "/t": "function\n"}[path]
        assert n.get(path).text == expect
    # the Lua `say` of /other went nowhere: /t's is the real one
    assert n.get("/t").text == "function\n"


def test_plain_handlers_reuse_environments_and_writers_do_not(nginx):
    """What the reuse is for, seen in the VM's memory with the collector
    stopped: a handler that keeps nothing allocates no environment after
    the first request; one that writes a global gets a new one each time
    (its table has more than `ngx` in it)."""
    n = nginx(http=STOPPED, server=COUNT + """
        location = /plain { content_by_lua_block { ngx.say("x") } }
        location = /writer {
            content_by_lua_block { written = 1 ngx.say("x") }
        }
""")

    plain = growth(n, "/plain", "x\n")
    writer = growth(n, "/writer", "x\n")
    # An environment is a table and a node of its hash part: 64 bytes and
    # more on this LuaJIT.
    assert writer - plain >= 64, (plain, writer)


# A closure whose code reads no global does not keep its maker's
# environment (scripts/luajit-patches/uncaptured-env.patch): a handler
# making only such closures leaves its environment to the next request.
# What must follow is that no such closure hands that table out later.
NO_GLOBALS = {
    "lua/keep.lua": """
local M = {}
function M.store(f) M.f = f end
-- worker code asking for the kept closure's environment
function M.peek() return getfenv(M.f).secret end
function M.peek_debug() return debug.getfenv(M.f).secret end
return M
""",
}

READERS = {
    "request_getfenv": "getfenv(require('keep').f).secret",
    "module_getfenv": "require('keep').peek()",
    "module_debug_getfenv": "require('keep').peek_debug()",
}


@pytest.mark.asan_fast
@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("profile", ["default", "strict"])
def test_a_closure_without_globals_never_hands_out_a_reused_environment(
        nginx, profile, reader):
    """/keep hands a module a closure without globals and its environment
    goes to the next request, /victim, which writes a global; whoever asks
    for the closure's environment later gets its own, never the table
    /victim wrote to."""
    n = nginx(http=HTTP + "lua_sandbox %s;" % profile, files=NO_GLOBALS,
              server="""
        location = /keep {
            content_by_lua_block {
                local function f(a) return a end
                require("keep").store(f)
                ngx.say("kept")
            }
        }
        location = /victim {
            content_by_lua_block { secret = "the victim's" ngx.say("set") }
        }
        location = /read {
            content_by_lua_block { ngx.say(tostring(%s)) }
        }
""" % READERS[reader])
    for _ in range(3):
        assert n.get("/keep").text == "kept\n"
        assert n.get("/victim").text == "set\n"
        assert n.get("/read").text == "nil\n"


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_a_timer_callback_without_globals_never_reads_a_reused_environment(
        nginx, profile):
    """Strict code cannot hand a closure to a module unwrapped, but a timer
    callback outlives its request. This one reads no global (getfenv,
    tostring and ngx.log are its upvalues), so its request's environment
    goes to the next request, which writes a global; released, the
    callback asks for its own environment and reads that name."""
    files = RELAY
    n = nginx(http=HTTP + "lua_sandbox %s;" % profile, files=files,
              server="""
        location = /leak {
            content_by_lua_block {
                local gf, str, log, NOTICE = getfenv, tostring, ngx.log,
                                             ngx.NOTICE
                local relay = require("relay")
                ngx.timer.at(0, function()
                    relay.go:wait(10)
                    log(NOTICE, "timer read ", str(gf(1).secret))
                end)
                ngx.say("kept")
            }
        }
        location = /victim {
            content_by_lua_block { secret = "the victim's" ngx.say("set") }
        }
        location = /release {
            lua_sandbox off;
            content_by_lua_block { require("relay").go:post(1) ngx.say("go") }
        }
""")
    assert n.get("/leak").text == "kept\n"
    assert n.get("/victim").text == "set\n"
    assert n.get("/release").text == "go\n"
    assert n.wait_log(r"timer read (\S+)").group(1) == "nil"


def test_closures_without_globals_leave_the_environment_to_reuse(nginx):
    """What the patch is for, in the VM's memory with the collector
    stopped: a handler whose closures read no global (a sort comparator)
    allocates its closure per request and no environment; the same handler
    with a comparator reading a global gets a new environment each time."""
    n = nginx(http=STOPPED, server=COUNT + """
        location = /local {
            content_by_lua_block {
                local t = { 3, 1, 2 }
                table.sort(t, function(a, b) return a > b end)
                ngx.say(t[1])
            }
        }
        location = /global {
            content_by_lua_block {
                local t = { 3, 1, 2 }
                table.sort(t, function(a, b) return a > b and type(a) end)
                ngx.say(t[1])
            }
        }
""")

    without = growth(n, "/local", "3\n")
    reading = growth(n, "/global", "3\n")
    # The same closure either way; the difference is the environment (a
    # table and a node of its hash part: 64 bytes and more).
    assert reading - without >= 64, (without, reading)


GETFENV_OF_CLOSURES = """
    location = /t {
        content_by_lua_block {
            local function pure(a) return a end
            local function reads() return tostring end
            local here = getfenv(1)
            local t = {}
            local out = {
                getfenv(pure) == here, getfenv(reads) == here,
                debug.getfenv(pure) == here,
                setfenv(pure, t) == pure, getfenv(pure) == t,
                pure(7),
            }
            -- its own closures, made after it got t
            local function outer() return function() return 1 end end
            setfenv(outer, t)
            out[#out + 1] = getfenv(outer()) == t
            for i = 1, #out do out[i] = tostring(out[i]) end
            ngx.say(table.concat(out, " "))
        }
    }
"""


@pytest.mark.parametrize("module", ["luaguard", "reference"])
def test_getfenv_of_a_closure_without_globals_as_in_lua_nginx_module(
        nginx, module):
    """In the request that made it, such a closure's environment is the
    request's (as lua-nginx-module's); setfenv gives it another."""
    n = nginx(module=module, server=GETFENV_OF_CLOSURES)
    assert n.get("/t").text == "true true true true true 7 true\n"
