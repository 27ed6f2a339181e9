"""Header integrity: Lua data never becomes a header line or a request
line of its own, at any sink where it turns into protocol text. Request
sinks are checked on the bytes a real upstream (a loopback server in the
test) received through proxy_pass; response sinks on the raw bytes the
client received. Where lua-nginx-module is already safe (header names and
values, ngx.redirect) the answers are compared with it byte for byte."""

import queue
import re

import pytest

from harness import TcpServer


class Upstream(TcpServer):
    """A loopback HTTP server that records the raw head of every request
    it receives and answers 200 "ok"."""

    threaded = False

    def __init__(self):
        self.heads = queue.Queue()
        super().__init__()

    def serve(self, c):
        with c:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = c.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.heads.put(data.split(b"\r\n\r\n")[0])
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def next_head(self):
        return self.heads.get(timeout=10)


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


INJ = r"\r\nInjected: 1 x"   # Lua string text: CR LF, a header, a space

# Each sink ends in a proxied request to the recording upstream.
REQUEST_SINKS = {
    "set_header_name": f"""
        rewrite_by_lua_block {{ ngx.req.set_header("X-N{INJ}", "v") }}
        proxy_pass http://127.0.0.1:UP;""",
    "set_header_value": f"""
        rewrite_by_lua_block {{ ngx.req.set_header("X-V", "v{INJ}") }}
        proxy_pass http://127.0.0.1:UP;""",
    "set_header_array": f"""
        rewrite_by_lua_block {{
            ngx.req.set_header("X-M", {{"1{INJ}", "2"}}) }}
        proxy_pass http://127.0.0.1:UP;""",
    "exec_uri_query": f"""
        content_by_lua_block {{ ngx.exec("/up?a=1{INJ}") }}""",
    "exec_args_string": f"""
        content_by_lua_block {{ ngx.exec("/up", "a=1{INJ}") }}""",
    "exec_args_table": f"""
        content_by_lua_block {{ ngx.exec("/up", {{a = "1{INJ}"}}) }}""",
    "set_uri_args": f"""
        rewrite_by_lua_block {{ ngx.req.set_uri_args("a=1{INJ}") }}
        proxy_pass http://127.0.0.1:UP;""",
    "var_args": f"""
        rewrite_by_lua_block {{ ngx.var.args = "a=1{INJ}" }}
        proxy_pass http://127.0.0.1:UP;""",
    "var_written": f"""
        set $v "";
        rewrite_by_lua_block {{ ngx.var.v = "a{INJ}" }}
        proxy_pass http://127.0.0.1:UP;
        proxy_set_header X-V $v;""",
    "set_by_lua": f"""
        set_by_lua_block $v {{ return "b{INJ}" }}
        proxy_pass http://127.0.0.1:UP;
        proxy_set_header X-V $v;""",
    "capture_args": f"""
        content_by_lua_block {{
            local r = ngx.location.capture("/up", {{args = "a=1{INJ}"}})
            ngx.say(r.status) }}""",
    "capture_uri_query": f"""
        content_by_lua_block {{
            local r = ngx.location.capture("/up?q=1{INJ}")
            ngx.say(r.status) }}""",
    "capture_multi_args": f"""
        content_by_lua_block {{
            local r = ngx.location.capture_multi({{
                {{"/up", {{args = "a=1{INJ}"}}}} }})
            ngx.say(r.status) }}""",
    "capture_vars": f"""
        content_by_lua_block {{
            local r = ngx.location.capture("/up", {{vars = {{v = "c{INJ}"}}}})
            ngx.say(r.status) }}""",
}


def request_server(port):
    locs = "\n".join(f"location /{name} {{ {body} }}"
                     for name, body in REQUEST_SINKS.items())
    return (locs + """
        location /up {
            proxy_pass http://127.0.0.1:UP;
            proxy_set_header X-V $v;
        }
    """).replace("UP", str(port))


def assert_one_line_each(head):
    """The head is a request line and header lines: the injected text is
    there, escaped, and starts nothing."""
    lines = head.split(b"\r\n")
    assert re.fullmatch(rb"GET [^ ]+ HTTP/1\.[01]", lines[0]), head
    for ln in lines:
        assert b"\r" not in ln and b"\n" not in ln, head
        assert not ln.startswith(b"Injected"), head
        assert b" HTTP/1." not in ln[:-9], head
    assert b"%0D%0AInjected" in head, head


# What the upstream gets where the exact spelling matters.
EXPECTED = {
    # A name is a token: ':' and space encoded too (as lua-nginx-module).
    "set_header_name": b"\r\nX-N%0D%0AInjected%3A%201%20x: v\r\n",
    "set_header_value": b"\r\nX-V: v%0D%0AInjected: 1 x",
    # A query string is escaped as set_uri_args escapes one.
    "exec_args_string": b"GET /up?a=1%0D%0AInjected:%201%20x HTTP/1.0\r\n",
    "var_written": b"\r\nX-V: a%0D%0AInjected: 1 x\r\n",
}


@pytest.mark.asan_fast
@pytest.mark.parametrize("sink", sorted(REQUEST_SINKS))
def test_crlf_never_reaches_the_upstream(nginx, upstream, sink):
    n = nginx(server=request_server(upstream.port))
    r = n.get("/" + sink)
    assert r.status == 200, n.read_log()
    head = upstream.next_head()
    assert_one_line_each(head)
    assert EXPECTED.get(sink, b"") in head + b"\r\n", head


RESPONSE_SERVER = f"""
    location /header_name {{ content_by_lua_block {{
        ngx.header["X-N{INJ}"] = "v"
        ngx.header["Set-Cookie: session=evil; x"] = "1"
        ngx.say("ok") }} }}
    location /header_value {{ content_by_lua_block {{
        ngx.header["X-V"] = "v{INJ}"
        ngx.header["X-M"] = {{"1{INJ}", "2"}}
        ngx.say("ok") }} }}
    location /add_header_var {{
        set $v "";
        rewrite_by_lua_block {{ ngx.var.v = "a{INJ}" }}
        add_header X-V $v;
        content_by_lua_block {{ ngx.say("ok") }}
    }}
    location /add_header_set_by_lua {{
        set_by_lua_block $w {{ return "b{INJ}" }}
        add_header X-V $w;
        content_by_lua_block {{ ngx.say("ok") }}
    }}
"""


def response_head(n, path):
    raw = n.raw(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    return raw.split(b"\r\n\r\n")[0]


@pytest.mark.asan_fast
@pytest.mark.parametrize("path", ["/header_name", "/header_value",
                                  "/add_header_var", "/add_header_set_by_lua"])
def test_crlf_never_splits_a_response_header(nginx, path):
    n = nginx(server=RESPONSE_SERVER)
    head = response_head(n, path)
    assert head.startswith(b"HTTP/1.1 200 "), head
    lines = head.split(b"\r\n")
    for ln in lines:
        assert b"\n" not in ln and b"\r" not in ln, head
        assert not ln.startswith(b"Injected"), head
        assert not ln.lower().startswith(b"set-cookie:"), head
    assert b"%0D%0AInjected" in head, head


def test_header_name_is_a_token(nginx):
    """A name cannot carry a ':' and so cannot smuggle a header the
    client honours: every non-token byte is percent-encoded."""
    n = nginx(server=RESPONSE_SERVER)
    r = n.get("/header_name")
    assert r.header("Set-Cookie") is None
    assert r.header("Set-Cookie%3A%20session%3Devil%3B%20x") == "1"


NAME_TABLE = r"""
    location /bytes { content_by_lua_block {
        for b = 0, 255 do
            -- (A-Z and _ would name an existing header again: skipped)
            local c = string.char(b)
            if not c:match("[A-Z_]") then
                ngx.header["a" .. c .. "b"] = string.format("n%02x", b)
            end
            ngx.header[string.format("v%02x", b)] = "a" .. c .. "b"
        end
        ngx.say("ok")
    } }
    location /req { rewrite_by_lua_block {
        for b = 0, 255 do
            local c = string.char(b)
            if not c:match("[A-Z_]") then
                ngx.req.set_header("a" .. c .. "b", string.format("n%02x", b))
            end
            ngx.req.set_header(string.format("v%02x", b),
                               "a" .. string.char(b) .. "b")
        end
    }
    proxy_pass http://127.0.0.1:UP; }
"""


def test_header_bytes_match_the_reference(nginx, upstream):
    """Every byte in a name and in a value, through ngx.header and
    ngx.req.set_header: ours and lua-nginx-module send the same head."""
    heads = {}
    for module in ("luaguard", "reference"):
        n = nginx(server=NAME_TABLE.replace("UP", str(upstream.port)),
                  module=module)
        head = response_head(n, "/bytes")
        heads[module] = re.sub(rb"\r\nDate: [^\r]*", b"", head)
        assert n.get("/req").status == 200
        heads[module + " upstream"] = upstream.next_head()
    assert heads["luaguard"] == heads["reference"]
    assert heads["luaguard upstream"] == heads["reference upstream"]
    # And what they agree on is safe: no byte outside a token in a name,
    # no control byte but TAB in a value.
    for head in (heads["luaguard"], heads["luaguard upstream"]):
        for ln in head.split(b"\r\n")[1:]:
            name, value = ln.split(b": ", 1)
            assert re.fullmatch(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name), ln
            assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", value), ln


REDIRECTS = {
    "crlf": r"/x\r\nSet-Cookie: a=1",
    "lf": r"/x\ny",
    "nul": r"/x\0y",
    "ctl": r"/x\1y",
    "del": r"/x\127y",
    "tab": r"/x\ty",
    "space": r"/x y",
    "high": r"/x\200y",
}


def test_redirect_matches_the_reference(nginx):
    """A control byte in the target is refused with lua-nginx-module's
    error and a 500; TAB, space and high bytes pass as there."""
    server = "\n".join(
        f'location /{k} {{ content_by_lua_block {{ ngx.redirect("{v}") }} }}'
        for k, v in REDIRECTS.items())
    seen = {}
    for module in ("luaguard", "reference"):
        n = nginx(server=server, module=module)
        out = {}
        for k in REDIRECTS:
            head = response_head(n, "/" + k)
            loc = [ln for ln in head.split(b"\r\n")
                   if ln.lower().startswith(b"location:")]
            out[k] = (head.split(b"\r\n")[0], loc)
        log = n.read_log()
        out["errors"] = re.findall(r'unsafe byte "0x[0-9a-f]+" in redirect '
                                   r'uri "[^"]*"', log)
        seen[module] = out
    assert seen["luaguard"] == seen["reference"]
    ours = seen["luaguard"]
    for k in ("crlf", "lf", "nul", "ctl", "del"):
        assert ours[k] == (b"HTTP/1.1 500 Internal Server Error", []), k
    assert len(ours["errors"]) == 5
    for k in ("tab", "space", "high"):
        assert ours[k][0] == b"HTTP/1.1 302 Moved Temporarily", k


STATUS_SERVER = r"""
    location /set { content_by_lua_block {
        ngx.status = tonumber(ngx.var.arg_s)
        ngx.header["X-Evil"] = "1"
        ngx.print("HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\n\r\n")
    } }
    location /filter {
        return 200 "body";
        header_filter_by_lua_block { ngx.status = tonumber(ngx.var.arg_s) }
    }
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("status", [100, 101, 103, 199])
def test_interim_status_is_not_a_final_response(nginx, status):
    """A 1xx final status would make a client skip it and read the body as
    the real response: refused (the reference sends it)."""
    n = nginx(server=STATUS_SERVER)
    for path in (f"/set?s={status}", f"/filter?s={status}"):
        head = response_head(n, path)
        assert head.startswith(b"HTTP/1.1 500 "), (path, head)
    n.wait_log(rf"invalid HTTP status code {status} \(a 1xx status is not "
               r"a final response\)")


def test_101_answers_an_upgrade_request(nginx):
    """101 is the answer to a request that asked to switch protocols
    (lua-resty-websocket's handshake sets it): allowed there, on HTTP/1.1
    only, as the reference does; without an Upgrade header it stays
    refused (test above)."""
    n = nginx(server=STATUS_SERVER)
    up = b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    head = n.raw(b"GET /set?s=101 HTTP/1.1\r\nHost: x\r\n" + up
                 + b"\r\n", read_until_close=False)
    assert head.startswith(b"HTTP/1.1 101 \r\n"), head   # nginx has no reason text
    head = n.raw(b"GET /set?s=101 HTTP/1.0\r\nHost: x\r\n" + up + b"\r\n")
    assert head.startswith(b"HTTP/1.1 500 "), head


@pytest.mark.parametrize("status", [200, 204, 404, 599, 600, 999])
def test_final_statuses_still_accepted(nginx, status):
    n = nginx(server=STATUS_SERVER)
    head = response_head(n, f"/set?s={status}")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head


def test_exec_path_with_crlf_is_refused(nginx, upstream):
    """The path of ngx.exec becomes $uri: CR, LF (and NUL) refuse the
    call; other bytes go on and nginx escapes them when it proxies."""
    n = nginx(server=f"""
        location /up {{ proxy_pass http://127.0.0.1:{upstream.port}; }}
        location /crlf {{ content_by_lua_block {{
            ngx.exec("/up{INJ}") }} }}
        location /ctl {{ content_by_lua_block {{
            ngx.exec("/up\\1x y\\tz") }} }}
    """)
    assert n.get("/crlf").status == 500
    n.wait_log(r'unsafe uri "/up\\r\\nInjected: 1 x" arg to ngx.exec')
    assert n.get("/ctl").status == 200
    assert upstream.next_head().startswith(b"GET /up%01x%20y%09z HTTP/1.0")
    assert upstream.heads.empty()
