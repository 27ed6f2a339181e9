"""ngx.req.* and ngx.resp.get_headers: headers, URI args, the body in
memory and in files, header integrity and request smuggling regressions.
Many run the same Lua against lua-nginx-module and compare."""

import io
import re
import socket
import time

import pytest

from harness import read_chunked_response

P = r"""
local function p(...)
    local t = {}
    for i = 1, select("#", ...) do
        local v = (select(i, ...))
        t[i] = type(v) == "table" and "[" .. table.concat(v, ",") .. "]"
               or tostring(v)
    end
    ngx.say(table.concat(t, " | "))
end
local function dump(t)
    local ks = {}
    for k, v in pairs(t) do
        local s
        if type(v) == "table" then
            local o = {}
            for i, x in ipairs(v) do o[i] = tostring(x) end
            s = "[" .. table.concat(o, ",") .. "]"
        else
            s = tostring(v)
        end
        ks[#ks + 1] = tostring(k) .. "=" .. s
    end
    table.sort(ks)
    return table.concat(ks, ";")
end
"""


def lua_server(lua, extra="", loc_extra=""):
    return (extra + "\nlocation /t {\n" + loc_extra
            + "\ncontent_by_lua_block {\n" + P + lua + "\n} }\n")


def both(nginx, server, send):
    """Runs `send(n)` against luaguard and the reference; returns both."""
    out = []
    for module in ("luaguard", "reference"):
        n = nginx(server=server, module=module, main="user root;")
        out.append(send(n))
    return out


def port_free(text):
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)


READ_LUA = r"""
p(ngx.req.get_method(), ngx.req.http_version(), ngx.req.is_internal())
local h, e = ngx.req.get_headers()
p(dump(h), e, h.x_foo, h["X-FOO"], h.X_Foo, h["x-foo"])
local h, e = ngx.req.get_headers(2) p(dump(h), e)
local h, e = ngx.req.get_headers(0, true) p(dump(h), e, h.x_foo)
local a, e = ngx.req.get_uri_args() p(dump(a), e)
local a, e = ngx.req.get_uri_args(2) p(dump(a), e)
local a, e = ngx.req.get_uri_args(0) p(dump(a), e)
ngx.print(ngx.req.raw_header())
ngx.print(ngx.req.raw_header(true))
p(pcall(ngx.req.set_method, 12345))
p(pcall(ngx.req.set_method, "GET"))
ngx.req.set_method(ngx.HTTP_POST) p(ngx.req.get_method())
p(pcall(ngx.req.set_uri, ""))
p(pcall(ngx.req.set_uri, "/a", true))
p(pcall(ngx.req.set_uri, "/a\r\nX: y"))
p(pcall(ngx.req.set_uri, "/a\0b"))
p(pcall(ngx.req.set_uri, "/a b\t\255"), ngx.var.uri)
p(pcall(ngx.req.set_uri, "/a\1", false, true))  -- CR: test_compat_uri
p(pcall(ngx.req.set_uri_args, "a=\r\nb c#\0"), ngx.var.args)
p(pcall(ngx.req.set_uri_args, {a = "\r\n"}), ngx.var.args)
p(pcall(ngx.req.set_uri_args, {a = {1, true, false}}), ngx.var.args)
p(pcall(ngx.req.set_uri_args, 12), ngx.var.args)
p(pcall(ngx.req.set_header, "X-A\r\nB", "v\r\nZ: 1"))
p(ngx.req.get_headers()["x-a%0d%0ab"])
p(pcall(ngx.req.set_header, "X-B", {"1", "2\n"}), dump(ngx.req.get_headers()))
p(pcall(ngx.req.set_header, "X-B", ""), ngx.req.get_headers()["x-b"])
p(pcall(ngx.req.set_header, "X-C", true), ngx.var.http_x_c)
p(pcall(ngx.req.set_header, nil, "x"))
p(pcall(ngx.req.set_header, "Host", "h.example"), ngx.var.host, ngx.var.http_host)
p(pcall(ngx.req.set_header, "User-Agent", "UA"), ngx.var.http_user_agent)
p(pcall(ngx.req.clear_header, "User-Agent"), ngx.var.http_user_agent)
p(pcall(ngx.req.set_header, "Cookie", {"a=1", "b=2"}), ngx.var.cookie_a, ngx.var.cookie_b)
p(pcall(ngx.req.clear_header, "x-foo"), ngx.var.http_x_foo, ngx.req.get_headers()["x-foo"])
p(ngx.req.get_body_data(), ngx.req.get_body_file())
p(pcall(ngx.req.get_post_args))
p(pcall(ngx.req.set_body_data, "x"))
p(pcall(ngx.req.init_body))
p(pcall(ngx.req.append_body, "x"))
p(pcall(ngx.req.finish_body))
ngx.header["X-R"] = {"1", "2"}
local h = ngx.resp.get_headers() p(dump(h), h.x_r and #h.x_r)
local h, e = ngx.resp.get_headers(1) p(e)
"""


@pytest.mark.asan_fast
def test_request_api_matches_reference(nginx):
    def send(n):
        r = n.get("/t?b=1&a=2&a=3&c&d=&%41=%20&e=%zz&f=%00",
                  headers={"X-Foo": "one", "x-foo": "two", "Cookie": "c=3"})
        assert r.status == 200, n.read_log()
        return port_free(r.text)
    ours, ref = both(nginx, lua_server(READ_LUA), send)
    assert ours == ref
    assert "truncated" in ours


MANY_LUA = r"""
local h, e = ngx.req.get_headers(0) p(dump(h), e)
local h, e = ngx.req.get_headers(250, true) p(dump(h), e)
local a, e = ngx.req.get_uri_args(0) p(dump(a), e)
local a, e = ngx.req.get_uri_args(260) p(dump(a), e)
p(dump(ngx.decode_args("k=1&K=2&k&k=&k=3", 0)))
ngx.header["X-Many"] = {"1", "2", "3"}
for i = 1, 120 do ngx.header["X-R" .. i] = i end
local h, e = ngx.resp.get_headers(0) p(dump(h), e)
local h, e = ngx.resp.get_headers(0, true) p(dump(h), e)
"""


@pytest.mark.asan_fast
def test_many_repeated_keys_match_reference(nginx):
    """Tables with more distinct keys than luaguard's repeat detector holds
    (it falls back to reading the table): repeats early, late and in both
    halves stay arrays in order, as in lua-nginx-module."""
    args = "&".join([f"a{i}={i}" for i in range(300)]
                    + ["a0=x", "a299=y", "b", "b=", "b=%41", "a150"])
    headers = [(f"X-H{i}", f"v{i}") for i in range(200)]
    headers += [("X-H0", "again"), ("x-h199", "late"), ("X-Dup", "1"),
                ("X-Dup", "2"), ("x-dup", "3")]

    def send(n):
        raw = (f"GET /t?{args} HTTP/1.1\r\nHost: x\r\n"
               "Connection: close\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers)
               + "\r\n").encode()
        resp = n.raw(raw)
        assert resp.startswith(b"HTTP/1.1 200 "), n.read_log()
        return read_chunked_response(io.BytesIO(resp)).decode()
    ours, ref = both(nginx, lua_server(MANY_LUA, extra="""
        large_client_header_buffers 4 64k;"""), send)
    assert ours == ref
    assert "a0=[0,x]" in ours and "x-dup=[1,2,3]" in ours

BODY_LUA = r"""
ngx.req.read_body()
p(ngx.req.get_body_data())
local f = ngx.req.get_body_file()
p(f ~= nil)
if f then
    local fh = io.open(f, "rb") p(fh:read("*a")) fh:close()
    p(pcall(ngx.req.get_post_args))
else
    local a, e = ngx.req.get_post_args() p(dump(a), e)
    local a, e = ngx.req.get_post_args(1) p(dump(a), e)
end
ngx.req.set_body_data("new=1")
p(ngx.req.get_body_data(), ngx.req.get_body_file(), ngx.var.http_content_length)
p(dump(ngx.req.get_post_args()))
ngx.req.init_body(4)
ngx.req.append_body("hello ")
ngx.req.append_body("world")
ngx.req.finish_body()
local f = ngx.req.get_body_file()
p(ngx.req.get_body_data(), f ~= nil, ngx.var.http_content_length)
local fh = io.open(f, "rb") p(fh:read("*a")) fh:close()
ngx.req.init_body()
ngx.req.append_body("small")
ngx.req.finish_body()
local f = ngx.req.get_body_file()
p(f ~= nil)
if f then local fh = io.open(f, "rb") p(fh:read("*a")) fh:close()
else p(ngx.req.get_body_data()) end
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("in_file", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_body_matches_reference(nginx, in_file, chunked):
    loc = "client_body_in_file_only clean;" if in_file else ""
    body = b"x=1&y&z=%20&x=2"

    def send(n):
        if chunked:
            raw = (b"POST /t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n"
                   b"5\r\nx=1&y\r\na\r\n&z=%20&x=2\r\n0\r\n\r\n")
            resp = n.raw(raw)
            head, _, rest = resp.partition(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n")[0], n.read_log()
            # de-chunk
            text = b""
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                k = int(size, 16)
                if k == 0:
                    break
                text += rest[:k]
                rest = rest[k + 2:]
            return text.decode()
        r = n.request("/t", method="POST", body=body)
        assert r.status == 200, n.read_log()
        return r.text
    ours, ref = both(nginx, lua_server(BODY_LUA, loc_extra=loc), send)
    assert ours == ref
    assert ("true" if in_file else "x=[1,2]") in ours


def test_read_body_waits_for_slow_body(nginx):
    """read_body yields until the body arrives; in rewrite and content."""
    n = nginx(server="""
        location /r {
            rewrite_by_lua_block {
                ngx.log(ngx.NOTICE, "reading body")
                ngx.req.read_body()
                ngx.ctx.body = ngx.req.get_body_data()
            }
            content_by_lua_block { ngx.say("rewrite got ", ngx.ctx.body) }
        }
        location /c {
            content_by_lua_block {
                ngx.log(ngx.NOTICE, "reading body")
                ngx.req.read_body()
                ngx.say("content got ", ngx.req.get_body_data())
            }
        }
    """)
    for path, word in (("/r", "rewrite"), ("/c", "content")):
        n.new_log()
        with socket.create_connection(("127.0.0.1", n.port), 10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 10"
                      "\r\nConnection: close\r\n\r\nhello".encode())
            n.wait_log(r"reading body")
            s.sendall(b"world")
            data = b""
            while True:
                b = s.recv(65536)
                if not b:
                    break
                data += b
        assert data.startswith(b"HTTP/1.1 200")
        assert f"{word} got helloworld".encode() in data


@pytest.mark.asan_fast
def test_body_limits_413(nginx):
    n = nginx(server="""
        client_max_body_size 10;
        location /c { content_by_lua_block {
            ngx.req.read_body() ngx.say("read") } }
        location /r {
            rewrite_by_lua_block { ngx.req.read_body() }
            content_by_lua_block { ngx.say("read") }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
    """)
    for path in ("/c", "/r"):
        r = n.request(path, method="POST", body=b"x" * 100)
        assert r.status == 413
        # chunked: the limit is found while reading
        resp = n.raw(f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n"
                     "5\r\nhello\r\n".encode()
                     + b"20\r\n" + b"y" * 32 + b"\r\n0\r\n\r\n", timeout=5)
        assert resp.startswith(b"HTTP/1.1 413"), resp[:100]
        assert n.request(path, method="POST", body=b"small").text == "read\n"
    assert n.get("/ok").text == "ok\n"


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", ["luaguard", "reference"])
def test_body_refused_after_waiting(nginx, module):
    """A chunked body found too large (or badly framed) only once more of
    it arrives: nginx answers on its own while Lua waits in read_body. The
    request must end there, in every phase, and the connection close."""
    wait = ('ngx.log(ngx.WARN, "waiting for the body") ngx.req.read_body() '
            'ngx.log(ngx.WARN, "body was read")')
    read = 'content_by_lua_block { ngx.say("read") }'
    n = nginx(module=module, server=f"""
        client_max_body_size 10;
        client_body_timeout 60s;
        location /c {{ content_by_lua_block {{ {wait} ngx.say("read") }} }}
        location /r {{ rewrite_by_lua_block {{ {wait} }} {read} }}
        location /a {{ access_by_lua_block {{ {wait} }} {read} }}
    """)
    cases = ((b"20\r\n" + b"y" * 32 + b"\r\n0\r\n\r\n", b"413"),
             (b"zz\r\n", b"400"))
    for path in ("/r", "/a", "/c"):
        for rest, status in cases:
            n.new_log()
            with socket.create_connection(("127.0.0.1", n.port), 10) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                          "Transfer-Encoding: chunked\r\n\r\n"
                          "5\r\nhello\r\n".encode())
                n.wait_log(r"waiting for the body", fresh=True)
                s.sendall(rest)
                data = b""
                while True:  # the server closes: no wait for a timeout
                    b = s.recv(65536)
                    if not b:
                        break
                    data += b
            assert data.startswith(b"HTTP/1.1 " + status), (path, data[:80])
            assert "body was read" not in n.new_log()
        assert n.request(path, method="POST", body=b"small").text == "read\n"


def test_body_buffer_size_spills_to_file(nginx):
    n = nginx(main="user root;", server="""
        client_body_buffer_size 16;
        location /t { content_by_lua_block {
            ngx.req.read_body()
            local f = ngx.req.get_body_file()
            ngx.say(ngx.req.get_body_data(), " ", f ~= nil)
            ngx.say(tostring(ngx.req.get_body_data(4)), " ",
                    tostring(ngx.req.get_body_data(0)))
        } }
    """)
    r = n.request("/t", method="POST", body=b"z" * 1000)
    assert r.text == "nil true\nnil nil\n"
    r = n.request("/t", method="POST", body=b"z" * 10)
    assert r.text == "zzzzzzzzzz false\nzzzz zzzzzzzzzz\n"


def test_discard_body_and_keepalive(nginx):
    n = nginx(server="""
        location /d { content_by_lua_block {
            ngx.req.discard_body()
            ngx.say("discarded ", tostring(ngx.req.get_body_data())) } }
        location /n { content_by_lua_block { ngx.say("no read") } }
        location /next { content_by_lua_block { ngx.say("next") } }
    """)
    for path in ("/d", "/n"):
        body = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n!!"
        raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\n"
               f"Content-Length: {len(body)}\r\n\r\n{body}"
               "GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = n.raw(raw.encode())
        assert resp.count(b"HTTP/1.1 200") == 2, resp
        assert b"next\n" in resp
        assert b"smuggled" not in resp
    assert "/smuggled" not in n.read_log()


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", ["luaguard", "reference"])
def test_head_with_body_is_not_a_pipelined_request(nginx, module):
    """CVE-2024-33452: the body of a HEAD request is never parsed as a new
    request."""
    n = nginx(module=module, server="""
        location / { content_by_lua_block {
            ngx.log(ngx.NOTICE, "served ", ngx.var.request_uri)
            ngx.say("hi") } }
        location /x { content_by_lua_block {
            ngx.log(ngx.NOTICE, "served ", ngx.var.request_uri)
            ngx.exit(200) } }
    """)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    for path in ("/", "/x"):
        raw = (f"HEAD {path} HTTP/1.1\r\nHost: x\r\nContent-Length: "
               f"{len(smuggled)}\r\n\r\n").encode() + smuggled + (
               b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        n.raw(raw)
        n.wait_log(r"served /last")
    assert "served /smuggled" not in n.read_log()


def test_truncation_lets_waf_fail_closed(nginx):
    """CVE-2018-9230: arguments and headers past the limit are reported."""
    n = nginx(server="""
        location /waf {
            access_by_lua_block {
                ngx.req.read_body()
                local checks = {
                    {ngx.req.get_uri_args()}, {ngx.req.get_headers()},
                    {ngx.req.get_post_args()},
                }
                for _, c in ipairs(checks) do
                    if c[2] == "truncated" then return ngx.exit(403) end
                    for k, v in pairs(c[1]) do
                        if tostring(v):find("evil") then
                            return ngx.exit(403)
                        end
                    end
                end
            }
            content_by_lua_block { ngx.say("passed") }
        }
    """)
    many = "&".join(f"a{i}=1" for i in range(100))
    assert n.get("/waf?" + many).text == "passed\n"
    assert n.get(f"/waf?{many}&x=evil").status == 403
    assert n.get(f"/waf?{many}&x=1").status == 403
    # 98 + Host + Accept-Encoding (added by http.client) = 100
    hdrs = {f"X-H{i}": "1" for i in range(98)}
    assert n.get("/waf", headers=hdrs).status == 200
    hdrs["X-Evil"] = "evil"
    assert n.get("/waf", headers=hdrs).status == 403
    r = n.request("/waf", method="POST", body=many + "&x=evil",
                  headers={"Content-Type":
                           "application/x-www-form-urlencoded"})
    assert r.status == 403
    r = n.request("/waf", method="POST", body=many)
    assert r.status == 200


def test_header_integrity_upstream(nginx):
    """CR/LF in names and values set by Lua never form a header line or a
    request line of the upstream request."""
    n = nginx(server="""
        location /echo { content_by_lua_block {
            ngx.print(ngx.req.raw_header()) } }
        location /t {
            rewrite_by_lua_block {
                ngx.req.set_header("X-V", "a\\r\\nInjected-V: 1")
                ngx.req.set_header("X-N\\r\\nInjected-N: 1", "v")
                ngx.req.set_header("X-M", {"1\\nInjected-M: 1", "2"})
                ngx.req.set_uri_args("q=1 HTTP/1.1\\r\\nInjected-A: 1")
                ngx.req.set_uri("/echo", false, true)
                -- refused (the reference stores it: docs/compatibility.md)
                assert(not pcall(ngx.req.set_uri,
                                 "/echo\\r\\nInjected-U: 1", false, true))
                ngx.req.set_uri("/echo", false)
            }
            proxy_pass http://127.0.0.1:{port};
        }
    """)
    r = n.get("/t")
    assert r.status == 200, n.read_log()
    lines = r.text.split("\r\n")
    assert lines[0] == "GET /echo?q=1%20HTTP/1.1%0D%0AInjected-A:%201 HTTP/1.0"
    for ln in lines:
        assert not ln.startswith("Injected"), r.text
    assert "X-V: a%0D%0AInjected-V: 1" in lines
    assert "X-N%0D%0AInjected-N%3A%201: v" in lines
    assert "X-M: 1%0AInjected-M: 1" in lines and "X-M: 2" in lines


def test_set_uri_jump_and_errors(nginx):
    n = nginx(server="""
        location /a {
            rewrite_by_lua_block {
                ngx.req.set_uri("/b", true)
                ngx.log(ngx.ERR, "not reached")
            }
        }
        location /b { content_by_lua_block {
            ngx.say("at b ", ngx.var.uri, " ", tostring(ngx.var.args)) } }
        location /c {
            rewrite_by_lua_block { ngx.req.set_uri("/b") }
            content_by_lua_block { ngx.say("still c ", ngx.var.uri) }
        }
        location /d { content_by_lua_block {
            ngx.say(pcall(ngx.req.set_uri, "/b", true)) } }
        location /e {
            rewrite_by_lua_block { ngx.req.set_uri_args({x = "1 2"}) }
            content_by_lua_block { ngx.say(ngx.var.args, " ",
                ngx.req.get_uri_args().x) }
        }
    """)
    assert n.get("/a?q=1").text == "at b /b q=1\n"
    assert "not reached" not in n.read_log()
    assert n.get("/c").text == "still c /b\n"
    assert n.get("/d").text == ("falseAPI disabled in the context of "
                                "content_by_lua*\n")
    assert n.get("/e").text == "x=1%202 1 2\n"


def test_set_body_file_and_auto_clean(nginx, tmp_path):
    src = tmp_path / "body.txt"
    src.write_text("a=1&b=2")
    src2 = tmp_path / "body2.txt"
    src2.write_text("keep")
    n = nginx(main="user root;", server=f"""
        location /t {{ content_by_lua_block {{
            ngx.req.read_body()
            ngx.req.set_body_file("{src}", true)
            ngx.say(ngx.req.get_body_file(), " ",
                    ngx.var.http_content_length)
            ngx.say(pcall(ngx.req.set_body_file, "/nonexistent/x"))
        }} }}
        location /k {{ content_by_lua_block {{
            ngx.req.read_body()
            ngx.req.set_body_file("{src2}")
            ngx.say(ngx.req.get_body_file())
        }} }}
    """)
    r = n.request("/t", method="POST", body=b"orig")
    lines = r.text.splitlines()
    assert lines[0] == f"{src} 7"
    assert lines[1].startswith("false") and "/nonexistent/x" in lines[1]
    # auto_clean removes it when the request is freed, just after the
    # response went out.
    deadline = time.monotonic() + 10
    while src.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not src.exists()
    assert n.request("/k", method="POST", body=b"o").text == f"{src2}\n"
    assert src2.read_text() == "keep"


def test_get_post_args_errors(nginx):
    n = nginx(main="user root;", server="""
        location /n { content_by_lua_block {
            ngx.say(pcall(ngx.req.get_post_args)) } }
        location /f {
            client_body_in_file_only clean;
            content_by_lua_block {
                ngx.req.read_body()
                ngx.say(pcall(ngx.req.get_post_args)) }
        }
        location /m { content_by_lua_block {
            ngx.req.read_body()
            local a = ngx.req.get_post_args()
            ngx.say(#a.k, " ", a["n\\0m"], " ", a.bad) } }
    """)
    assert n.request("/n", method="POST", body=b"a=1").text == (
        "falseno request body found; maybe you should turn on "
        "lua_need_request_body?\n")
    assert n.request("/f", method="POST", body=b"a=1").text == (
        "truenilrequest body in temp file not supported\n")
    r = n.request("/m", method="POST", body=b"k=%00%00&n%00m=1&bad=%zz%4")
    assert r.text == "2 1 %zz%4\n"


def test_lua_need_request_body(nginx):
    n = nginx(server="""
        lua_need_request_body on;
        location /t { content_by_lua_block {
            ngx.say(ngx.req.get_body_data(), " ", ngx.req.get_post_args().a)
        } }
    """)
    assert n.request("/t", method="POST", body=b"a=5").text == "a=5 5\n"


def test_large_headers_raw_header(nginx):
    """Headers spread over large_client_header_buffers are still given
    whole; huge headers get nginx's own error."""
    n = nginx(server="""
        large_client_header_buffers 4 8k;
        location /t { content_by_lua_block {
            local h = ngx.req.raw_header()
            ngx.say(#h, " ", h:sub(1, 15), " ", h:sub(-4) == "\\r\\n\\r\\n")
            ngx.say(#ngx.req.raw_header(true))
            ngx.say(ngx.req.get_headers()["x-big5"]:sub(1, 3))
        } }
    """)
    hdrs = {f"X-Big{i}": "v" * 2000 for i in range(6)}
    r = n.get("/t", headers=hdrs)
    lines = r.text.splitlines()
    assert lines[0].split(" ", 1)[1] == "GET /t HTTP/1.1 true"
    full = int(lines[0].split()[0])
    assert full > 12000
    assert full - int(lines[1]) == len("GET /t HTTP/1.1\r\n")
    assert lines[2] == "vvv"
    r = n.get("/t", headers={"X-Huge": "v" * 20000})
    assert r.status in (400, 431, 494)


def test_bad_arguments_raise(nginx):
    n = nginx(server=lua_server(r"""
        local calls = {
            {"get_headers", "x"}, {"get_uri_args", "x"},
            {"get_body_data", "x"}, {"set_uri", nil}, {"set_uri", {}},
            {"set_uri_args", nil}, {"set_uri_args", true},
            {"set_header", {}}, {"set_header", "x", print},
            {"set_header", "x", {print}}, {"set_method", nil},
            {"set_body_data", nil}, {"init_body", "x"},
            {"get_post_args", "x"}, {"set_header", "Content-Length", "x"},
        }
        for i, c in ipairs(calls) do
            local ok, err = pcall(ngx.req[c[1]], c[2], c[3])
            ngx.say(c[1], " ", tostring(ok), " ", tostring(err))
        end
        ngx.say(pcall(ngx.req.socket))
        ngx.say(pcall(ngx.resp.get_headers, "x"))
    """))
    r = n.get("/t")
    assert r.status == 200, n.read_log()
    lines = r.text.splitlines()
    for ln in lines[:-2]:
        assert " false " in ln, ln
    assert lines[-2] == "truenilno body"  # a GET has no body to stream
    assert lines[-1].startswith("falsebad argument #1")


def test_phase_restrictions(nginx):
    n = nginx(server="""
        location /t {
            set_by_lua_block $m { return ngx.req.get_method() }
            header_filter_by_lua_block {
                ngx.header["X-Read"] = tostring(pcall(ngx.req.read_body))
                ngx.header["X-Args"] = ngx.req.get_uri_args().a
            }
            content_by_lua_block { ngx.say(ngx.var.m) }
        }
    """)
    r = n.get("/t?a=7", method="GET")
    assert r.text == "GET\n"
    assert r.header("X-Read") == "false"
    assert r.header("X-Args") == "7"
