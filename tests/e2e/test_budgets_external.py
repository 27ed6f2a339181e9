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

from harness import ASAN

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
    location /refusals { content_by_lua_block {
        local loc = require("luaguard.metrics").get()
                        .locations[ngx.var.arg_loc]
        local r = loc and loc.budget_refusals or {}
        local s = loc and loc.budget_stops or {}
        ngx.say(r.memory, " ", r.connections, " ", s.memory)
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


# What a worker holds besides a request's budget: its own heap, the Lua
# VM, nginx's pools and buffers (docs/budgets.md).
PEAK_OVERHEAD_MB = 48


def assert_peak_within(n, budget_mb):
    """The worker's peak RSS (VmHWM) stayed within the request's memory
    budget plus PEAK_OVERHEAD_MB."""
    (pid,) = n.worker_pids()
    with open(f"/proc/{pid}/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    print(f"peak RSS {hwm} kB, budget {budget_mb} MB")  # with -s
    assert hwm < (budget_mb + PEAK_OVERHEAD_MB) * 1024, hwm


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
    # Connections inherit a small fixed receive buffer (no autotuning up to
    # tcp_rmem's maximum, 32 MB on some machines): a send of megabytes
    # never fits in the kernel's buffers, so the sender keeps waiting.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
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
    # Counted where the operator looks (luaguard_budget_refusals_total).
    assert n.get("/refusals?loc=/flood").text == "0 2 0\n"
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


# ---- memory the API allocates outside the Lua VM ----

MEMORY_HTTP = HTTP.replace("200ms", "20s") + """
    lua_budget_memory 32m;
"""


def assert_memory_stop(n, loc, what):
    """The request at `loc` was stopped by lua_budget_memory for `what`
    like a Lua allocation is: the log line names the budget, the call and
    where the script was; a pcall did not keep it going; the refusal and
    the stop are counted (the stop when nginx frees the request)."""
    assert re.search(r"not enough memory \(luaguard: lua_budget_memory "
                     rf"exceeded by {re.escape(what)}, stopped at "
                     r"content_by_lua\(nginx\.conf:\d+\):\d+\)",
                     n.read_log()), what
    assert "survived" not in n.read_log()
    for _ in range(100):
        counts = n.get(f"/refusals?loc={loc}").text.split()
        if counts[2] != "0":
            break
    assert int(counts[0]) >= 1 and counts[1] == "0" and counts[2] == "1", \
        counts


# Each loop keeps one 1 MB Lua string and writes it again and again: the
# Lua heap stays flat while every write copies it into the request's
# pool. ngx.sleep(0) between writes: no CPU budget can end the loop. A
# pcall catches the refusal's error: the stop goes on regardless. (A
# response header is cleared after each write: the 500 page would carry
# it.)
GROWTH = {
    "var": ("set $x '';", "ngx.var.x = s", "ngx.var.x = ''", "ngx.var"),
    "header": ("", "ngx.header['X-Grow'] = s", "ngx.header['X-Grow'] = nil",
               "ngx.header"),
    "header_array": ("", "ngx.header['X-Grow'] = {s, s}",
                     "ngx.header['X-Grow'] = nil", "ngx.header"),
    "req_set_header": ("", "ngx.req.set_header('X-Grow', s)", "",
                       "ngx.req.set_header"),
    "set_body_data": ("lua_need_request_body on;",
                      "ngx.req.set_body_data(s)", "",
                      "ngx.req.set_body_data"),
}


def growth_server():
    locs = [COMMON]
    for name, (directive, write, cleanup, _) in GROWTH.items():
        locs.append(f"""
    location /grow_{name} {{ {directive}
        content_by_lua_block {{
            {AWAIT_WAITER}
            local s = string.rep("x", 1024 * 1024)
            for i = 1, 200 do
                local ok, err = pcall(function() {write} end)
                if not ok then ngx.log(ngx.ERR, "survived: ", err) end
                {cleanup}
                ngx.sleep(0)
            end
            ngx.say("unreachable")
        }} }}""")
    locs.append("""
    location /init_body { lua_need_request_body on;
        content_by_lua_block {
            AWAIT
            local ok, err = pcall(ngx.req.init_body, 2^40)
            ngx.log(ngx.ERR, "survived: ", err)
        } }
    location /init_body_ok { lua_need_request_body on;
        content_by_lua_block {
            ngx.req.init_body(16 * 1024 * 1024)
            ngx.req.append_body("hello")
            ngx.req.finish_body()
            ngx.say(ngx.req.get_body_data())
        } }""".replace("AWAIT", AWAIT_WAITER))
    return "\n".join(locs)


@pytest.mark.parametrize("name", sorted(GROWTH))
def test_pool_growth_is_a_memory_budget_stop(nginx, name):
    n = nginx(http=MEMORY_HTTP, server=growth_server())
    r = stopped_while_serving(n, f"/grow_{name}", method="POST", body="b",
                              timeout=60)
    assert r.status == 500
    assert r.header("X-Grow") is None
    assert_memory_stop(n, f"/grow_{name}", GROWTH[name][3])
    if not ASAN:  # ASan's shadow and quarantine are not the worker's
        assert_peak_within(n, 32)


def test_init_body_huge_size_is_a_memory_budget_stop(nginx):
    n = nginx(http=MEMORY_HTTP, server=growth_server())
    r = stopped_while_serving(n, "/init_body", method="POST", body="b")
    assert r.status == 500
    assert_memory_stop(n, "/init_body", "ngx.req.init_body")
    # Within the budget it works as documented.
    r = n.request("/init_body_ok", method="POST", body="b")
    assert r.text == "hello\n"
    if not ASAN:
        assert_peak_within(n, 32)


# ---- output a client has not taken (lua_budget_output) ----

# 100 MB printed 1 MB at a time to a client that does not read: without a
# bound the worker would hold all of it; the budget is 32 MB.
STREAM = COMMON + """
    location /progress { content_by_lua_block {
        ngx.say(ngx.shared.rv:get("printed") or 0)
    } }
    location /stream { MODE
        content_by_lua_block {
            for i = 1, 100 do
                -- A new string each time: the script's own allocations
                -- keep their room while its output waits.
                local ok, err = pcall(ngx.print, string.rep("y", 1024 * 1024))
                if not ok then ngx.log(ngx.ERR, "survived: ", err) end
                ngx.shared.rv:set("printed", i)
            end
            ngx.say("done")
            ngx.log(ngx.WARN, "stream ended")
        } }
"""


def non_reading_client(n, path):
    import socket
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.connect(("127.0.0.1", n.port))
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
              "Connection: close\r\n\r\n".encode())
    return c


def test_pending_output_waits_for_the_client_by_default(nginx):
    n = nginx(http=MEMORY_HTTP, server=STREAM.replace("MODE", ""))
    pid = n.get("/pid").text
    c = non_reading_client(n, "/stream")
    try:
        # One worker: /progress is answered only once the loop has
        # yielded, and it yields only to wait for the client.
        printed = 0
        while printed < 16:
            printed = int(n.get("/progress").text)
        print(f"printed {printed} MB before waiting")  # with -s
        assert printed < 100, printed    # it waits, not buffers
        assert n.get("/ok").text == "ok\n"   # the worker serves meanwhile
        assert n.get("/pid").text == pid
        # Once the client reads, everything arrives.
        data = bytearray()
        while True:
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        c.close()
    assert data.startswith(b"HTTP/1.1 200 ")
    body = data.split(b"\r\n\r\n", 1)[1]
    assert body.count(b"y") == 100 * 1024 * 1024
    assert body.endswith(b"done\n\r\n0\r\n\r\n")
    assert int(n.get("/progress").text) == 100
    assert "survived" not in n.read_log()
    assert n.get("/pid").text == pid
    if not ASAN:
        assert_peak_within(n, 32)


def test_pending_output_client_gone_while_waiting(nginx):
    # The waiting print is cancelled with its request: nothing leaks or
    # resumes a finished request (the fixture fails on an alert).
    n = nginx(http=MEMORY_HTTP, server=STREAM.replace("MODE", ""))
    c = non_reading_client(n, "/stream")
    printed = 0
    while printed < 16:
        printed = int(n.get("/progress").text)
    c.close()
    # The print gets the output filter's error, as any print to a client
    # that is gone; the loop ends without waiting again.
    n.wait_log("stream ended", timeout=30)
    assert n.get("/ok").text == "ok\n"


def test_pending_output_past_the_budget_stops_with_error_mode(nginx):
    n = nginx(http=MEMORY_HTTP,
              server=STREAM.replace("MODE", "lua_budget_output error;"))
    pid = n.get("/pid").text
    c = non_reading_client(n, "/stream")
    try:
        n.wait_log(r"lua_budget_memory exceeded by ngx\.print", timeout=30)
        assert n.get("/ok").text == "ok\n"   # the worker serves meanwhile
        assert n.get("/pid").text == pid
        assert_memory_stop(n, "/stream", "ngx.print")
        assert int(n.get("/progress").text) < 100
        if not ASAN:
            assert_peak_within(n, 32)
    finally:
        c.close()


def test_single_print_larger_than_the_budget_is_a_stop(nginx):
    # Waiting cannot help: the print alone does not fit.
    n = nginx(http=MEMORY_HTTP, server=COMMON + """
        location /big { content_by_lua_block {
            ngx.say("head")
            ngx.flush(true)
            local ok, err = pcall(ngx.print,
                                  {string.rep("z", 12 * 1024 * 1024),
                                   string.rep("z", 12 * 1024 * 1024)})
            ngx.log(ngx.ERR, "survived: ", err)
        } }
    """)
    out = n.raw(b"GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b"head\n" in out
    # Cut short: headers were out, the connection is closed.
    assert b"z" not in out and not out.endswith(b"0\r\n\r\n")
    assert_memory_stop(n, "/big", "ngx.print")
    assert n.get("/ok").text == "ok\n"


def test_output_within_the_budget_reuses_its_buffers(nginx):
    # A reading client: buffers it took are reused or freed, so a long
    # response never adds up to the budget.
    n = nginx(http=MEMORY_HTTP, server=COMMON + """
        location /long { content_by_lua_block {
            -- Each print one byte longer: no buffer the client took can
            -- hold the next one (200 of them are 100 MB).
            local s = string.rep("w", 512 * 1024)
            for i = 1, 200 do
                ngx.print({s, string.rep("w", i)})
                ngx.flush(true)
            end
            ngx.say("end")
        } }
    """)
    r = n.get("/long", timeout=60)
    assert r.status == 200
    assert r.body.count(b"w") == sum(512 * 1024 + i
                                        for i in range(1, 201))
    assert r.text.endswith("end\n")


@pytest.mark.parametrize("value", ["on", "yes", ""])
def test_bad_budget_output_fails_nginx_t(nginx_conf, value):
    conf = nginx_conf(http=f"    lua_budget_output {value};\n")
    ok, out = conf.test_config()
    assert not ok


@pytest.fixture
def firehose():
    """A loopback server that answers every connection with 160 MB of
    bytes and no newline (a hostile upstream), then closes; finite, so a
    regression fails the test instead of exhausting the machine."""
    import socket
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    stop = threading.Event()

    def serve(c):
        chunk = b"z" * 65536
        try:
            for _ in range(160 * 16):
                if stop.is_set():
                    break
                c.sendall(chunk)
        except OSError:
            pass
        finally:
            c.close()

    def accept():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()


@pytest.mark.parametrize("pattern", ["'*a'", "2^40", "100 * 1024 * 1024",
                                     "'*l'"])
def test_socket_receive_is_bounded_by_the_memory_budget(nginx, firehose,
                                                        pattern):
    n = nginx(http=MEMORY_HTTP, server=COMMON + f"""
        location /recv {{ content_by_lua_block {{
            {AWAIT_WAITER}
            local s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", {firehose}))
            local data, err, partial = s:receive({pattern})
            ngx.log(ngx.ERR, "survived: ", err)
        }} }}
    """)
    r = stopped_while_serving(n, "/recv", timeout=60)
    assert r.status == 500
    assert_memory_stop(n, "/recv", "a socket receive")
    if not ASAN:
        assert_peak_within(n, 32)


def test_socket_send_copies_are_charged(nginx, listener):
    # One 8 MB string sent on 30 sockets whose peer never reads: each send
    # keeps a copy of what the kernel did not take while it waits. Without
    # a charge the worker holds 30 copies (about 200 MB).
    n = nginx(http=MEMORY_HTTP, server=COMMON + f"""
        location /send {{ lua_socket_send_timeout 5s;
            content_by_lua_block {{
                {AWAIT_WAITER}
                local s = string.rep("s", 8 * 1024 * 1024)
                local threads = {{}}
                for i = 1, 30 do
                    threads[i] = ngx.thread.spawn(function()
                        local c = ngx.socket.tcp()
                        assert(c:connect("127.0.0.1", {listener}))
                        local ok, sent = pcall(c.send, c, s)
                        -- A pcall that caught the stop, or a send that
                        -- went through. A send the peer refused (under
                        -- load the first connection has seen a reset,
                        -- "broken pipe") ends the thread as it should.
                        if not ok or sent then
                            ngx.log(ngx.ERR, "survived: ", sent)
                        end
                    end)
                end
                for i = 1, 30 do ngx.thread.wait(threads[i]) end
                ngx.say("unreachable")
            }} }}
    """)
    r = stopped_while_serving(n, "/send", timeout=60)
    assert r.status == 500
    assert_memory_stop(n, "/send", "a socket send")
    if not ASAN:
        assert_peak_within(n, 32)


@pytest.mark.parametrize("value", ["0", "abc", "-1"])
def test_bad_socket_cap_fails_nginx_t(nginx_conf, value):
    conf = nginx_conf(http=f"    lua_socket_max_per_request {value};\n")
    ok, out = conf.test_config()
    assert not ok
    assert re.search(r"in \S+nginx\.conf:\d+", out), out
