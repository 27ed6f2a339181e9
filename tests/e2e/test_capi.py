"""Issue 21, item 3: the C API other nginx modules link against
(ngx_http_lua_api.h). tests/capi's module, built against the same nginx
tree, is loaded after luaguard: its Lua module comes through
ngx_http_lua_add_package_preload, its shared memory zone through
ngx_http_lua_shared_memory_add, and it reads the running request
(ngx_http_lua_get_request) and lua_shared_dict values
(ngx_http_lua_find_zone, ngx_http_lua_shared_dict_get)."""

from pathlib import Path

import pytest

from harness import MODULE

CAPI = Path(MODULE).parent / "ngx_http_luaguard_capi_test_module.so"

SERVER = r"""
    location = /t {
        content_by_lua_block {
            local c = require "capi_test"
            ngx.say(c.had_global_state(), " ", c.uri(), " ", c.incr())
        }
    }
    location = /dict {
        content_by_lua_block {
            local d = ngx.shared.d
            d:set("s", "hello world")       -- longer than the C buffer
            d:set("n", 1.5)
            d:set("b", true)
            d:set("gone", 1, 0.001)
            d:lpush("l", 1)
            ngx.sleep(0.01)
            local c = require "capi_test"
            for _, k in ipairs({ "s", "n", "b", "gone", "missing", "l" }) do
                ngx.say(k, " ", tostring(select(1, c.dict_get("d", k))), " ",
                        tostring(select(2, c.dict_get("d", k))))
            end
            ngx.say(c.dict_get("nosuch", "k"))
        }
    }
    location = /vm {
        lua_vm tenant;
        content_by_lua_block {
            ngx.say(require("capi_test").uri())
        }
    }
"""


@pytest.fixture
def capi_nginx(nginx):
    if not CAPI.exists():
        pytest.skip(f"{CAPI} not built")

    def start(**kw):
        return nginx(extra_load=f"load_module {CAPI};",
                     http="lua_shared_dict d 1m;", server=SERVER, **kw)
    return start


def test_preload_and_zone_shared_by_the_workers(capi_nginx):
    n = capi_nginx(workers=2)
    counts = []
    for _ in range(6):
        r = n.get("/t")
        assert r.status == 200, n.read_log()
        state, uri, count = r.text.split()
        assert (state, uri) == ("true", "/t")
        counts.append(int(float(count)))
    # one counter in shared memory, whichever worker served
    assert counts == list(range(1, 7))


def test_shared_dict_values_read_from_c(capi_nginx):
    n = capi_nginx()
    assert n.get("/dict").text == (
        "s string hello wo\n"       # as much as the caller's buffer holds
        "n number 1.5\n"
        "b boolean true\n"
        "gone nil declined\n"
        "missing nil declined\n"
        "l nil error\n"
        "nilno zone\n")


def test_every_vm_gets_the_preload(capi_nginx):
    n = capi_nginx()
    assert n.get("/vm").text == "/vm\n"
