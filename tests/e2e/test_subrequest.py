"""ngx.location.capture / capture_multi and ngx.on_abort, many of them
compared with lua-nginx-module (module="reference")."""

import os
import socket
import threading

import pytest

from harness import free_port

# Targets of the subrequests: nginx itself, static files, a proxied second
# server block on loopback, Lua.
TARGETS = r"""
location = /ret { return 201 "created\n"; }
location = /nf { return 404; }
location = /static.txt { root html; }
location = /echo {
    content_by_lua_block {
        ngx.header["X-Multi"] = {"1", "2"}
        ngx.header["X-One"] = "one"
        ngx.req.read_body()
        ngx.say("method=", ngx.req.get_method(), " args=", ngx.var.args)
        ngx.say("body=", ngx.req.get_body_data())
        ngx.say("cl=", ngx.var.http_content_length,
                " te=", ngx.var.http_transfer_encoding)
    }
}
location = /vars {
    content_by_lua_block {
        ngx.say("dog=", ngx.var.dog, " cat=", ngx.var.cat)
        ngx.var.dog = "changed by sub"
    }
}
location = /setctx {
    content_by_lua_block {
        ngx.say("sub sees ", tostring(ngx.ctx.foo))
        ngx.ctx.foo = "bar"
    }
}
location = /sleep {
    content_by_lua_block {
        ngx.sleep(0.5)
        ngx.say("slept ", ngx.var.arg_n)
    }
}
location = /status {
    content_by_lua_block {
        ngx.status = 418
        ngx.say("teapot")
    }
}
"""

PROXIED = """
location = /proxied {
    proxy_pass http://127.0.0.1:{bport}/backend;
}
"""


def show_lua(expr):
    """Lua that prints a capture result (or several) in a fixed order."""
    return r"""
        local function show(res)
            local keys = {}
            for k in pairs(res.header) do
                if k ~= "ETag" and k ~= "Last-Modified" then
                    keys[#keys + 1] = k
                end
            end
            table.sort(keys)
            ngx.say("status=", res.status, " truncated=", tostring(res.truncated))
            for _, k in ipairs(keys) do
                local v = res.header[k]
                if type(v) == "table" then v = "{" .. table.concat(v, ",") .. "}" end
                ngx.say("  ", k, ": ", v)
            end
            ngx.say("  body=[", res.body, "]")
        end
        local results = { %s }
        for _, res in ipairs(results) do show(res) end
    """ % expr


CASES = {
    "return_directive": 'ngx.location.capture("/ret")',
    "return_error_status": 'ngx.location.capture("/nf")',
    "static_file": 'ngx.location.capture("/static.txt")',
    "static_head": 'ngx.location.capture("/static.txt", '
                   '{method = ngx.HTTP_HEAD})',
    "missing_file": 'ngx.location.capture("/missing.txt")',
    "lua_status_and_multi_headers": 'ngx.location.capture("/status")',
    "method_body_args": 'ngx.location.capture("/echo?x=1", '
                       '{method = ngx.HTTP_POST, body = "hello", '
                       'args = {b = "3"}})',
    "args_string": 'ngx.location.capture("/echo", {args = "a=1&b=%3a"})',
    "method_put_delete": 'ngx.location.capture("/echo", '
                         '{method = ngx.HTTP_PUT, body = "p"}), '
                         'ngx.location.capture("/echo", '
                         '{method = ngx.HTTP_DELETE})',
    "capture_multi_order": 'ngx.location.capture_multi({'
                           '{"/echo", {args = "n=1"}}, {"/ret"}, '
                           '{"/echo", {args = {n = 3}}}})',
}


def with_backend(nginx, backend, http_extra="", **kw):
    """Starts a server whose /proxied location proxies to a second server
    block (on its own loopback port) holding `backend` locations."""
    bport = free_port()
    kw["server"] = (PROXIED + kw["server"]).replace("{bport}", str(bport))
    kw["http"] = (http_extra + "\n"
                  "client_max_body_size 16m;\nclient_body_buffer_size 16m;\n"
                  "server {\n listen 127.0.0.1:%d;\n%s\n}\n"
                  % (bport, backend))
    return nginx(**kw)


def make_readable(n):
    # nginx workers run as nobody: the prefix must be reachable.
    p = n.prefix
    while str(p) != "/":
        os.chmod(p, os.stat(p).st_mode | 0o755)
        p = p.parent


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_matches_reference(nginx, name):
    server = TARGETS + """
location = /t { content_by_lua_block { %s } }
""" % show_lua(CASES[name])
    outs = []
    for module in ("luaguard", "reference"):
        n = nginx(server=server, module=module,
                  files={"html/static.txt": "static file\n"})
        make_readable(n)
        r = n.get("/t")
        assert r.status == 200, (module, r.text)
        outs.append(r.text)
    assert outs[0] == outs[1]
    assert "status=" in outs[0]


@pytest.mark.asan_fast
def test_capture_basic_fields(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    content_by_lua_block {
        local res = ngx.location.capture("/echo?x=1",
            {method = ngx.HTTP_POST, body = "hello", args = {b = 3, c = ":"}})
        ngx.say(res.status, " ", tostring(res.truncated))
        ngx.say(table.concat(res.header["X-Multi"], ","), " ", res.header["X-One"])
        ngx.print(res.body)
    }
}
""")
    r = n.get("/t")
    assert r.status == 200
    lines = r.text.splitlines()
    assert lines[0] == "200 false"
    assert lines[1] == "1,2 one"
    assert lines[2].startswith("method=POST args=x=1&")
    assert "c=%3A" in lines[2] and "b=3" in lines[2]
    assert lines[3] == "body=hello"
    assert lines[4] == "cl=5 te=nil"


VARS_LUA = r"""
location = /t {
    set $dog "hello";
    set $cat "";
    content_by_lua_block {
        local res = ngx.location.capture("/vars", {%s})
        ngx.print(res.body)
        ngx.say("parent dog=", ngx.var.dog)
    }
}
"""


@pytest.mark.parametrize("opts", [
    "",
    "copy_all_vars = true",
    "share_all_vars = true",
    "share_all_vars = true, copy_all_vars = true",
    'vars = {dog = "from vars", cat = 32}',
    'copy_all_vars = true, vars = {cat = "c"}',
])
def test_vars_options_match_reference(nginx, opts):
    outs = []
    for module in ("luaguard", "reference"):
        n = nginx(server=TARGETS + VARS_LUA % opts, module=module,
                  http='map $uri $unused { default ""; }')
        r = n.get("/t")
        assert r.status == 200, r.text
        outs.append(r.text)
    assert outs[0] == outs[1]


def test_vars_semantics(nginx):
    n = nginx(server=TARGETS + VARS_LUA % "share_all_vars = true")
    assert n.get("/t").text == ("dog=hello cat=\nparent dog=changed by sub\n")


def test_ctx_option(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    content_by_lua_block {
        local ctx = {foo = "given"}
        ngx.location.capture("/setctx", {ctx = ctx})
        ngx.say("own table: ", ctx.foo, " parent: ", tostring(ngx.ctx.foo))
        ngx.ctx.foo = "shared"
        local res = ngx.location.capture("/setctx", {ctx = ngx.ctx})
        ngx.print(res.body)
        ngx.say("parent now: ", ngx.ctx.foo)
        res = ngx.location.capture("/setctx")
        ngx.print(res.body)
    }
}
""")
    assert n.get("/t").text == ("own table: bar parent: nil\n"
                                "sub sees shared\n"
                                "parent now: bar\n"
                                "sub sees nil\n")


FORWARD_LUA = r"""
location = /t {
    content_by_lua_block {
        ngx.req.read_body()
        local get = ngx.location.capture("/echo")
        local post = ngx.location.capture("/echo", {method = ngx.HTTP_POST})
        local fwd = ngx.location.capture("/echo", {always_forward_body = true})
        local own = ngx.location.capture("/echo",
            {method = ngx.HTTP_POST, body = "mine"})
        ngx.print(get.body, post.body, fwd.body, own.body)
    }
}
"""


def test_body_forwarding_matches_reference(nginx):
    outs = []
    for module in ("luaguard", "reference"):
        n = nginx(server=TARGETS + FORWARD_LUA, module=module)
        r = n.request("/t", method="POST", body=b"parent-body")
        assert r.status == 200
        outs.append(r.text)
    assert outs[0] == outs[1]
    assert "body=parent-body" in outs[0] and "body=mine" in outs[0]


def test_chunked_parent_body_is_framed_by_length(nginx):
    n = nginx(server=TARGETS + FORWARD_LUA)
    raw = (b"POST /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n"
           b"5\r\nhello\r\n0\r\n\r\n")
    out = n.raw(raw).decode()
    # No Transfer-Encoding reaches a subrequest; its length is its own.
    assert "te=chunked" not in out
    assert "method=POST args=nil\nbody=hello\ncl=5 te=nil" in out
    assert "body=mine\ncl=4 te=nil" in out


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", ["luaguard", "reference"])
def test_capture_multi_runs_in_parallel(nginx, module):
    # The three subrequests share one ngx.ctx: the last to arrive wakes the
    # two waiting for it. Run one after another, the first would wait
    # alone until its semaphore timed out.
    n = nginx(module=module, server=TARGETS + r"""
location = /meet {
    content_by_lua_block {
        local c = ngx.ctx
        c.here = c.here + 1
        if c.here == 3 then
            c.sem:post(2)
            ngx.say("last")
        else
            local ok, err = c.sem:wait(10)
            ngx.say(ok and "met" or err)
        end
    }
}
location = /t {
    content_by_lua_block {
        local shared = {here = 0, sem = require("ngx.semaphore").new(0)}
        local a, b, c = ngx.location.capture_multi({
            {"/meet", {ctx = shared}}, {"/meet", {ctx = shared}},
            {"/meet", {ctx = shared}}})
        ngx.print(a.body, b.body, c.body)
        local d, e = ngx.location.capture_multi({
            {"/sleep", {args = "n=1"}}, {"/sleep", {args = "n=2"}}})
        ngx.print(d.body, e.body)
    }
}
""")
    assert n.get("/t", timeout=30).text == (
        "met\nmet\nlast\nslept 1\nslept 2\n")


def test_proxy_pass_subrequest(nginx):
    n = with_backend(nginx, r"""
location = /backend {
    content_by_lua_block {
        ngx.req.read_body()
        ngx.header["X-Backend"] = "yes"
        ngx.say("backend got ", ngx.req.get_method(), " ",
                tostring(ngx.req.get_body_data()))
    }
}
""", server=TARGETS + r"""
location = /t {
    content_by_lua_block {
        local res = ngx.location.capture("/proxied",
            {method = ngx.HTTP_POST, body = "via proxy"})
        ngx.say(res.status, " ", res.header["X-Backend"], " ",
                tostring(res.truncated))
        ngx.print(res.body)
    }
}
""")
    r = n.get("/t")
    assert r.text == "200 yes false\nbackend got POST via proxy\n"


BIG_BACKEND = r"""
location = /backend {
    content_by_lua_block {
        ngx.req.read_body()
        local data = ngx.req.get_body_data()
        if not data then
            local f = io.open(ngx.req.get_body_file(), "rb")
            data = f:read("*a")
            f:close()
        end
        ngx.print(data, data)
    }
}
"""


def test_big_request_and_response_bodies(nginx):
    n = with_backend(nginx, BIG_BACKEND,
                     server=TARGETS + BIG_BACKEND + r"""
client_max_body_size 16m;
client_body_buffer_size 16m;
location = /t {
    content_by_lua_block {
        local body = string.rep("0123456789abcdef", 4 * 65536)  -- 4 MiB
        local res = ngx.location.capture("/proxied",
            {method = ngx.HTTP_POST, body = body})
        ngx.say(res.status, " ", #res.body, " ",
                tostring(res.body == body .. body), " ",
                tostring(res.truncated))
        local lua = ngx.location.capture("/backend",
            {method = ngx.HTTP_POST, body = body})
        ngx.say(#lua.body, " ", tostring(lua.body == body .. body))
    }
}
""")
    r = n.get("/t", timeout=30)
    assert r.text == "200 8388608 true false\n8388608 true\n"


BIG_PROXIED = r"""
location = /big {
    content_by_lua_block {
        ngx.print(string.rep(ngx.var.arg_c or "x", 4 * 1048576))
    }
}
"""


def test_big_proxied_capture_needs_no_temp_file(nginx):
    # Workers run as nobody and cannot write proxy_temp_path here, and one
    # location forbids temp files outright: the captured response still
    # arrives whole, through memory. (lua-nginx-module spools it to a temp
    # file, failing here, and stalls for good with no temp file allowed.)
    n = with_backend(nginx, BIG_PROXIED, server=r"""
location = /buffered { proxy_pass http://127.0.0.1:{bport}/big; }
location = /no_temp {
    proxy_max_temp_file_size 0;
    proxy_buffers 4 4k;
    proxy_busy_buffers_size 8k;
    proxy_pass http://127.0.0.1:{bport}/big;
}
location = /unbuffered {
    proxy_buffering off;
    proxy_pass http://127.0.0.1:{bport}/big;
}
location = /t {
    content_by_lua_block {
        local function show(res, c)
            ngx.say(res.status, " ", #res.body, " ", tostring(res.truncated),
                    " ", tostring(res.body == string.rep(c, 4 * 1048576)))
        end
        for _, loc in ipairs({"/buffered", "/no_temp", "/unbuffered"}) do
            show(ngx.location.capture(loc), "x")
        end
        local a, b = ngx.location.capture_multi({
            {"/no_temp", {args = "c=a"}}, {"/buffered", {args = "c=b"}}})
        show(a, "a")
        show(b, "b")
    }
}
""")
    r = n.get("/t", timeout=60)
    assert r.text == "200 4194304 false true\n" * 5
    assert "temp file" not in n.read_log()


def test_cached_proxied_capture_still_caches(nginx):
    # Buffering stays on for responses the cache stores: the second
    # capture is served from the cache (same body, one backend hit).
    n = with_backend(nginx, r"""
location = /backend {
    content_by_lua_block {
        ngx.log(ngx.WARN, "backend hit")
        ngx.header["Cache-Control"] = "max-age=60"
        ngx.print(string.rep("c", 200000), ngx.now())
    }
}
""", main="user root;", http_extra="proxy_cache_path cache keys_zone=c:1m;",
        server=r"""
location = /cached {
    proxy_cache c;
    proxy_pass http://127.0.0.1:{bport}/backend;
}
location = /t {
    content_by_lua_block {
        local one = ngx.location.capture("/cached")
        local two = ngx.location.capture("/cached")
        ngx.say(#one.body > 200000, " ", tostring(one.body == two.body))
    }
}
""")
    assert n.get("/t").text == "true true\n"
    assert n.read_log().count("backend hit") == 1


class RawListener:
    """A raw TCP listener on loopback that records everything it
    receives and answers every connection with one fixed response."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            data = b""
            conn.settimeout(1.0)
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except socket.timeout:
                pass
            self.received.append(data)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\nok")
            except OSError:
                pass
            conn.close()

    def close(self):
        self.sock.close()


def test_cve_2020_11724_body_cannot_smuggle_a_request(nginx):
    listener = RawListener()
    try:
        smuggle = ("x" * 8 + "GET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n")
        n = nginx(server=TARGETS + r"""
location = /raw {
    proxy_pass http://127.0.0.1:%d;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
}
location = /t {
    content_by_lua_block {
        ngx.req.read_body()
        local res = ngx.location.capture("/raw",
            {method = ngx.HTTP_POST, body = %q})
        ngx.say(res.status, " ", res.body)
    }
}
""".replace("%d", str(listener.port)).replace("%q", '"' + smuggle.replace(
            "\r", "\\r").replace("\n", "\\n") + '"'))
        # The parent's own framing (chunked here) must not reach the
        # subrequest: with Content-Length 8 the target would read the rest
        # of the body as a second request.
        raw = (b"POST /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n"
               b"8\r\nabcdefgh\r\n0\r\n\r\n")
        out = n.raw(raw)
        assert b"200 ok" in out
        assert len(listener.received) == 1
        req = listener.received[0]
        head, _, body = req.partition(b"\r\n\r\n")
        headers = head.decode().lower()
        assert "transfer-encoding" not in headers
        assert "content-length: %d" % len(smuggle) in headers
        assert body == smuggle.encode()
        assert head.count(b"HTTP/1.") == 1
    finally:
        listener.close()


def test_parent_terminated_while_waiting(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    content_by_lua_block {
        -- ngx.exit is refused while the capture is pending (as in
        -- lua-nginx-module): the entry thread's failure is what ends
        -- the request under the waiting thread.
        ngx.thread.spawn(function()
            local res = ngx.location.capture("/sub")
            ngx.log(ngx.ERR, "capture returned after exit")
        end)
        ngx.sleep(0.05)
        error("entry fails")
    }
}
location = /sub {
    content_by_lua_block {
        ngx.sleep(0.5)
        ngx.log(ngx.NOTICE, "subrequest done")
        ngx.say("sub")
    }
}
location = /after { return 200 "alive\n"; }
""")
    # With a capture running, the connection is closed and the capture
    # ends with it (as in lua-nginx-module); nothing resumes the killed
    # thread.
    assert n.raw(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    assert n.get("/after").text == "alive\n"
    assert "subrequest done" not in n.read_log()
    assert "capture returned after exit" not in n.read_log()


def test_client_gone_while_capturing(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    content_by_lua_block {
        ngx.log(ngx.NOTICE, "capturing")
        local res = ngx.location.capture("/sleep")
        ngx.log(ngx.NOTICE, "captured ", res.status)
    }
}
location = /after { return 200 "alive\n"; }
""", log_level="notice")
    s = socket.create_connection(("127.0.0.1", n.port))
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    n.wait_log("capturing")
    s.close()
    n.wait_log("captured 200")
    assert n.get("/after").text == "alive\n"


def test_capture_errors_match_reference(nginx):
    lua = r"""
location = /t {
    content_by_lua_block {
        local calls = {
            function() return ngx.location.capture_multi({}) end,
            function() return ngx.location.capture() end,
            function() return ngx.location.capture("/ret", 3) end,
            function() return ngx.location.capture("/ret", {method = 9999}) end,
            function() return ngx.location.capture("/ret", {method = "GET"}) end,
            function() return ngx.location.capture_multi({"/ret"}) end,
            function() return ngx.location.capture("/ret", {ctx = 1}) end,
            function() return ngx.location.capture("/ret", {body = {}}) end,
            function() return ngx.location.capture("/ret", {args = true}) end,
        }
        for _, f in ipairs(calls) do
            local ok, err = pcall(f)
            ngx.say(tostring(ok), " ", tostring(err))
        end
    }
}
"""
    outs = []
    for module in ("luaguard", "reference"):
        n = nginx(server=TARGETS + lua, module=module)
        outs.append(n.get("/t").text)
    assert outs[0] == outs[1]
    assert outs[0].count("false") == 9


def test_capture_not_allowed_in_other_phases(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    header_filter_by_lua_block {
        local ok, err = pcall(ngx.location.capture, "/ret")
        ngx.header["X-Err"] = err
    }
    return 200 "x";
}
""")
    r = n.get("/t")
    assert r.header("X-Err") == \
        "API disabled in the context of header_filter_by_lua*"


def test_capture_in_rewrite_and_access(nginx):
    n = nginx(server=TARGETS + r"""
location = /t {
    rewrite_by_lua_block {
        ngx.ctx.r = ngx.location.capture("/ret").body
    }
    access_by_lua_block {
        ngx.ctx.a = ngx.location.capture("/echo", {args = "p=access"}).status
    }
    content_by_lua_block {
        ngx.print(ngx.ctx.r)
        ngx.say(ngx.ctx.a)
    }
}
""")
    assert n.get("/t").text == "created\n200\n"


# ---- ngx.on_abort ----

ABORT = r"""
location = /t {
    lua_check_client_abort %s;
    content_by_lua_block {
        local ok, err = ngx.on_abort(function()
            ngx.log(ngx.NOTICE, "on abort called")
            ngx.exit(499)
        end)
        ngx.log(ngx.NOTICE, "on_abort: ", tostring(ok), " ", tostring(err))
        local ok2, err2 = ngx.on_abort(function() end)
        ngx.log(ngx.NOTICE, "second: ", tostring(ok2), " ", tostring(err2))
        -- Fires just after the sleep below would end: once it is logged,
        -- "main handler done" would be too, had the thread survived.
        ngx.timer.at(2.05, function()
            ngx.log(ngx.NOTICE, "past the sleep")
        end)
        ngx.sleep(2)
        ngx.log(ngx.NOTICE, "main handler done")
    }
}
"""


def abort_client(n):
    s = socket.create_connection(("127.0.0.1", n.port))
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    n.wait_log(r"second: ")
    s.close()


@pytest.mark.asan_fast
def test_on_abort_runs_handler(nginx):
    n = nginx(server=ABORT % "on", log_level="info")
    abort_client(n)
    n.wait_log("on abort called")
    log = n.read_log()
    assert "on_abort: 1 nil" in log
    assert "second: nil duplicate call" in log
    assert "client prematurely closed connection" in log
    n.wait_log("past the sleep")
    assert "main handler done" not in n.read_log()


def test_on_abort_directive_off(nginx):
    n = nginx(server=ABORT % "off", log_level="notice")
    r = n.get("/t", timeout=5)
    assert r.status == 200
    log = n.read_log()
    assert "on_abort: nil lua_check_client_abort is off" in log
    assert "second: nil lua_check_client_abort is off" in log
    assert "main handler done" in log


def test_on_abort_messages_match_reference(nginx):
    lua = r"""
location = /t {
    lua_check_client_abort %s;
    content_by_lua_block {
        ngx.say(ngx.on_abort(function() end))
        ngx.say(ngx.on_abort(function() end))
    }
}
"""
    for flag in ("on", "off"):
        outs = [nginx(server=lua % flag, module=m).get("/t").text
                for m in ("luaguard", "reference")]
        assert outs[0] == outs[1], flag


@pytest.mark.parametrize("attempt", range(3))  # it used to be racy
def test_abort_without_handler_ends_request(nginx, attempt):
    n = nginx(server=r"""
location = /t {
    lua_check_client_abort on;
    log_by_lua_block { ngx.log(ngx.NOTICE, "logged status ", ngx.status) }
    content_by_lua_block {
        ngx.timer.at(2.05, function()
            ngx.log(ngx.NOTICE, "past the sleep")
        end)
        ngx.log(ngx.NOTICE, "waiting")
        ngx.sleep(2)
        ngx.log(ngx.NOTICE, "main handler done")
    }
}
""", log_level="info")
    s = socket.create_connection(("127.0.0.1", n.port))
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    n.wait_log("waiting")
    s.close()
    n.wait_log("client prematurely closed connection")
    n.wait_log("logged status 499")
    n.wait_log("past the sleep")
    assert "main handler done" not in n.read_log()


def test_on_abort_handler_may_ignore(nginx):
    n = nginx(server=r"""
location = /t {
    lua_check_client_abort on;
    content_by_lua_block {
        ngx.on_abort(function() ngx.log(ngx.NOTICE, "ignored abort") end)
        ngx.log(ngx.NOTICE, "waiting")
        ngx.sleep(0.3)
        ngx.log(ngx.NOTICE, "main handler done")
    }
}
""", log_level="notice")
    s = socket.create_connection(("127.0.0.1", n.port))
    s.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
    n.wait_log("waiting")
    s.close()
    n.wait_log("ignored abort")
    n.wait_log("main handler done")
