"""Issue 19, items 10, 12 and 13: how Lua moves a request (ngx.exit,
ngx.exec, ngx.redirect, ngx.req.set_uri, rewrite) and the URIs it sets,
run on Debian's lua-nginx-module (`module="reference"`) and on luaguard
and compared. Where the reference is unsafe, luaguard's behaviour is
asserted instead (and listed in docs/compatibility.md)."""

import re

import pytest

from test_header_integrity import Upstream

MODULES = ["luaguard", "reference"]


def both(nginx, **kw):
    return {m: nginx(module=m, **kw) for m in MODULES}


def norm(text):
    # The reference loads two modules: its nginx.conf lines are one off.
    return re.sub(r"nginx\.conf:\d+", "nginx.conf:N", text)


def no_date(raw):
    return re.sub(rb"Date: [^\r]*\r\n", b"", raw)


def get_close(n, path):
    """The raw answer to a GET that asks the server to close: read until
    the server closes, whatever it sends."""
    return no_date(n.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                         f"Connection: close\r\n\r\n".encode()))


# ---- 10. ending a request while a capture is pending ----

# The capture's subrequest runs only once the handler yields, so when the
# second thread is spawned the capture is certainly pending.
PENDING = r"""
    location /sub { content_by_lua_block { ngx.say("sub body") } }
    location /t {
        content_by_lua_block {
            local actions = {
                exit = function() ngx.exit(201) end,
                exit_ok = function() ngx.exit(ngx.OK) end,
                exec = function() ngx.exec("/other", "a=1") end,
                redirect = function() ngx.redirect("/r", 301) end,
            }
            local act = actions[ngx.var.arg_what]
            local capture = ngx.thread.spawn(function()
                local r = ngx.location.capture("/sub")
                ngx.say("captured ", r.status, " ", r.body)
            end)
            ngx.thread.spawn(function()
                local ok, err = pcall(act)
                ngx.say("protected: ", tostring(ok), " ", tostring(err))
                act()   -- aborts this thread only
                ngx.say("not reached")
            end)
            ngx.say("entry waits")
            ngx.thread.wait(capture)
            ngx.say("entry goes on")
        }
    }
    location /jump {
        rewrite_by_lua_block {
            ngx.thread.spawn(function()
                local r = ngx.location.capture("/sub")
                ngx.ctx.captured = r.status
            end)
            local ok, err = pcall(ngx.req.set_uri, "/other", true)
            ngx.ctx.refused = tostring(ok) .. " " .. tostring(err)
        }
        content_by_lua_block {
            ngx.say(ngx.ctx.refused, "; captured ", ngx.ctx.captured)
        }
    }
    location /entry {
        content_by_lua_block {
            ngx.thread.spawn(function() ngx.location.capture("/sub") end)
            ngx.exit(202)
        }
    }
    location /other { content_by_lua_block { ngx.say("other") } }
"""


@pytest.mark.parametrize("what", ["exit", "exit_ok", "exec", "redirect"])
def test_abort_with_pending_capture_is_refused(nginx, what):
    """The calling thread alone is aborted; the capture and the entry
    thread go on."""
    got, logs = {}, {}
    for m, n in both(nginx, server=PENDING).items():
        r = n.get(f"/t?what={what}")
        got[m] = (r.status, norm(r.text))
        logs[m] = n.read_log()
    assert got["luaguard"] == got["reference"], got
    status, body = got["luaguard"]
    assert status == 200, got
    assert re.search(r"protected: false content_by_lua\(nginx\.conf:N\):\d+: "
                     r"attempt to abort with pending subrequests\n", body), body
    assert "captured 200 sub body" in body and "entry goes on" in body
    assert "not reached" not in body
    for m, log in logs.items():
        assert re.search(r"lua user thread aborted: runtime error: "
                         r"content_by_lua\(nginx\.conf:\d+\):\d+: attempt "
                         r"to abort with pending subrequests", log), m


def test_set_uri_jump_with_pending_capture_is_refused(nginx):
    got = {m: n.get("/jump").text for m, n in
           both(nginx, server=PENDING).items()}
    assert got["luaguard"] == got["reference"], got
    assert got["luaguard"] == ("false attempt to abort with pending "
                               "subrequests; captured 200\n"), got


def test_entry_thread_abort_with_pending_capture_closes(nginx):
    """The entry thread's ngx.exit fails the entry thread; with a capture
    still running, the reference then closes the connection."""
    got = {m: get_close(n, "/entry") for m, n in
           both(nginx, server=PENDING).items()}
    assert got["luaguard"] == got["reference"] == b"", got


DROP = r"""
    location /content {
        content_by_lua_block {
            ngx.say("part")
            ngx.flush(true)
            ngx.exit(tonumber(ngx.var.arg_code))
        }
    }
    location /rewrite {
        rewrite_by_lua_block {
            ngx.say("part")
            ngx.flush(true)
            ngx.exit(tonumber(ngx.var.arg_code))
        }
        content_by_lua_block { ngx.say("never") }
    }
    location /thread {
        content_by_lua_block {
            ngx.say("part")
            ngx.flush(true)
            ngx.thread.spawn(function()
                ngx.exit(tonumber(ngx.var.arg_code))
            end)
        }
    }
"""


@pytest.mark.parametrize("code", [444, 408, 499, 500])
@pytest.mark.parametrize("where", ["content", "rewrite", "thread"])
def test_exit_after_output_drops_the_connection(nginx, code, where):
    """ngx.exit(444/408/499) after output: the connection is dropped at
    once (no end of the chunked body); other codes finish the response."""
    got = {m: get_close(n, f"/{where}?code={code}") for m, n in
           both(nginx, server=DROP).items()}
    assert got["luaguard"] == got["reference"], got
    assert b"\r\n\r\n5\r\npart\n\r\n" in got["luaguard"], got
    assert got["luaguard"].endswith(b"0\r\n\r\n") == (code == 500), got


# ---- 12. URIs set from Lua ----

@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


SET_URI = r"""
    location /plain {
        rewrite_by_lua_block { ngx.req.set_uri("/foo bar") }
        proxy_pass http://127.0.0.1:UP;
    }
    location /binary {
        rewrite_by_lua_block {
            ngx.req.set_uri("/foo bar?x#y%\1", false, true)
        }
        proxy_pass http://127.0.0.1:UP;
    }
    location /prefix {
        rewrite_by_lua_block { ngx.req.set_uri("/prefix/x y") }
        proxy_pass http://127.0.0.1:UP/pre/;
    }
    location /args {
        rewrite_by_lua_block {
            ngx.req.set_uri("/a%41 b")
            ngx.req.set_uri_args("q=1 2")
        }
        proxy_pass http://127.0.0.1:UP;
    }
    location /exec {
        content_by_lua_block { ngx.exec("/up/a b%41?c=d") }
    }
    location /up { proxy_pass http://127.0.0.1:UP; }
"""


@pytest.mark.parametrize("path", ["/plain", "/binary", "/prefix", "/args",
                                  "/exec"])
def test_uri_set_from_lua_is_escaped_upstream(nginx, upstream, path):
    """As after nginx's rewrite: the proxy escapes the new URI (and, after
    `break`, passes it whole whatever the location prefix)."""
    lines = {}
    for m, n in both(nginx, server=SET_URI.replace(
            "UP", str(upstream.port))).items():
        assert n.get(path).status == 200, m
        lines[m] = upstream.next_head().split(b"\r\n")[0]
    assert lines["luaguard"] == lines["reference"], lines
    assert lines["luaguard"] == {
        "/plain": b"GET /foo%20bar HTTP/1.0",
        "/binary": b"GET /foo%20bar%3Fx%23y%25%01 HTTP/1.0",
        "/prefix": b"GET /prefix/x%20y HTTP/1.0",
        "/args": b"GET /a%2541%20b?q=1%202 HTTP/1.0",
        "/exec": b"GET /up/a%20bA?c=d HTTP/1.0",
    }[path], lines


EXEC = r"""
    location /x {
        content_by_lua_block {
            local ok, err = pcall(ngx.exec, ngx.var.arg_u)
            ngx.say("refused: ", err)
        }
    }
    location /a { content_by_lua_block { ngx.say("a: ", ngx.var.uri) } }
    location /b { content_by_lua_block { ngx.say("b: ", ngx.var.uri) } }
    location / { content_by_lua_block { ngx.say("root: ", ngx.var.uri) } }
    location /int {
        internal;
        content_by_lua_block { ngx.say("internal: ", ngx.var.uri) }
    }
    location /jump {
        rewrite_by_lua_block { ngx.req.set_uri("/int", true) }
    }
"""


@pytest.mark.parametrize("target", [
    "/a/../b", "/..", "/a/..", "../b", "/a/b/..", "/a/%2e%2e/b",
    "/a/.%2E/b", "/a%00b", "/a/.", "/a/..b", "/a/%41", "/a%3Fq=1",
    "/a/..?x=1",
])
def test_exec_target_checked_as_nginx_checks_redirects(nginx, target):
    """".." segments (also quoted) and NUL are refused with nginx's
    "unsafe URI" line; a quoted path is decoded."""
    got, logs = {}, {}
    for m, n in both(nginx, server=EXEC).items():
        got[m] = n.get("/x?u=" + target.replace("%", "%25")
                       .replace("?", "%3F")).text
        logs[m] = re.findall(r'unsafe URI "[^"]*" was detected',
                             n.read_log())
    assert got["luaguard"] == got["reference"], got
    assert logs["luaguard"] == logs["reference"], logs
    assert (got["luaguard"] == "refused: unsafe uri\n") == bool(
        logs["luaguard"]), got


def test_jump_reaches_an_internal_location(nginx):
    got = {m: n.get("/jump").text for m, n in
           both(nginx, server=EXEC).items()}
    assert got["luaguard"] == got["reference"] == "internal: /int\n", got


CRLF_URI = r"""
    location /binary {
        rewrite_by_lua_block {
            ngx.req.set_uri("/x\r\nX-Injected: 1", false, true)
        }
        add_header X-U $uri;
        content_by_lua_block { ngx.say("ok") }
    }
    location /exec {
        content_by_lua_block { ngx.exec("/x%0D%0AX-Injected:%201") }
    }
    location /capture {
        content_by_lua_block {
            local ok, err = pcall(ngx.location.capture,
                                  "/x%0D%0AX-Injected:%201")
            ngx.say(ok and "captured" or err)
        }
    }
    location /x {
        add_header X-U $uri;
        content_by_lua_block { ngx.say("at x") }
    }
"""


def test_crlf_in_a_uri_from_lua_is_refused(nginx):
    """Deliberate difference (docs/compatibility.md): CR and LF, raw in a
    binary set_uri or decoded from %0D%0A by ngx.exec and captures, would
    be $uri, and add_header would split the response. The reference lets
    them through; luaguard refuses the call."""
    ref = nginx(module="reference", server=CRLF_URI)
    for path in ("/binary", "/exec"):
        assert b"\r\nX-Injected: 1" in ref.raw(
            f"GET {path} HTTP/1.0\r\n\r\n".encode()), path
    n = nginx(server=CRLF_URI)
    for path in ("/binary", "/exec"):
        raw = n.raw(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        assert raw.startswith(b"HTTP/1.1 500 "), raw
        assert b"\r\nX-Injected" not in raw, raw
    n.wait_log(r'unsafe byte "0x0d" in uri "/x\\x0D\\x0AX-Injected: 1"')
    n.wait_log(r'unsafe uri "/x%0D%0AX-Injected:%201" arg to ngx\.exec')
    assert n.get("/capture").text == \
        "unsafe uri in argument #1: /x%0D%0AX-Injected:%201\n"


# ---- 13. rewrite and rewrite_by_lua ----

REWRITE = r"""
    location /old {
        rewrite ^ /new last;
        rewrite_by_lua_block { ngx.log(ngx.ERR, "ran: old") }
        content_by_lua_block { ngx.say("old content") }
    }
    location /new {
        rewrite_by_lua_block {
            ngx.log(ngx.ERR, "ran: new ctx=", tostring(ngx.ctx.x))
            ngx.ctx.x = "new"
        }
        content_by_lua_block { ngx.say("new ", ngx.ctx.x, " ", ngx.var.uri) }
    }
    location /jump {
        rewrite_by_lua_block {
            ngx.ctx.x = "jump"
            if ngx.var.arg_wait then ngx.sleep(0.001) end
            if ngx.var.arg_thread then
                ngx.thread.spawn(function()
                    ngx.req.set_uri("/target", true)
                end)
            else
                ngx.req.set_uri("/target", true)
            end
            ngx.log(ngx.ERR, "ran: after the jump")
        }
        content_by_lua_block { ngx.say("jump content") }
    }
    location /target {
        rewrite_by_lua_block {
            ngx.log(ngx.ERR, "ran: target ctx=", tostring(ngx.ctx.x))
            ngx.ctx.y = "t"
        }
        access_by_lua_block {
            ngx.log(ngx.ERR, "ran: target access ctx=", tostring(ngx.ctx.x),
                    " ", tostring(ngx.ctx.y))
        }
        content_by_lua_block {
            ngx.say("target ", tostring(ngx.ctx.x), " ", ngx.ctx.y)
        }
    }
    location /self {
        rewrite_by_lua_block {
            ngx.log(ngx.ERR, "ran: self")
            ngx.req.set_uri("/self", true)
        }
        content_by_lua_block { ngx.say("self content") }
    }
"""


@pytest.mark.parametrize("path", ["/old", "/jump", "/jump?wait=1",
                                  "/jump?thread=1", "/self"])
def test_rewrite_by_lua_follows_the_location(nginx, path):
    """`rewrite ... last` moves the request before rewrite_by_lua runs;
    after ngx.req.set_uri(uri, true) the new location's rewrite_by_lua
    runs with an empty ngx.ctx (a self-loop ends in nginx's cycle
    error)."""
    got = {}
    for m, n in both(nginx, server=REWRITE).items():
        r = n.get(path)
        got[m] = (r.status, r.text if r.status == 200 else "",
                  re.findall(r"ran: [^,]*|rewrite or internal redirection "
                             r"cycle", n.read_log()))
    assert got["luaguard"] == got["reference"], got
    assert got["luaguard"] == {
        "/old": (200, "new new /new\n", ["ran: new ctx=nil"]),
        "/jump": (200, "target nil t\n", [
            "ran: target ctx=nil", "ran: target access ctx=nil t"]),
        "/jump?wait=1": (200, "target nil t\n", [
            "ran: target ctx=nil", "ran: target access ctx=nil t"]),
        "/jump?thread=1": (200, "target nil t\n", [
            "ran: target ctx=nil", "ran: target access ctx=nil t"]),
        "/self": (500, "", ["ran: self"] * 11
                  + ["rewrite or internal redirection cycle"]),
    }[path], got
