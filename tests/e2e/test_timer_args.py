"""What a timer callback receives: `premature` then the arguments given to
ngx.timer.at / ngx.timer.every, nils and their count included, the same
values at every firing of an every timer. Run on Debian's
lua-nginx-module (`module="reference"`) and on luaguard and compared.

Rendezvous through a shared dict: the test polls for the flag the
callback sets and fails if it never comes."""

import time

import pytest

MODULES = ["luaguard", "reference"]

HTTP = """
    lua_shared_dict rv 1m;
"""

SERVER = r"""
    location /flag { content_by_lua_block {
        ngx.say(tostring(ngx.shared.rv:get(ngx.var.arg_k)))
    } }
    location /at { content_by_lua_block {
        local function show(premature, ...)
            local out = {tostring(premature), select("#", ...)}
            for i = 1, select("#", ...) do
                out[#out + 1] = tostring((select(i, ...)))
            end
            return table.concat(out, " ")
        end
        local t = {}
        for i = 1, 300 do t[i] = i end
        assert(ngx.timer.at(0, function(...)
            ngx.shared.rv:set("none", show(...))
        end))
        assert(ngx.timer.at(0, function(...)
            ngx.shared.rv:set("holes", show(...))
        end, nil, "b", nil, 4, nil))
        assert(ngx.timer.at(0, function(...)
            ngx.shared.rv:set("many", #show(...) .. " "
                                      .. select("#", ...))
        end, unpack(t)))
        ngx.say("armed")
    } }
    location /every { content_by_lua_block {
        -- The same table at every firing: what one firing writes in it
        -- the next one reads.
        local box = {n = 0}
        local ok, err = ngx.timer.every(0.001, function(premature, b, s, z)
            if b.n >= 3 then
                return
            end
            b.n = b.n + 1
            local rv = ngx.shared.rv
            rv:set("every" .. b.n, table.concat({tostring(premature), b.n,
                                                 s, tostring(z)}, " "))
        end, box, "s", nil)
        ngx.say(tostring(ok), " ", tostring(err))
    } }
"""


def await_flag(n, key, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = n.get(f"/flag?k={key}")
        if r.text != "nil\n":
            return r.text.strip()
        time.sleep(0.02)
    raise AssertionError(f"{key} never set; log:\n{n.read_log()}")


def run(n):
    assert n.get("/at").text == "armed\n"
    assert n.get("/every").text == "1 nil\n"
    return {k: await_flag(n, k)
            for k in ["none", "holes", "many", "every1", "every2", "every3"]}


@pytest.mark.parametrize("module", MODULES)
def test_timer_callback_arguments(nginx, module):
    got = run(nginx(module=module, http=HTTP, server=SERVER))
    assert got == {
        "none": "false 0",
        "holes": "false 5 nil b nil 4 nil",
        # "false 300" and 300 numbers of 1 to 3 digits, space separated;
        # 301 values with premature.
        "many": f"{len('false 300') + sum(len(str(i)) + 1 for i in range(1, 301))} 301",
        "every1": "false 1 s nil",
        "every2": "false 2 s nil",
        "every3": "false 3 s nil",
    }, got
