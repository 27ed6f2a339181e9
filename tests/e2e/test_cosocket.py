"""Cosockets (ngx.socket.tcp/udp) against real peers on loopback: an nginx
upstream, redis, memcached, a UDP echo server, a DNS responder, a TLS
server with a test CA. Cases that need no special peer run on luaguard and
on the reference module and must answer the same."""

import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

from harness import Dns, free_port, free_ports

# ---- peers ----


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class TcpPeer:
    """A scripted TCP server: `behave(conn)` runs for each connection."""

    def __init__(self, behave):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.behave = behave
        self.conns = []
        self.stopped = False
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self.run, args=(c,), daemon=True).start()

    def run(self, c):
        try:
            self.behave(c)
        except OSError:
            pass

    def stop(self):
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


@pytest.fixture
def peers():
    made = []

    def make(behave):
        p = TcpPeer(behave)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


UPSTREAM = """
    server {
        listen 127.0.0.1:%(up)d;
        keepalive_requests 100000;
        location / { return 200 "hello from upstream\\n"; }
        location /big { return 200 "0123456789abcdefghij0123456789abcdefghij"; }
    }
"""

# A tiny HTTP/1.1 keepalive client in Lua, used by several cases.
HTTP_GET = r"""
local function get(sock, path)
    local bytes, err = sock:send({"GET ", path, " HTTP/1.1\r\n",
                                  {"Host: x\r\n", "\r\n"}})
    if not bytes then return nil, err end
    local status, err = sock:receive()
    if not status then return nil, err end
    local len
    while true do
        local l, err = sock:receive("*l")
        if not l then return nil, err end
        if l == "" then break end
        local v = l:match("^[Cc]ontent%-[Ll]ength: (%d+)")
        if v then len = tonumber(v) end
    end
    local body, err = sock:receive(len)
    return status .. " " .. tostring(body), err
end
"""

CASES = {
    "keepalive_http": HTTP_GET + r"""
        for i = 1, 3 do
            local sock = ngx.socket.tcp()
            ngx.say("connect: ", sock:connect("127.0.0.1", UP))
            ngx.say("reused: ", sock:getreusedtimes())
            ngx.say(get(sock, "/"))
            ngx.say("keepalive: ", sock:setkeepalive())
            ngx.say("after: ", sock:send("x"))
        end
    """,
    "named_pool_and_stream_alias": HTTP_GET + r"""
        local sock = ngx.socket.stream()
        sock:connect("127.0.0.1", UP, {pool = "mypool"})
        ngx.say(get(sock, "/"))
        sock:setkeepalive(10000, 5)
        local s2 = ngx.socket.tcp()
        s2:connect("127.0.0.1", UP, {pool = "mypool"})
        ngx.say("reused via name: ", s2:getreusedtimes())
        local s3 = ngx.socket.tcp()
        s3:connect("127.0.0.1", UP)
        ngx.say("other pool: ", s3:getreusedtimes())
        s2:close() s3:close()
    """,
    "receive_patterns": r"""
        local sock = ngx.socket.tcp()
        sock:connect("127.0.0.1", UP)
        sock:send("GET /big HTTP/1.0\r\n\r\n")
        ngx.say(sock:receive(0) == "")
        ngx.say(sock:receive("*l"))
        local it = sock:receiveuntil("\r\n\r\n")
        ngx.say(type(it()))
        ngx.say(sock:receive(5))
        ngx.say(sock:receive("5"))
        ngx.say(sock:receiveany(3))
        ngx.say(sock:receive("*a"))
        ngx.say(sock:receive())
        ngx.say(sock:close())
    """,
    "receiveuntil_sized_and_inclusive": r"""
        local sock = ngx.socket.tcp()
        sock:connect("127.0.0.1", UP)
        sock:send("GET /big HTTP/1.0\r\n\r\n")
        sock:receiveuntil("\r\n\r\n")()
        local r = sock:receiveuntil("abc")
        while true do
            local d, e, p = r(4)
            if not d then ngx.say("done: ", e) break end
            ngx.say("chunk [", d, "]")
        end
        local r2 = sock:receiveuntil("789", {inclusive = true})
        ngx.say(r2())
        local r3 = sock:receiveuntil("nope")
        ngx.say(r3())
    """,
    "refused_and_closed": r"""
        local sock = ngx.socket.tcp()
        ngx.say(sock:connect("127.0.0.1", DEAD))
        ngx.say(sock:send("x"))
        ngx.say(sock:receive())
        ngx.say(sock:close())
        ngx.say(sock:setkeepalive())
        ngx.say(sock:getreusedtimes())
        local s, err = ngx.socket.connect("127.0.0.1", DEAD)
        ngx.say(s, " ", err)
    """,
    "no_resolver": r"""
        local sock = ngx.socket.tcp()
        ngx.say(sock:connect("no-such-host.invalid", 80))
        local u = ngx.socket.udp()
        ngx.say(u:setpeername("no-such-host.invalid", 53))
    """,
    "light_threads_share_socket": HTTP_GET + r"""
        local a = ngx.thread.spawn(function()
            local sock = ngx.socket.tcp()
            sock:connect("127.0.0.1", UP)
            local r = get(sock, "/")
            sock:setkeepalive()
            return r
        end)
        local b = ngx.thread.spawn(function()
            local sock = ngx.socket.tcp()
            sock:connect("127.0.0.1", UP)
            local r = get(sock, "/big")
            sock:close()
            return r
        end)
        ngx.say(ngx.thread.wait(a))
        ngx.say(ngx.thread.wait(b))
    """,
    "inside_coroutine_wrap": HTTP_GET + r"""
        local f = coroutine.wrap(function()
            local sock = ngx.socket.tcp()
            sock:connect("127.0.0.1", UP)
            coroutine.yield(get(sock, "/"))
            sock:close()
        end)
        ngx.say(f())
    """,
    "bind_and_reconnect_one_object": HTTP_GET + r"""
        local sock = ngx.socket.tcp()
        ngx.say("bind: ", sock:bind("127.0.0.1"))
        ngx.say("connect: ", sock:connect("127.0.0.1", UP))
        ngx.say(get(sock, "/"))
        ngx.say("again: ", sock:connect("127.0.0.1", UP))
        ngx.say(get(sock, "/big"))
        ngx.say("close: ", sock:close())
        ngx.say("refused: ", sock:connect("127.0.0.1", DEAD))
        ngx.say("after: ", sock:connect("127.0.0.1", UP))
        ngx.say(get(sock, "/"))
        ngx.say("keepalive: ", sock:setkeepalive())
        ngx.say("bad bind: ", sock:bind("not-an-address"))
    """,
    "pool_backlog_queue": HTTP_GET + r"""
        local opts = {pool = "q", pool_size = 1, backlog = 1}
        local function user(name, hold)
            return function()
                local sock = ngx.socket.tcp()
                local ok, err = sock:connect("127.0.0.1", UP, opts)
                if not ok then return name .. " " .. err end
                local r = get(sock, "/")
                if hold then ngx.sleep(hold) end
                local reused = sock:getreusedtimes()
                sock:setkeepalive()
                return name .. " " .. r .. " reused " .. reused
            end
        end
        local a = ngx.thread.spawn(user("a", 0.05))
        local b = ngx.thread.spawn(user("b"))
        local c = ngx.thread.spawn(user("c"))
        ngx.say(select(2, ngx.thread.wait(c)))
        ngx.say(select(2, ngx.thread.wait(a)))
        ngx.say(select(2, ngx.thread.wait(b)))
        -- a waiter killed in the queue leaves its place to the next
        local d = ngx.thread.spawn(function()
            local sock = ngx.socket.tcp()
            sock:connect("127.0.0.1", UP, opts)
            ngx.sleep(0.05)
            sock:setkeepalive()
            return "d done"
        end)
        local e = ngx.thread.spawn(user("e"))
        ngx.thread.kill(e)
        local f = ngx.thread.spawn(user("f"))
        ngx.say(select(2, ngx.thread.wait(d)))
        ngx.say(select(2, ngx.thread.wait(f)))
        -- a wait that times out
        local s1 = ngx.socket.tcp()
        s1:connect("127.0.0.1", UP, opts)
        local s2 = ngx.socket.tcp()
        s2:settimeout(30)
        ngx.say("timeout: ", s2:connect("127.0.0.1", UP, opts))
        s1:close()
    """,
    "bad_args": r"""
        local sock = ngx.socket.tcp()
        ngx.say(pcall(sock.connect, sock))
        ngx.say(sock:connect("127.0.0.1", 70000))
        ngx.say(pcall(sock.send, sock, {function() end}))
    """,
}


def run_case(nginx, module, body, up, dead):
    code = body.replace("UP", str(up)).replace("DEAD", str(dead))
    n = nginx(module=module, http=UPSTREAM % {"up": up},
              server="location /t { content_by_lua_block {%s} }" % code)
    r = n.get("/t")
    n.stop()  # the next run binds the same upstream port
    return r.status, r.text


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_as_reference(nginx, name):
    up, dead = free_ports(2)
    ours = run_case(nginx, "luaguard", CASES[name], up, dead)
    ref = run_case(nginx, "reference", CASES[name], up, dead)
    assert ours == ref
    assert ours[0] == 200


@pytest.mark.asan_fast
def test_keepalive_http_upstream(nginx):
    up, dead = free_ports(2)
    status, text = run_case(nginx, "luaguard", CASES["keepalive_http"], up,
                            dead)
    assert status == 200
    assert text.count("HTTP/1.1 200 OK hello from upstream") == 3
    assert "reused: 0\n" in text and "reused: 2\n" in text
    assert "after: nilclosed" in text


@pytest.mark.asan_fast
def test_phases(nginx):
    n = nginx(server=r"""
        location /t {
            rewrite_by_lua_block { ngx.ctx.r = pcall(ngx.socket.tcp) }
            access_by_lua_block { ngx.ctx.a = pcall(ngx.socket.tcp) }
            content_by_lua_block {
                ngx.say(ngx.ctx.r, " ", ngx.ctx.a)
            }
            header_filter_by_lua_block {
                local ok, err = pcall(ngx.socket.tcp)
                ngx.header["X-Err"] = err
            }
            log_by_lua_block {
                local ok, err = pcall(ngx.socket.udp)
                ngx.log(ngx.ERR, "log phase: ", err)
            }
        }""")
    r = n.get("/t")
    assert r.text == "true true\n"
    # The shared checkPhase names phases without "_by_lua*" (see report).
    assert r.header("X-Err").startswith(
        "API disabled in the context of header_filter")
    n.wait_log(r"log phase: API disabled in the context of log")


def test_timer_and_socket_from_previous_request(nginx):
    up = free_port()
    # lua_sandbox off: the configuration in which request code can keep an
    # object for a later request at all (package.loaded is read-only for
    # request code otherwise), so the one where the lifetime matters.
    n = nginx(http=UPSTREAM % {"up": up} + "\nlua_sandbox off;\n", server=r"""
        location /t { content_by_lua_block {
            ngx.timer.at(0, function()
                local s = ngx.socket.tcp()
                local ok, err = s:connect("127.0.0.1", %d)
                s:send("GET / HTTP/1.0\r\n\r\n")
                local body = s:receive("*a")
                ngx.log(ngx.ERR, "timer got: ", body:match("hello from upstream"))
            end)
            local keep = package.loaded.cosocket_keep or {}
            package.loaded.cosocket_keep = keep
            keep.sock = ngx.socket.tcp()
            keep.sock:connect("127.0.0.1", %d)
            ngx.say("stored")
        } }
        location /later { content_by_lua_block {
            local keep = package.loaded.cosocket_keep
            ngx.say(keep.sock:send("GET / HTTP/1.0\r\n\r\n"))
            ngx.say(keep.sock:receive())
            keep.sock = nil
            collectgarbage() collectgarbage()
            ngx.say("gc ok")
        } }""" % (up, up))
    assert n.get("/t").text == "stored\n"
    n.wait_log(r"timer got: hello from upstream")
    assert n.get("/later").text == "nilclosed\nnilclosed\ngc ok\n"


# ---- faults ----

def test_read_timeout_and_worker_stays_responsive(nginx, peers):
    got, release, done = (threading.Event() for _ in range(3))

    def peer(c):
        c.recv(100)
        got.set()
        release.wait(30)   # holds the reply until /ping was answered
        c.sendall(b"late\n")
        done.wait(30)      # then silent: the next read times out

    held = peers(peer)
    n = nginx(server=r"""
        location /t { content_by_lua_block {
            local s = ngx.socket.tcp()
            s:settimeouts(1000, 1000, 30000)
            ngx.say(s:connect("127.0.0.1", %d))
            s:send("hi")
            ngx.say(s:receive())
            s:settimeouts(1000, 1000, 200)
            ngx.say(s:receive(10))
            ngx.say(s:send("still open"))
        } }
        location /ping { return 200 "pong"; }""" % held.port)
    results = {}

    def slow():
        results["t"] = n.get("/t", timeout=60)

    th = threading.Thread(target=slow)
    th.start()
    assert got.wait(10)
    # /t waits in a read its peer does not answer yet: the worker serves.
    assert n.get("/ping").text == "pong"
    assert th.is_alive()
    release.set()
    th.join()
    done.set()
    assert results["t"].text == "1\nlate\nniltimeout\n10\n"
    assert "lua tcp socket read timed out" in n.read_log()


def test_peer_closes_mid_response_and_resets(nginx, peers):
    def half(c):
        c.recv(100)
        c.sendall(b"partial line without end")
        c.close()

    def reset(c):
        c.recv(100)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                     struct.pack("ii", 1, 0))
        c.close()

    p1, p2 = peers(half), peers(reset)
    n = nginx(server=r"""
        location /t { content_by_lua_block {
            local s = ngx.socket.tcp()
            s:connect("127.0.0.1", %d)
            s:send("go")
            ngx.say(s:receive())
            ngx.say(s:receive())
            local s2 = ngx.socket.tcp()
            s2:connect("127.0.0.1", %d)
            s2:send("go")
            local d, err, partial = s2:receive("*a")
            ngx.say(d, " ", err, " [", partial, "]")
        } }""" % (p1.port, p2.port))
    r = n.get("/t")
    lines = r.text.splitlines()
    assert lines[0] == "nilclosedpartial line without end"
    assert lines[1] == "nilclosed"
    assert lines[2] in ("nil connection reset by peer []", " nil []")


def test_more_than_the_buffer(nginx, peers):
    blob = bytes(range(256)) * 1000   # 256000 bytes, no newline issue

    def big(c):
        c.recv(100)
        c.sendall(blob + b"\nEND-MARK tail")
        time.sleep(0.5)
        c.close()

    p = peers(big)
    n = nginx(server=r"""
        lua_socket_buffer_size 1k;
        location /t { content_by_lua_block {
            local s = ngx.socket.tcp()
            s:connect("127.0.0.1", %d)
            s:send("go")
            local a = s:receive(100000)
            local b = s:receiveuntil("END-MARK")()
            local rest = s:receive("*a")
            ngx.print(#a, " ", #b, " ", rest, " ", ngx.md5(a .. b))
        } }""" % p.port)
    import hashlib
    r = n.get("/t")
    md5 = hashlib.md5(blob + b"\n").hexdigest()
    assert r.text == f"100000 156001  tail {md5}"


def test_no_fd_leak_after_many_requests(nginx):
    up = free_port()
    n = nginx(http=UPSTREAM % {"up": up}, server=HTTP_GET.join([r"""
        location /t { content_by_lua_block {""", r"""
            local s = ngx.socket.tcp()
            local ok, err = s:connect("127.0.0.1", %d)
            if not ok then ngx.say(err) return end
            local r = get(s, "/")
            if ngx.var.arg_close then s:close() else s:setkeepalive() end
            ngx.say(r)
        } }""" % up]))
    pid = n.worker_pids()[0]
    n.get("/t")
    before = len(os.listdir(f"/proc/{pid}/fd"))
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", n.port, timeout=10)
    for i in range(10000):
        conn.request("GET", "/t" if i % 2 else "/t?close=1")
        resp = conn.getresponse()
        assert resp.read() == b"HTTP/1.1 200 OK hello from upstream\n\n"
    conn.close()
    after = len(os.listdir(f"/proc/{pid}/fd"))
    assert after <= before + 1


# ---- real services ----

REDIS_CLIENT = r"""
local function cmd(...)
    local args = {...}
    local out = {"*", #args, "\r\n"}
    for _, a in ipairs(args) do
        a = tostring(a)
        out[#out + 1] = {"$", #a, "\r\n", a, "\r\n"}
    end
    return out
end
local function read_reply(sock)
    local line, err = sock:receive()
    if not line then return nil, err end
    local t, rest = line:sub(1, 1), line:sub(2)
    if t == "+" or t == "-" then return rest end
    if t == ":" then return tonumber(rest) end
    if t == "$" then
        local n = tonumber(rest)
        if n < 0 then return ngx.null end
        local data = sock:receive(n + 2)
        return data:sub(1, n)
    end
    return nil, "bad reply " .. line
end
"""


def test_redis_pipeline(nginx, tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server")
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        code = REDIS_CLIENT + r"""
            local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", %d))
            local reqs = {}
            for i = 1, 1000 do reqs[i] = cmd("SET", "k" .. i, "v" .. i) end
            assert(sock:send(reqs))
            local ok = 0
            for i = 1, 1000 do
                if read_reply(sock) == "OK" then ok = ok + 1 end
            end
            reqs = {}
            for i = 1, 1000 do reqs[i] = cmd("GET", "k" .. i) end
            sock:send(reqs)
            local same = 0
            for i = 1, 1000 do
                if read_reply(sock) == "v" .. i then same = same + 1 end
            end
            sock:send(cmd("GET", "missing"))
            ngx.say(ok, " ", same, " ", read_reply(sock) == ngx.null)
            ngx.say(sock:setkeepalive())
        """ % port
        for module in ("luaguard", "reference"):
            n = nginx(module=module, server="location /t { "
                      "content_by_lua_block {%s} }" % code)
            assert n.get("/t").text == "1000 1000 true\n1\n"
            n.stop()
    finally:
        proc.terminate()
        proc.wait()


def test_memcached(nginx):
    if shutil.which("memcached") is None:
        pytest.skip("no memcached")
    port = free_port()
    proc = subprocess.Popen(["memcached", "-l", "127.0.0.1", "-p",
                             str(port), "-U", "0", "-u", "root"],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        n = nginx(server=r"""
            location /t { content_by_lua_block {
                local s = ngx.socket.tcp()
                assert(s:connect("127.0.0.1", %d))
                s:send("set foo 0 0 5\r\nhello\r\n")
                ngx.say(s:receive())
                s:send("get foo\r\n")
                ngx.say(s:receive())
                ngx.say(s:receive(7))
                ngx.say(s:receive())
                s:setkeepalive()
            } }""" % port)
        assert n.get("/t").text == "STORED\nVALUE foo 0 5\nhello\r\n\nEND\n"
    finally:
        proc.terminate()
        proc.wait()


class UdpEcho:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except OSError:
                return
            if data != b"quiet":
                self.sock.sendto(b"echo:" + data, addr)


def test_udp_echo(nginx):
    echo = UdpEcho()
    try:
        n = nginx(server=r"""
            location /t { content_by_lua_block {
                local u = ngx.socket.udp()
                ngx.say(u:setpeername("127.0.0.1", %d))
                ngx.say(u:send("ping"))
                ngx.say(u:receive())
                ngx.say(u:send({"a", {"b", "c"}}))
                ngx.say(u:receive(6))
                u:settimeout(100)
                u:send("quiet")
                ngx.say(u:receive())
                ngx.say(u:close())
                ngx.say(u:send("x"))
            } }""" % echo.port)
        assert n.get("/t").text == ("1\n1\necho:ping\n1\necho:a\n"
                                    "niltimeout\n1\nnilclosed\n")
    finally:
        echo.sock.close()


def test_resolver(nginx):
    dns = Dns(lambda name: "127.0.0.1" if name.endswith(".test") else None)
    up = free_port()
    try:
        n = nginx(http=UPSTREAM % {"up": up}, server=r"""
            resolver 127.0.0.1:%d ipv6=off;
            resolver_timeout 2s;
            location /t { content_by_lua_block {
                local s = ngx.socket.tcp()
                ngx.say(s:connect("upstream.test", %d))
                s:send("GET / HTTP/1.0\r\n\r\n")
                local body = s:receive("*a")
                ngx.say(body:match("hello from upstream"))
                local s2 = ngx.socket.tcp()
                ngx.say(s2:connect("missing.example", %d))
            } }""" % (dns.port, up, up))
        assert n.get("/t").text == (
            "1\nhello from upstream\n"
            "nilmissing.example could not be resolved (3: Host not found)\n")
        assert ("upstream.test", 1) in dns.queries
    finally:
        dns.close()


def make_ca(d):
    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True,
                       capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "2", "-subj", "/CN=luaguard test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key",
        "-out", "srv.csr", "-subj", "/CN=tls.test")
    (d / "ext.cnf").write_text("subjectAltName=DNS:tls.test\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey",
        "ca.key", "-CAcreateserial", "-out", "srv.crt", "-days", "2",
        "-extfile", "ext.cnf")


def test_sslhandshake(nginx, tmp_path):
    make_ca(tmp_path)
    tls = free_port()
    http = r"""
        server {
            listen 127.0.0.1:%d ssl;
            ssl_certificate %s/srv.crt;
            ssl_certificate_key %s/srv.key;
            location / { return 200 "secret\n"; }
        }""" % (tls, tmp_path, tmp_path)
    code = r"""
        local function fetch(sess, name, verify)
            local s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", %d))
            local sess2, err = s:sslhandshake(sess, name, verify)
            if not sess2 then s:close() return nil, err end
            s:send("GET / HTTP/1.0\r\nHost: tls.test\r\n\r\n")
            local body = s:receive("*a")
            return sess2, body:match("secret")
        end
        local sess, r = fetch(nil, "tls.test", true)
        ngx.say(type(sess), " ", r)
        local again, r2 = fetch(sess, "tls.test", true)
        ngx.say(type(again), " ", r2)
        ngx.say(fetch(false, "tls.test", false))
        ngx.say(select(2, fetch(nil, "other.test", true)))
    """ % tls
    n = nginx(http=http, server=r"""
        lua_ssl_trusted_certificate %s/ca.crt;
        lua_ssl_verify_depth 2;
        location /t { content_by_lua_block {%s} }
        location /untrusted {
            lua_ssl_trusted_certificate %s/srv.crt;
            content_by_lua_block {
                local s = ngx.socket.tcp()
                s:connect("127.0.0.1", %d)
                ngx.say(s:sslhandshake(nil, "tls.test", true))
            }
        }""" % (tmp_path, code, tmp_path, tls))
    assert n.get("/t").text == ("userdata secret\nuserdata secret\n"
                                "truesecret\ncertificate host mismatch\n")
    r = n.get("/untrusted").text
    assert r.startswith("nil") and "unable to" in r


GETOPTION = r"""
location /t { content_by_lua_block {
    local function show(...)
        local t = {}
        for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
        ngx.say(table.concat(t, " "))
    end
    local s = ngx.socket.tcp()
    local ok, err = pcall(s.getoption, s, "keepalive")
    show(ok, (tostring(err):gsub("^.*: ", "")))
    show(s:connect("127.0.0.1", ngx.var.server_port))
    for _, o in ipairs{"keepalive", "reuseaddr", "bogus"} do
        show(o, s:getoption(o))
    end
    show(s:setoption("keepalive", true), s:getoption("keepalive"))
    show(s:setoption("tcp-nodelay", false), s:getoption("tcp-nodelay"))
    show(s:getoption())
    show(s:getoption(1))
    ngx.ctx.s = s
    s:close()
    show(s:getoption("keepalive"))
} }
location /buffers { content_by_lua_block {
    local s = ngx.socket.tcp()
    s:connect("127.0.0.1", ngx.var.server_port)
    s:setoption("sndbuf", 65536)
    s:setoption("rcvbuf", 32768)
    -- Linux doubles what is set, for its bookkeeping
    ngx.say(s:getoption("sndbuf"), " ", s:getoption("rcvbuf"))
} }
"""


def test_getoption_as_the_reference(nginx):
    out = {m: nginx(module=m, server=GETOPTION).get("/t").text
           for m in ("luaguard", "reference")}
    assert out["luaguard"] == out["reference"]
    assert out["luaguard"].splitlines()[2:4] == ["keepalive 0",
                                                 "reuseaddr 0"]


def test_getoption_reads_the_buffer_it_names(nginx):
    for m in ("luaguard", "reference"):
        n = nginx(module=m, server=GETOPTION)
        assert n.get("/buffers").text == "131072 65536\n", m


# connect's options table, good and bad values: pcall's results (a backlog
# that is not a number counts as 0 in both).
CONNECT_OPTIONS = [
    "{ pool = {} }", "{ pool = 1 }", "{ pool = true }",
    "{ pool_size = 'x' }", "{ pool_size = '3' }", "{ pool_size = 0 }",
    "{ pool_size = -1 }", "{ pool_size = 2.5 }", "{ pool_size = {} }",
    "{ backlog = {} }", "{ backlog = 'x' }", "{ backlog = -1 }",
    "{ backlog = 0 }", "{ backlog = 2.5 }", "{ pool_size = 1, backlog = 1 }",
    "{ backlog = 1 }", "{}",
]


def test_connect_option_answers_as_the_reference(nginx):
    probes = "\n".join(f"""
        do
            local s = ngx.socket.tcp()
            local r = {{ pcall(s.connect, s, "127.0.0.1", {{port}}, {o}) }}
            for i = 1, #r do r[i] = tostring(r[i]) end
            ngx.say({o!r}, " => ", table.concat(r, " "))
            s:close()
        end""" for o in CONNECT_OPTIONS)
    out = {}
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        server = ("location /t { content_by_lua_block { "
                  + probes.replace("{port}", str(port)) + " } }")
        for m in ("luaguard", "reference"):
            out[m] = nginx(module=m, server=server).get("/t").text
    assert out["luaguard"] == out["reference"]
    assert ("{ pool_size = 'x' } => false bad argument #4 to '?' "
            "(bad \"pool_size\" option type: string)") in out["luaguard"]
