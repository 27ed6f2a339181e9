"""Recursion through C: LuaJIT 2.1-20230119 puts no limit on how deep calls
from C into Lua and coroutine resumes nest on the machine stack, and a few
lines of Lua ran the worker's stack out (SIGSEGV) in every sandbox profile.
luaguard's LuaJIT stops them 256 KB before the stack's end with "C stack
overflow" (scripts/luajit-patches/unbounded-c-calls.patch). No
differential test: the reference's worker dies (SIGSEGV) on the
string.gsub recursion, and its requests of the coroutine.wrap and
ngx.thread.spawn recursions were still running after 60 s (its coroutines
do not nest on the C stack; nothing stops them). Debian's libluajit2 in a
plain C host with an 8 MB stack crashes on the first three shapes."""

import pytest

# Each recursion nests C frames: a C function calling back into Lua, or a
# coroutine resume. The first three crashed the worker before the patch;
# the others reach the Lua stack's limit first (their C frames are
# smaller than the Lua frames each level adds) and stay as guards.
SHAPES = {
    "string.gsub callback": (
        'local function f(s) return (s:gsub(".", f)) end\n'
        'ngx.say(select(2, pcall(f, "abc")))',
        "C stack overflow"),
    "coroutine.wrap": (
        "local function f() return coroutine.wrap(f)() end\n"
        "ngx.say(select(2, pcall(f)))",
        "C stack overflow"),
    "coroutine.wrap in xpcall handler": (
        "local function f() return coroutine.wrap(f)() end\n"
        "local function g() return 1 + g() end\n"
        "ngx.say(select(2, xpcall(g, function() return f() end)))",
        None),
    "table.sort comparator": (
        "local function cmp(a, b) table.sort({2, 1, 3}, cmp) "
        "return a < b end\n"
        "ngx.say(select(2, pcall(table.sort, {2, 1, 3}, cmp)))",
        "stack overflow"),
    "ngx.re.gsub callback": (
        'local function f() return (ngx.re.gsub("ab", "a", f)) end\n'
        "ngx.say(select(2, pcall(f)))",
        "stack overflow"),
    "load reader": (
        "local function r() load(r) return nil end\n"
        "ngx.say(select(2, pcall(load, r)))",
        "stack overflow"),
}


# Budgets that let a recursion reach the floor: each level's memory is not
# what is tested, and under ASan coroutines are slow enough for the 1 s
# slice to stop them first.
ROOM = """
            lua_budget_memory off;
            lua_budget_slice 60s;
            lua_budget_request 60s;"""


@pytest.mark.parametrize("profile", ["default", "strict"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_recursion_through_c_is_an_error_not_a_crash(nginx, shape, profile):
    code, message = SHAPES[shape]
    n = nginx(server="""
        location /r {
            lua_sandbox %s;%s
            content_by_lua_block {
%s
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
""" % (profile, ROOM, code))
    (pid,) = n.worker_pids()
    for _ in range(3):
        r = n.get("/r")
        assert r.status == 200
        if message:
            assert message in r.text, r.text
        assert n.worker_pids() == [pid]
    assert n.get("/ok").text == "ok\n"


@pytest.mark.asan_fast
def test_a_recursion_of_coroutines_stops_at_the_floor_every_time(nginx):
    # The floor is an address of the worker's stack: a request that stops
    # there leaves it as it was for the next.
    n = nginx(server="""
        location /r {""" + ROOM + """
            content_by_lua_block {
                local depth = 0
                local function f()
                    depth = depth + 1
                    return coroutine.wrap(f)()
                end
                local ok, err = pcall(f)
                ngx.say(err, " ", depth > 1000)
            }
        }
""")
    for _ in range(5):
        assert n.get("/r").text == "C stack overflow true\n"
    assert "exited on signal" not in n.read_log()


def test_a_spawned_thread_recursion_fails_the_request_only(nginx):
    # ngx.thread.spawn runs the new thread at once, from C: its recursion
    # nests like a callback's. The request fails; the worker serves on.
    n = nginx(server="""
        location /r {
            lua_budget_memory off;
            content_by_lua_block {
                local function f() ngx.thread.spawn(f) end
                f()
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
""")
    (pid,) = n.worker_pids()
    assert n.get("/r").status == 500
    assert "C stack overflow" in n.read_log()
    assert n.worker_pids() == [pid]
    assert n.get("/ok").text == "ok\n"
