"""ngx.say / ngx.print with the argument shapes their fast path (a few
scalars, each measured once) and their general path (tables, many
arguments) take, and the keys of ngx's computed fields, run on Debian's
lua-nginx-module (`module="reference"`) and on luaguard and compared."""

import pytest

MODULES = ["luaguard", "reference"]

SAY = r"""
    location = /scalars {
        content_by_lua_block {
            ngx.say(-0, " ", 0, " ", 1.5, " ", 2^53, " ", 1e300, " ", -7)
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
