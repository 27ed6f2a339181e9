"""ngx.say / ngx.print with the argument shapes their fast path (a few
scalars, each measured once) and their general path (tables, many
arguments) take, and the keys of ngx's computed fields, run on Debian's
lua-nginx-module (`module="reference"`) and on luaguard and compared."""

import io
import socket
import threading

import pytest

from harness import TcpServer, read_chunked_response

MODULES = ["luaguard", "reference"]

SAY = r"""
    location = /scalars {
        content_by_lua_block {
            ngx.say(-0, " ", 0, " ", 1.5, " ", 2^53, " ", 1e300, " ", -7)
            ngx.say(99999999999999, " ", -99999999999999, " ", 1e14, " ",
                    -1e14, " ", 123456789012, " ", 0.5, " ", -3)
            ngx.print(1, 2, 3, 4, 5, 6, 7, 8, 9, -0, 1e14, 12.25, "\n")
            ngx.say(true, false, nil, ngx.null)
            ngx.print("a", 1, "b", 2, "c", 3, "d", "\n")
            ngx.say("1", "2", "3", "4", "5", "6", "7", "8")
            ngx.say("1", "2", "3", "4", "5", "6", "7", "8", "9", -0, 10)
            ngx.say()
            ngx.print("")
            ngx.say("", "", "")
        }
    }
    location = /tables {
        content_by_lua_block {
            ngx.say({"a", {"b", -0, true, {ngx.null, false}}, 3})
            ngx.print("x", {"y", 1}, 2, nil, {}, "\n")
            ngx.say({}, "after empty")
            local t = {}
            for i = 1, 20 do t[i] = i end
            ngx.say("9+", 1, 2, 3, 4, 5, 6, 7, 8, t)
        }
    }
    location = /errors {
        content_by_lua_block {
            local function try(...)
                local ok, err = pcall(...)
                ngx.say(tostring(ok), " ", tostring(err))
            end
            try(ngx.say, "a", print)
            try(ngx.say, "a", "b", "c", "d", "e", "f", "g", "h", "i", print)
            try(ngx.print, {a = 1})
            try(ngx.say, "ok", {1, print})
            try(ngx.say, 1, {1, {2, {}}}, coroutine.create(function() end))
        }
    }
"""


@pytest.mark.parametrize("path", ["/scalars", "/tables", "/errors"])
def test_say_print_shapes_match_reference(nginx, path):
    got = {m: nginx(module=m, server=SAY).get(path) for m in MODULES}
    assert got["luaguard"].status == got["reference"].status == 200, got
    assert got["luaguard"].body == got["reference"].body, got


NGX_KEYS = r"""
    location = /keys {
        content_by_lua_block {
            ngx.ctx.v = "c"
            ngx.say(type(ngx["ctx\0x"]), " ", type(ngx["ct"]), " ",
                    type(ngx["ctxx"]), " ", type(ngx[1]), " ",
                    ngx.ctx.v, " ", ngx.status, " ", tostring(ngx.headers_sent),
                    " ", tostring(ngx.is_subrequest))
        }
    }
"""


def test_ngx_computed_keys_match_reference(nginx):
    got = {m: nginx(module=m, server=NGX_KEYS).get("/keys") for m in MODULES}
    assert got["luaguard"].body == got["reference"].body, got
    assert got["luaguard"].text == "nil nil nil nil c 0 false false\n"


FRESH = r"""
    location = /fresh {
        rewrite_by_lua_block {
            local c = ngx.ctx
            c.seen = (c.seen or 0) + 1
            if ngx.var.arg_swap then
                ngx.ctx = { seen = c.seen, swapped = true }
            end
        }
        content_by_lua_block {
            local c = ngx.ctx
            c.seen = c.seen + 1
            ngx.say(c.seen, " ", tostring(c.swapped))
        }
    }
"""


def test_ctx_tables_are_fresh_per_request(nginx):
    """ngx.ctx tables live in registry slots that are reused from one
    request to the next: each request still starts with an empty one,
    whether the previous one kept its table or assigned a new one."""
    got = {}
    for m in MODULES:
        n = nginx(module=m, server=FRESH)
        got[m] = [n.get("/fresh" + ("?swap=1" if i % 3 == 0 else "")).text
                  for i in range(12)]
    assert got["luaguard"] == got["reference"], got
    assert got["luaguard"][0] == "2 true\n"
    assert got["luaguard"][1] == "2 nil\n"


def test_varargs_at_the_top_of_a_handler_match_reference(nginx):
    """Handlers are compiled as functions of no arguments (LuaJIT compiles
    those, not vararg ones); code that uses `...` at its top, legal in
    lua-nginx-module, is compiled as a vararg function instead."""
    server = """
        location = /va {
            content_by_lua_block {
                local t = { ... }
                ngx.say(select("#", ...), " ", #t, " ", tostring((...)))
            }
        }
        location = /plain { content_by_lua_block { ngx.say("plain") } }
"""
    out = {}
    for m in ("luaguard", "reference"):
        n = nginx(module=m, server=server)
        out[m] = (n.get("/va").text, n.get("/plain").text)
    assert out["luaguard"] == out["reference"] == ("0 0 nil\n", "plain\n")


# luaguard holds ngx.say/print output (one pass through nginx's body
# filters for many calls) until postpone_output bytes wait, a flush, the
# response's end or a wait of the thread: where that could show, it must
# not.

class Gate(TcpServer):
    """Answers "go" to each connection once the test opens the gate: the
    handler waits on it while the client checks what already arrived."""

    def __init__(self):
        self.open = threading.Event()
        super().__init__()

    def serve(self, conn):
        with conn:
            if self.open.wait(10):
                conn.sendall(b"go\n")


STREAM = r"""
    location = /big {
        content_by_lua_block {
            ngx.print(string.rep("a", 2000))
            local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", GATE))
            ngx.print(assert(sock:receive()))
        }
    }
    location = /flushed {
        content_by_lua_block {
            ngx.print(string.rep("b", 100))
            ngx.flush()
            local sock = ngx.socket.tcp()
            assert(sock:connect("127.0.0.1", GATE))
            ngx.print(assert(sock:receive()))
        }
    }
"""


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("path", ["/big", "/flushed"])
def test_output_past_postpone_or_flushed_reaches_client_while_lua_waits(
        nginx, module, path):
    """What nginx's write filter sends at once (postpone_output bytes, a
    flush) the client has while the handler still waits: the handler
    waits until the client saw it (a socket timeout fails the test)."""
    first = {"/big": b"a" * 2000, "/flushed": b"b" * 100}[path]
    gate = Gate()
    try:
        n = nginx(module=module,
                  server=STREAM.replace("GATE", str(gate.port)))
        with socket.create_connection(("127.0.0.1", n.port), 10) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                      "Connection: close\r\n\r\n".encode())
            got = b""
            while first not in got:
                b = s.recv(65536)
                assert b, got
                got += b
            gate.open.set()
            while b := s.recv(65536):
                got += b
        body = read_chunked_response(io.BytesIO(got))
        assert body == first + b"go"
    finally:
        gate.close()


FRAMED = r"""
    location = /two {
        postpone_output 0;
        content_by_lua_block { ngx.say("a") ngx.print("bc") }
    }
    location = /filtered {
        content_by_lua_block { ngx.say("a") ngx.say("b") ngx.print("c") }
        body_filter_by_lua_block {
            ngx.arg[1] = "[" .. ngx.arg[1] .. (ngx.arg[2] and "|eof" or "")
                         .. "]"
        }
    }
    location = /kid { content_by_lua_block { ngx.say("x") ngx.print("y") } }
    location = /capture {
        content_by_lua_block {
            local res = ngx.location.capture("/kid")
            ngx.print(res.body, "|", res.truncated and "cut" or "whole")
        }
    }
"""


@pytest.mark.parametrize("path", ["/two", "/filtered", "/capture"])
def test_held_output_framing_matches_reference(nginx, path):
    """postpone_output 0 sends each call on its own, chunk for chunk as
    lua-nginx-module does; body_filter_by_lua sees each call's output on
    its own and the end apart; a capture gets the whole body."""
    got = {}
    for m in MODULES:
        n = nginx(module=m, server=FRAMED)
        raw = n.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                    "Connection: close\r\n\r\n".encode())
        got[m] = raw.partition(b"\r\n\r\n")[2]
    assert got["luaguard"] == got["reference"], got
    assert got["luaguard"].endswith(b"0\r\n\r\n"), got



def head_and_body(raw):
    """A raw response's header lines and its body, a chunked one read by
    its content (its chunk boundaries are not compared)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    if body and b"transfer-encoding: chunked" in head.lower():
        body = read_chunked_response(io.BytesIO(raw))
    return head.split(b"\r\n"), body


ENDINGS = r"""
    location = /kid_error { content_by_lua_block {
        ngx.say("partial") error("boom") } }
    location = /kid_exit_error { content_by_lua_block {
        ngx.say("partial") ngx.exit(ngx.ERROR) } }
    location = /kid_exit_444 { content_by_lua_block {
        ngx.say("partial") ngx.exit(444) } }
    location = /kid_exit_444_quiet { content_by_lua_block {
        ngx.exit(444) } }
    location = /kid_exit_408 { content_by_lua_block {
        ngx.say("partial") ngx.exit(408) } }
    location = /kid_exit_ok { content_by_lua_block {
        ngx.say("partial") ngx.exit(ngx.OK) } }
    location = /kid_exit_200 { content_by_lua_block {
        ngx.say("partial") ngx.exit(200) } }
    location = /kid_eof { content_by_lua_block {
        ngx.say("partial") ngx.eof() ngx.say("late") } }
    location = /capture {
        content_by_lua_block {
            local res = ngx.location.capture("/kid_" .. ngx.var.arg_kid)
            ngx.say(res.status, " ", (res.body:gsub("\n", "|")), " ",
                    tostring(res.truncated))
        }
    }
"""

KIDS = ["error", "exit_error", "exit_444", "exit_444_quiet", "exit_408",
        "exit_ok", "exit_200", "eof"]


@pytest.mark.parametrize("kid", KIDS)
@pytest.mark.parametrize("how", ["direct", "captured"])
def test_output_then_abrupt_end_matches_reference(nginx, how, kid):
    """Output followed by an error or an ngx.exit: what the client (or a
    capture) gets of the held output is what lua-nginx-module sends. A
    captured location that errs keeps what it wrote (truncated); one
    that asks to drop the connection (444, 408) drops the client's."""
    path = f"/kid_{kid}" if how == "direct" else f"/capture?kid={kid}"
    got = {}
    for m in MODULES:
        n = nginx(module=m, server=ENDINGS)
        raw = n.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                    "Connection: close\r\n\r\n".encode())
        lines, body = head_and_body(raw)
        got[m] = (lines[0], body)
    assert got["luaguard"] == got["reference"], got


ORDER = r"""
    location = /threads {
        content_by_lua_block {
            ngx.say("a")
            local t = ngx.thread.spawn(function()
                ngx.say("b") ngx.sleep(0) ngx.say("d") end)
            ngx.say("c")
            ngx.thread.wait(t)
            ngx.say("e")
        }
    }
    location = /thread_exit {
        content_by_lua_block {
            ngx.say("a")
            ngx.thread.spawn(function() ngx.say("b") ngx.exit(200) end)
            ngx.sleep(0)
            ngx.say("never")
        }
    }
    location = /body {
        content_by_lua_block {
            ngx.say("before")
            ngx.req.read_body()
            ngx.say("got ", ngx.req.get_body_data())
        }
    }
    location = /big {
        content_by_lua_block {
            for i = 1, 3 do ngx.print(string.rep(string.char(96 + i), 70000)) end
            ngx.say("end")
        }
    }
"""


@pytest.mark.parametrize("path,method,version", [
    ("/threads", "GET", "1.1"), ("/thread_exit", "GET", "1.1"),
    ("/body", "POST", "1.1"), ("/big", "GET", "1.1"),
    ("/threads", "GET", "1.0"), ("/big", "GET", "1.0"),
    ("/threads", "HEAD", "1.1")])
def test_held_output_order_matches_reference(nginx, path, method, version):
    """Output of several threads, around waits and of more than
    postpone_output bytes, over HTTP/1.1 (chunked), HTTP/1.0 (buffered
    with a length) and HEAD: the same body, in the same order, as
    lua-nginx-module."""
    got = {}
    for m in MODULES:
        n = nginx(module=m, server=ORDER)
        body = b"hello" if method == "POST" else b""
        req = (f"{method} {path} HTTP/{version}\r\nHost: x\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
               ).encode() + body
        raw = n.raw(req)
        lines, rest = head_and_body(raw)
        keep = sorted(h.lower() for h in lines[1:]
                      if not h.lower().startswith((b"date:", b"server:")))
        got[m] = (lines[0], keep, rest)
    assert got["luaguard"] == got["reference"], got
