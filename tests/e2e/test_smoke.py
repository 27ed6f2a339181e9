"""The module loads into the stock nginx and serves Lua from every phase."""

import pytest

SERVER = """
        location /hello { content_by_lua_block { ngx.say("hello, ", ngx.var.arg_who or "world") } }
        location /phases {
            rewrite_by_lua_block { ngx.ctx.trail = { ngx.get_phase() } }
            access_by_lua_block { table.insert(ngx.ctx.trail, ngx.get_phase()) }
            content_by_lua_block {
                table.insert(ngx.ctx.trail, ngx.get_phase())
                ngx.say(table.concat(ngx.ctx.trail, ","))
            }
        }
        location /boom { content_by_lua_block { error("secret detail") } }
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("workers", [1, 2])
def test_hello_and_phases(nginx, workers):
    n = nginx(server=SERVER, workers=workers)
    r = n.get("/hello?who=luaguard")
    assert r.status == 200
    assert r.text == "hello, luaguard\n"
    assert r.header("Content-Type") == "text/plain"
    assert n.get("/phases").text == "rewrite,access,content\n"


@pytest.mark.asan_fast
def test_lua_error_is_plain_500_and_logged(nginx):
    n = nginx(server=SERVER)
    r = n.get("/boom")
    assert r.status == 500
    assert b"secret detail" not in r.body
    assert b"<center><h1>500 Internal Server Error</h1></center>" in r.body
    n.wait_log(r"lua entry thread aborted: runtime error: "
               r"content_by_lua\(nginx\.conf:\d+\):1: secret detail")
    assert n.get("/hello").status == 200  # the worker keeps serving


def test_nginx_t_passes(nginx_conf):
    ok, out = nginx_conf(server=SERVER).test_config()
    assert ok, out
