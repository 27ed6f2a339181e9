"""Allocation-failure sweep: the Lua allocator refuses its Nth allocation
of a request, for N across the whole request, in every place nginx enters
Lua. Every run ends in a response (200 when the script caught the error or
the failure fell where nothing needed the memory, 500 otherwise), the
worker never dies, nothing is left open, and the next request is served.

Needs a build with LUAGUARD_FAULT_INJECTION (the ASan build of `make
test-asan-fast` / `make test-asan`), where the request header
X-Luaguard-Fail-Alloc: N arms the refusal.
"""

import socket
import threading

import pytest

from harness import ASAN, TcpServer

pytestmark = pytest.mark.skipif(
    not ASAN, reason="needs the fault-injection (ASan) build")

# Every N up to 80, then sparser: past the last allocation of a request
# the refusal never happens and the request succeeds.
SWEEP = list(range(1, 81)) + [100, 130, 170, 220, 300, 400, 550, 750,
                              1000, 1500, 2500, 5000]


class Echo(TcpServer):
    """A loopback line echo, over TCP and UDP on the same port number."""

    def __init__(self):
        super().__init__()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", self.port))
        threading.Thread(target=self.datagrams, daemon=True).start()

    @staticmethod
    def serve(c):
        with c:
            for line in c.makefile("rb"):
                c.sendall(line)

    def datagrams(self):
        while True:
            try:
                data, addr = self.udp.recvfrom(2048)
            except OSError:
                return
            self.udp.sendto(data, addr)

    def close(self):
        super().close()
        self.udp.close()


# name -> location body. Each answers "done" when nothing failed.
SCENARIOS = {
    "rewrite": """rewrite_by_lua_block {
            local t = {} for i = 1, 20 do t[i] = {i, tostring(i)} end
            ngx.ctx.v = table.concat({"a", "b", ngx.var.uri}) }
        content_by_lua_block { ngx.say("done") }""",
    "access": """access_by_lua_block {
            local h = ngx.req.get_headers()
            ngx.ctx.v = h["host"] .. ngx.var.uri }
        content_by_lua_block { ngx.say("done") }""",
    "content": """content_by_lua_block {
            local parts = {}
            for i = 1, 30 do parts[#parts + 1] = string.format("%d:%s", i, ngx.var.uri) end
            local ok = pcall(function() return table.concat(parts, ",") end)
            ngx.say(ok and "done" or "caught") }""",
    "set": """set_by_lua_block $v { return ngx.var.uri .. string.rep("s", 10) }
        content_by_lua_block { ngx.say("done") }""",
    "header_filter": """content_by_lua_block { ngx.say("done") }
        header_filter_by_lua_block { ngx.header["X-A"] = "v" .. ngx.var.uri }""",
    "body_filter": """content_by_lua_block { ngx.say("done") }
        body_filter_by_lua_block {
            if ngx.arg[1] then ngx.arg[1] = string.lower(ngx.arg[1]) end }""",
    "log": """content_by_lua_block { ngx.say("done") }
        log_by_lua_block { local s = ngx.var.uri .. string.rep("l", 100) }""",
    "tcp": """content_by_lua_block {
            local s = ngx.socket.tcp()
            local ok, err = s:connect("127.0.0.1", {echo})
            if not ok then return ngx.say("connect ", err) end
            s:send("hello tcp\\n")
            local line, err = s:receive()
            s:close()
            ngx.say(line == "hello tcp" and "done" or ("got " .. tostring(err))) }""",
    "udp": """content_by_lua_block {
            local u = ngx.socket.udp()
            u:setpeername("127.0.0.1", {echo})
            u:send("hello udp")
            local data, err = u:receive()
            u:close()
            ngx.say(data == "hello udp" and "done" or ("got " .. tostring(err))) }""",
    "capture": """content_by_lua_block {
            local r = ngx.location.capture("/sub")
            ngx.say(r.body == "sub\\n" and "done" or r.status) }""",
    "timer": """content_by_lua_block {
            local sema = require("ngx.semaphore").new()
            local ok = ngx.timer.at(0, function(premature, s)
                local t = {} for i = 1, 10 do t[i] = tostring(i) end
                s:post(1) end, sema)
            local got = ok and sema:wait(5)
            ngx.say(got and "done" or "no timer") }""",
    "threads": """content_by_lua_block {
            local function work(n) local t = {} for i = 1, n do t[i] = {i} end return #t end
            local a = ngx.thread.spawn(work, 10)
            local b = ngx.thread.spawn(work, 20)
            local ok1, r1 = ngx.thread.wait(a)
            local ok2, r2 = ngx.thread.wait(b)
            ngx.say((ok1 and ok2 and r1 + r2 == 30) and "done" or "failed") }""",
    "balancer": """proxy_pass http://sweep_lb/done;""",
    "semaphore": """content_by_lua_block {
            local sema = require("ngx.semaphore").new()
            local th = ngx.thread.spawn(function()
                local ok = sema:wait(5) return ok end)
            ngx.sleep(0)
            sema:post(1)
            local ok, res = ngx.thread.wait(th)
            ngx.say((ok and res) and "done" or "failed") }""",
    # ngx.ctx's __index is Lua with an FFI call (lua/index_ffi.lua), taken
    # into the loop's trace: refusals around it must unwind.
    "ctx": """content_by_lua_block {
            local parts = {}
            ngx.ctx.u = ngx.var.uri
            for i = 1, 30 do parts[#parts + 1] = i .. ":" .. ngx.ctx.u end
            ngx.say(#table.concat(parts) > 0 and "done" or "failed") }""",
    # No isolation: a handler's runs share one closure, held on its first
    # run (phases.cpp, pushHandler); a refusal there must leave none.
    "sandbox_off": """lua_sandbox off;
        rewrite_by_lua_block { ngx.ctx.v = ngx.var.uri .. "x" }
        content_by_lua_block { ngx.say(ngx.ctx.v and "done" or "failed") }""",
    # Strings made inside a compiled loop (the trace's SNEW and buffer
    # ops): a refusal there is thrown from machine code.
    "trace_strings": """content_by_lua_block {
            local s = ngx.var.uri .. "abcdefghijklmnop"
            local n = 0
            for i = 1, 400 do
                local t = (s .. i):sub(2, 12 + i % 5)
                n = n + #t
            end
            ngx.say(n > 0 and "done" or "failed") }""",
    "shdict": """content_by_lua_block {
            local d = ngx.shared.d
            d:set("k", string.rep("v", 50))
            local v = d:get("k")
            d:incr("n", 1, 0)
            d:delete("k")
            ngx.say(v and "done" or "failed") }""",
}


# The balancer scenario's upstream: Lua sends it back to this server.
SWEEP_UPSTREAM = """
    upstream sweep_lb {
        server 127.0.0.1:1;
        balancer_by_lua_block {
            local b = require "ngx.balancer"
            assert(b.set_current_peer("127.0.0.1",
                                      tonumber(ngx.var.server_port)))
        }
    }
"""


@pytest.fixture(scope="module")
def echo():
    e = Echo()
    yield e
    e.close()


@pytest.mark.asan_fast
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_allocation_failure_sweep(nginx, echo, name):
    body = SCENARIOS[name].replace("{echo}", str(echo.port))
    n = nginx(http="lua_shared_dict d 1m;" + SWEEP_UPSTREAM, server=f"""
        location /s {{ {body} }}
        location /done {{ return 200 "done\\n"; }}
        location /sub {{ content_by_lua_block {{ ngx.say("sub") }} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    (pid,) = n.worker_pids()
    failed = succeeded = 0
    for i in SWEEP:
        try:
            r = n.get("/s", headers={"X-Luaguard-Fail-Alloc": str(i)})
            status = r.status
            text = r.text
        except Exception:
            # A failure after the header went out (body filter) can only
            # close the connection.
            status, text = None, ""
        assert status in (200, 500, None), (i, status)
        if status == 200 and text.strip() == "done":
            succeeded += 1
        elif status != 200 or text.strip() != "done":
            failed += 1
        assert n.get("/ok").text == "ok\n", i
        assert n.worker_pids() == [pid], i
    # The sweep reached the request's allocations (some runs failed) and
    # went past its last one (the final runs succeed).
    assert failed > 0 and succeeded > 0
    last = n.get("/s", headers={"X-Luaguard-Fail-Alloc": str(SWEEP[-1])})
    assert last.status == 200 and last.text.strip() == "done"
    assert "lua atpanic" not in n.read_log()
