"""Issue 19, item 17: light-thread scheduling and ngx.thread.wait edge
cases, run on Debian's lua-nginx-module (`module="reference"`) and on
luaguard and compared."""

import re

MODULES = ["luaguard", "reference"]


def both(nginx, **kw):
    return {m: nginx(module=m, **kw) for m in MODULES}


HTTP = r"""
    lua_package_path "{prefix}/lua/?.lua;;";
"""

# Module-level state the way real code keeps it (luaguard's sandbox makes
# tables from init_by_lua read-only to request code).
BOX = """
    local store = {}
    return { get = function() return store.t end,
             set = function(t) store.t = t end }
"""

# Each location prints the order in which its threads ran.
CASES = {
    "nested_spawn": r"""
        local log = {}
        local function add(s) log[#log + 1] = s end
        local function child()
            add("c1") ngx.sleep(0.001) add("c2")
        end
        local function parent()
            add("p1")
            local t = ngx.thread.spawn(child)
            add("p2")
            ngx.sleep(0.002)
            add("p3")
        end
        add("e1")
        local t = ngx.thread.spawn(parent)
        add("e2")
        ngx.thread.wait(t)
        ngx.sleep(0.005)
        add("e3")
        ngx.say(table.concat(log, " "))
    """,
    "yield_in_thread": r"""
        local log = {}
        local function add(s) log[#log + 1] = s end
        local function child(name)
            add(name .. "1") coroutine.yield() add(name .. "2")
            coroutine.yield() add(name .. "3")
        end
        add("e1")
        local a = ngx.thread.spawn(child, "a")
        add("e2")
        local b = ngx.thread.spawn(child, "b")
        add("e3")
        coroutine.yield()
        add("e4")
        ngx.thread.wait(a, b)
        add("e5")
        ngx.thread.wait(b)
        add("e6")
        ngx.say(table.concat(log, " "))
    """,
    "nested_yield": r"""
        local log = {}
        local function add(s) log[#log + 1] = s end
        local function child()
            add("c1") coroutine.yield() add("c2")
        end
        local function parent()
            add("p1")
            local t = ngx.thread.spawn(child)
            add("p2")
            coroutine.yield()
            add("p3")
            ngx.thread.wait(t)
            add("p4")
        end
        add("e1")
        local t = ngx.thread.spawn(parent)
        add("e2")
        ngx.thread.wait(t)
        add("e3")
        ngx.say(table.concat(log, " "))
    """,
    "status_of_parent": r"""
        local out = {}
        local parent = coroutine.running()
        local t = ngx.thread.spawn(function()
            out[#out + 1] = coroutine.status(parent)
            out[#out + 1] = coroutine.status(coroutine.running())
            coroutine.yield()
            out[#out + 1] = coroutine.status(parent)
            ngx.sleep(0.001)
            out[#out + 1] = coroutine.status(parent)
        end)
        out[#out + 1] = coroutine.status(t)
        ngx.thread.wait(t)
        out[#out + 1] = coroutine.status(t)
        ngx.say(table.concat(out, " "))
    """,
    "status_nested": r"""
        local out = {}
        local top = coroutine.running()
        local t = ngx.thread.spawn(function()
            local mid = coroutine.running()
            local c = ngx.thread.spawn(function()
                out[#out + 1] = coroutine.status(top)
                out[#out + 1] = coroutine.status(mid)
            end)
            out[#out + 1] = coroutine.status(c)
        end)
        ngx.thread.wait(t)
        ngx.say(table.concat(out, " "))
    """,
    "wait_dead": r"""
        local t = ngx.thread.spawn(function() return 1, 2 end)
        ngx.say(ngx.thread.wait(t))
        ngx.say(pcall(ngx.thread.wait, t))
        local k = ngx.thread.spawn(function() ngx.sleep(1) end)
        ngx.thread.kill(k)
        ngx.say(pcall(ngx.thread.wait, k))
        local e = ngx.thread.spawn(function() error("boom", 0) end)
        ngx.say(pcall(ngx.thread.wait, e))
        ngx.say(pcall(ngx.thread.wait, e))
    """,
    "wait_foreign": r"""
        local t
        local a = ngx.thread.spawn(function()
            t = ngx.thread.spawn(function() ngx.sleep(0.001) return "t" end)
        end)
        ngx.say(pcall(ngx.thread.wait, t))
        local b = ngx.thread.spawn(function()
            ngx.say("b ", pcall(ngx.thread.wait, a))
        end)
        ngx.thread.wait(b)
        ngx.say(pcall(ngx.thread.wait, coroutine.create(function() end)))
        ngx.say(pcall(ngx.thread.wait, coroutine.running()))
        ngx.say(pcall(ngx.thread.wait))
        ngx.say(pcall(ngx.thread.wait, "x"))
        ngx.sleep(0.005)
    """,
    "wait_several": r"""
        local function w(s, v) ngx.sleep(s) return v end
        local a = ngx.thread.spawn(w, 0.03, "a")
        local b = ngx.thread.spawn(w, 0.001, "b")
        local c = ngx.thread.spawn(function() return "c" end)
        ngx.say(ngx.thread.wait(a, b, c))
        ngx.say(ngx.thread.wait(a, b))
        ngx.say(ngx.thread.wait(a, b))
        ngx.say(pcall(ngx.thread.wait, a, b))
        local d = ngx.thread.spawn(w, 0.001, "d")
        ngx.say(pcall(ngx.thread.wait, a, d))
    """,
    "wait_other_request": r"""
        local box = require "box"
        if not box.get() then
            box.set(ngx.thread.spawn(function() return "old" end))
            ngx.say("stored")
            return
        end
        ngx.say(pcall(ngx.thread.wait, box.get()))
        ngx.say(pcall(ngx.thread.kill, box.get()))
        ngx.say(coroutine.status(box.get()))
    """,
}


def server():
    return "\n".join(
        f"location /{name} {{ content_by_lua_block {{ {code} }} }}"
        for name, code in CASES.items())


def test_thread_scheduling(nginx):
    got = {}
    for m, n in both(nginx, http=HTTP, server=server(),
                     files={"lua/box.lua": BOX}).items():
        out = {}
        for name in CASES:
            r = n.get(f"/{name}")
            out[name] = (r.status, re.sub(r"0x[0-9a-f]+", "ADDR", r.text))
        r = n.get("/wait_other_request")
        out["wait_other_request 2"] = (r.status, r.text)
        got[m] = out
    assert got["luaguard"] == got["reference"], got
