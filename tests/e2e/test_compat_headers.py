"""Issue 19, items 11 and 14: response and request headers written and
read from Lua, run on Debian's lua-nginx-module (`module="reference"`)
and on luaguard and compared. Where the reference is unsafe, luaguard's
behaviour is asserted instead (and listed in docs/compatibility.md)."""

import re

import pytest

from test_header_integrity import Upstream

MODULES = ["luaguard", "reference"]


def both(nginx, **kw):
    return {m: nginx(module=m, **kw) for m in MODULES}


def heads(r, *drop):
    """The response headers but those that carry the time."""
    skip = {"date", "expires", "last-modified", "etag", *drop}
    return [(k, v) for k, v in r.headers if k.lower() not in skip]


@pytest.fixture
def upstream():
    u = Upstream()
    yield u
    u.close()


# ---- 11. header names ----

# Every byte in a name (a prefix per byte keeps upper case and '_' from
# naming another header), non-ASCII names, several values, a header of
# nginx's own table: through ngx.header to the client and through
# ngx.req.set_header to a proxied upstream, in the main request and in a
# captured subrequest (whose changes must reach its upstream and stay
# out of the parent's headers).
NAMES = r"""
    location /resp {
        content_by_lua_block {
            for b = 0, 255 do
                ngx.header[string.format("n%02x", b) .. string.char(b)
                           .. "z"] = "v"
            end
            ngx.header["Ünï cödé"] = {"1", "2"}
            ngx.say("ok")
        }
    }
    location /req {
        rewrite_by_lua_block {
            for b = 0, 255 do
                ngx.req.set_header(string.format("n%02x", b)
                                   .. string.char(b) .. "z", "v")
            end
            ngx.req.set_header("Ünï cödé", {"1", "2"})
            ngx.req.set_header("Host\128", "h")
            ngx.req.set_header(12, "n")
        }
        proxy_pass http://127.0.0.1:UP;
    }
    location /parent {
        content_by_lua_block {
            local r = ngx.location.capture("/sub")
            local h = ngx.req.get_headers()
            ngx.say(r.status, " ", tostring(h["x-sub"]), " ",
                    tostring(h["x-parent"]), " ", tostring(ngx.var.cookie_a))
        }
    }
    location /sub {
        rewrite_by_lua_block {
            ngx.req.clear_header("X-Parent")
            ngx.req.clear_header("Cookie")
            ngx.req.set_header("X-Sub", "s")
            ngx.req.set_header("Ünï:", "u")
        }
        proxy_pass http://127.0.0.1:UP;
    }
"""


def test_header_names_match_the_reference(nginx, upstream):
    got = {}
    for m, n in both(nginx, server=NAMES.replace(
            "UP", str(upstream.port))).items():
        resp = n.raw(b"GET /resp HTTP/1.0\r\n\r\n").split(b"\r\n\r\n")[0]
        assert n.get("/req").status == 200, m
        req = upstream.next_head()
        parent = n.get("/parent", headers={"X-Parent": "p",
                                           "Cookie": "a=1"}).text
        sub = upstream.next_head()
        got[m] = (re.sub(rb"\r\nDate: [^\r]*", b"", resp), req, parent, sub)
    assert got["luaguard"] == got["reference"]
    resp, req, parent, sub = got["luaguard"]
    assert parent == "200 nil p 1\n", parent
    assert b"\r\nX-Sub: s\r\n" in sub and b"X-Parent" not in sub, sub
    assert b"\r\n%C3%9Cn%C3%AF%3A: u" in sub, sub
    assert b"\r\n%C3%9Cn%C3%AF%20c%C3%B6d%C3%A9: 2" in req, req
    # What they agree on is safe: every name a token.
    for head in (resp, req, sub):
        for ln in head.split(b"\r\n")[1:]:
            name = ln.split(b": ", 1)[0]
            assert re.fullmatch(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name), ln


# ---- 14. built-in response headers ----

BUILTIN = r"""
    location /multi {
        content_by_lua_block {
            ngx.header.cache_control = "no-cache"
            ngx.header.link = {"</a>; rel=preload", "</b>; rel=next"}
            ngx.say("multi")
        }
        add_header X-CC "[$sent_http_cache_control]";
        add_header X-Link "[$sent_http_link]";
    }
    location /expires {
        expires 1h;
        content_by_lua_block {
            ngx.header.cache_control = {"private", "max-age=5"}
            ngx.say("expires")
        }
        add_header X-CC "[$sent_http_cache_control]";
    }
    location /static/ {
        header_filter_by_lua_block {
            ngx.header["X-LM"] = tostring(ngx.header["Last-Modified"])
        }
    }
    location /gzip {
        gzip on;
        gzip_min_length 1;
        gzip_types application/x-foo;
        content_by_lua_block {
            ngx.header.content_type = ngx.var.arg_type
            ngx.print(string.rep("a", 100))
        }
    }
    location /seen {
        header_filter_by_lua_block {
            local function show(h)
                local keys = {}
                for k, v in pairs(h) do
                    keys[#keys + 1] = k .. "=" .. tostring(v)
                end
                table.sort(keys)
                return table.concat(keys, ",")
            end
            local raw = show(ngx.resp.get_headers(0, true))
            ngx.header["X-H"] = show(ngx.resp.get_headers())
            ngx.header["X-Raw"] = raw
        }
        content_by_lua_block {
            ngx.header["X-A"] = "1"
            ngx.say("seen")
        }
    }
"""


def test_cache_control_and_link_are_nginx_fields(nginx):
    """$sent_http_cache_control and $sent_http_link read what Lua set;
    the expires directive replaces Lua's Cache-Control lines."""
    got = {}
    for m, n in both(nginx, server=BUILTIN).items():
        got[m] = [heads(n.get(p)) for p in ("/multi", "/expires")]
    assert got["luaguard"] == got["reference"], got
    multi, expires = got["luaguard"]
    assert ("X-CC", "[no-cache]") in multi, multi
    assert ("X-Link", "[</a>; rel=preload, </b>; rel=next]") in multi
    assert [v for k, v in expires if k.lower() == "cache-control"] == \
        ["max-age=3600"], expires
    assert ("X-CC", "[max-age=3600]") in expires, expires


def test_last_modified_of_a_static_file_in_header_filter(nginx):
    for m, n in both(nginx, server=BUILTIN, main="user root;",
                     files={"html/static/f.txt": "x\n"}).items():
        r = n.get("/static/f.txt")
        assert r.header("Last-Modified"), (m, r.headers)
        assert r.header("X-LM") == r.header("Last-Modified"), (m, r.headers)


@pytest.mark.parametrize("ctype", [
    "application/x-foo", "application/x-foo; charset=utf-8",
    "application/x-foo;charset=\"koi8-r\"", "application/x-foo;",
    "application/x-foo ; a=b", "text/html;x=1"])
def test_content_type_from_lua_meets_gzip_types(nginx, ctype):
    """The type nginx's checks compare is the part before the first ';'
    (a space before it is kept, and does not match)."""
    got = {}
    for m, n in both(nginx, server=BUILTIN).items():
        r = n.get("/gzip?type=" + ctype.replace(" ", "%20"),
                  headers={"Accept-Encoding": "gzip"})
        got[m] = (heads(r), r.body)
    assert got["luaguard"] == got["reference"], got
    gzipped = ("Content-Encoding", "gzip") in got["luaguard"][0]
    assert gzipped == (ctype != "application/x-foo ; a=b"), got


@pytest.mark.parametrize("headers,version", [
    ({}, None), ({"Connection": "close"}, None), ({}, "1.0")],
    ids=["keepalive", "close", "http10"])
def test_resp_get_headers_in_header_filter(nginx, headers, version):
    got = {m: heads(n.get("/seen", headers=headers, version=version))
           for m, n in both(nginx, server=BUILTIN).items()}
    assert got["luaguard"] == got["reference"], got
    conn = "close" if headers or version else "keep-alive"
    # HTTP/1.0: lua_http10_buffering knows the length.
    length = "content-length=5," if version else ""
    assert ("X-H", f"connection={conn},{length}content-type=text/plain,"
                   "x-a=1") in got["luaguard"], got
    assert ("X-Raw", f"X-A=1,connection={conn},{length}"
                     "content-type=text/plain") in got["luaguard"], got


def test_cleared_cache_control_then_expires(nginx):
    """Deliberate difference (docs/compatibility.md): after
    `ngx.header.cache_control = nil`, the expires directive still sends
    its Cache-Control. The reference sends none: nginx's expires filter
    takes the array the reference emptied for one with a first element
    and writes through that stale slot."""
    server = r"""
        location / {
            expires 1h;
            content_by_lua_block {
                ngx.header.cache_control = "private"
                ngx.header.cache_control = nil
                ngx.say("cleared ", tostring(ngx.header.cache_control))
            }
            add_header X-CC "[$sent_http_cache_control]";
        }
    """
    ref = nginx(module="reference", server=server).get("/")
    assert ref.header("Cache-Control") is None
    r = nginx(server=server).get("/")
    assert r.text == "cleared nil\n"
    assert r.header("Cache-Control") == "max-age=3600", r.headers
    assert r.header("X-CC") == "[max-age=3600]", r.headers
