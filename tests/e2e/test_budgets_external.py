"""Budgets over what a request consumes outside the Lua VM: regex time,
cosockets, memory the API copies into nginx, output a client has not
taken.

Each stop is checked the way an attacker would go at it: the request is
stopped (status, error, a log line naming the budget), a request that was
already waiting on the same worker is served, and the worker is the same
process before and after (ngx.worker.pid). One worker, so a frozen or
replaced worker cannot hide behind another.
"""

import re
import threading

import pytest

HTTP = """
    lua_budget_slice 200ms;
    lua_watchdog_grace 1s;
    lua_shared_dict rv 1m;
"""

# A request that is waiting on the worker while the hostile one runs: it
# marks the rendezvous, then sleeps; the hostile handler starts its work
# only once the mark is there (await_waiter), so the two overlap.
COMMON = """
    location /pid { content_by_lua_block { ngx.say(ngx.worker.pid()) } }
    location /ok { content_by_lua_block { ngx.say("ok") } }
    location /waiter { content_by_lua_block {
        ngx.shared.rv:set("waiting", true)
        ngx.sleep(0.3)
        ngx.say("waiter ok")
    } }
"""

AWAIT_WAITER = """
    while not ngx.shared.rv:get("waiting") do ngx.sleep(0.005) end
    ngx.shared.rv:delete("waiting")
"""


def in_background(fn):
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()))
    t.start()
    return t, box


def stopped_while_serving(n, path, **kw):
    """Runs the hostile `path` while /waiter waits on the same worker;
    returns its response after checking that the others were served and
    the worker is the same process."""
    pid = n.get("/pid").text
    waiter, waiter_box = in_background(lambda: n.get("/waiter"))
    r = n.request(path, **kw)
    after = n.get("/ok")
    waiter.join()
    assert waiter_box["r"].status == 200
    assert waiter_box["r"].text == "waiter ok\n"
    assert after.text == "ok\n"
    assert n.get("/pid").text == pid  # not replaced by a new worker
    assert "ending this worker" not in n.read_log()
    return r


# ---- regex time ----

# Quadratic or worse per subject, cheap at each start position: the
# match limit (per start position in PCRE2) never trips; over 200 KB one
# pcre2 call runs for many seconds (0.6 s for 57 KB with JIT).
SLOW_PATTERN = "a*a*[^a]"

REGEX_CALLS = {
    "match": "r = ngx.re.match(s, P, opts)",
    "find": "r = ngx.re.find(s, P, opts)",
    "gmatch": "for m in ngx.re.gmatch(s, P, opts) do r = m end",
    "sub": "r = ngx.re.sub(s, P, 'x', opts)",
    "gsub": "r = ngx.re.gsub(s, P, 'x', opts)",
    "gsub_function": "r = ngx.re.gsub(s, P, function() return 'x' end, "
                     "opts)",
    "split": "r = require('ngx.re').split(s, P, opts)",
}

REGEX_OPTIONS = ["jo", "o", "j", "", "d"]


def regex_server(call):
    return COMMON + f"""
    location /re {{ content_by_lua_block {{
        local s = string.rep("a", tonumber(ngx.var.arg_n)) ..
                  (ngx.var.arg_tail or "")
        local P, opts = [==[{SLOW_PATTERN}]==], ngx.var.arg_opts or ""
        if ngx.var.arg_hostile then {AWAIT_WAITER} end
        local r
        local ok = pcall(function() {call} end)
        ngx.say("done ", tostring(ok), " ", type(r))
    }} }}
    """


@pytest.mark.parametrize("call", sorted(REGEX_CALLS))
def test_slow_regex_is_stopped_by_the_slice(nginx, call):
    n = nginx(http=HTTP, server=regex_server(REGEX_CALLS[call]))
    for opts in REGEX_OPTIONS:
        r = stopped_while_serving(
            n, f"/re?n=200000&hostile=1&opts={opts}", timeout=30)
        assert r.status == 500, (opts, r.text)
        # pcall cannot keep the script going: the budget's hook ends it.
        assert "done" not in r.text
        n.wait_log(r"lua_budget_slice exceeded: Lua ran 200 ms without "
                   r"yielding, stopped at content_by_lua\(nginx\.conf:\d+\)")
        # The pattern (cached with "o") still works after the abandoned
        # match.
        small = n.get(f"/re?n=10&tail=b&opts={opts}")
        assert small.status == 200 and small.text.startswith("done true"), \
            (opts, small.text)


def test_regex_stop_counts_as_a_slice_stop_per_request(nginx):
    # Many stopped matches in a row: the worker neither leaks nor dies.
    n = nginx(http=HTTP, server=regex_server(REGEX_CALLS["gsub"]))
    pid = n.get("/pid").text
    for _ in range(5):
        assert n.get("/re?n=100000&opts=o", timeout=30).status == 500
    assert n.get("/re?n=10&tail=b&opts=o").text == "done true string\n"
    assert n.get("/pid").text == pid
    assert len(re.findall("lua_budget_slice exceeded", n.read_log())) == 5


# ---- connections per request ----

@pytest.fixture
def listener():
    """A loopback TCP listener the cosockets connect to; the kernel
    completes the handshakes (backlog), nothing is accepted."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(512)
    yield s.getsockname()[1]
    s.close()


def flood_server(port, cap_directive=""):
    return COMMON + f"""
    location /flood {{ {cap_directive}
        content_by_lua_block {{
            {AWAIT_WAITER}
            local n = tonumber(ngx.var.arg_n)
            local socks, ok_count = {{}}, 0
            for i = 1, n do
                local s = ngx.socket.tcp()
                local ok, err = s:connect("127.0.0.1", {port})
                if ok then
                    ok_count = ok_count + 1
                    socks[#socks + 1] = s
                else
                    ngx.say("connect ", i, ": ", err)
                end
                socks.last = s
            end
            local u = ngx.socket.udp()
            ngx.say("udp: ", select(2, u:setpeername("127.0.0.1", {port})))
            ngx.say("held ", ok_count)
            -- The refused objects stay usable once slots are free.
            socks[1]:close()
            socks[2]:close()
            ngx.say("retry: ", socks.last:connect("127.0.0.1", {port}))
            ngx.say("udp retry: ", (u:setpeername("127.0.0.1", {port})))
        }}
    }}
    """


def test_cosocket_flood_is_capped_per_request(nginx, listener):
    n = nginx(http=HTTP, server=flood_server(
        listener, "lua_socket_max_per_request 3;"))
    r = stopped_while_serving(n, "/flood?n=4")
    assert r.status == 200
    assert r.text == ("connect 4: too many connections\n"
                      "udp: too many connections\n"
                      "held 3\n"
                      "retry: 1\n"
                      "udp retry: 1\n"), r.text
    assert re.search(r"lua tcp socket: too many connections: the request "
                     r"holds 3 \(lua_socket_max_per_request\)", n.read_log())
    assert "lua udp socket: too many connections" in n.read_log()


def test_cosocket_default_cap_is_64(nginx, listener):
    # worker_connections is 1024 here: without a cap one request could
    # hold them all and new clients would be refused.
    n = nginx(http=HTTP, server=flood_server(listener))
    r = stopped_while_serving(n, "/flood?n=200")
    assert r.status == 200
    lines = r.text.splitlines()
    assert "held 64" in lines
    assert lines[0] == "connect 65: too many connections"
    assert sum("too many connections" in x for x in lines) == 137


def test_pooled_connection_gives_its_slot_back(nginx, listener):
    # A connection put in the pool (setkeepalive) is no longer held by the
    # request; open ones are.
    n = nginx(http=HTTP, server=COMMON + f"""
        location /leave {{ lua_socket_max_per_request 2;
            content_by_lua_block {{
                for i = 1, 3 do
                    local s = ngx.socket.tcp()
                    ngx.say(i, " ", s:connect("127.0.0.1", {listener}))
                    s:setkeepalive()  -- pooled: no longer the request's
                end
                local a, b = ngx.socket.tcp(), ngx.socket.tcp()
                a:connect("127.0.0.1", {listener})
                b:connect("127.0.0.1", {listener})
                ngx.say("kept ", select(2, ngx.socket.tcp():connect(
                    "127.0.0.1", {listener})))
            }} }}
    """)
    assert n.get("/leave").text == ("1 1\n2 1\n3 1\n"
                                    "kept too many connections\n")
