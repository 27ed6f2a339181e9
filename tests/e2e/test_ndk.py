"""Issue 21, item 3: ndk.set_var.DIRECTIVE(value) with ngx_devel_kit and
set-misc loaded (Debian's libnginx-mod-http-ndk and
libnginx-mod-http-set-misc), and without them; ngx.get_raw_phase. Each
compared with Debian's lua-nginx-module (`module="reference"`)."""

import re

import pytest

NDK = "/usr/lib/nginx/modules/ndk_http_module.so"
SET_MISC = "/usr/lib/nginx/modules/ngx_http_set_misc_module.so"

SHOW = r"""
    local function show(label, ...)
        local t = { label }
        for i = 1, select("#", ...) do
            t[#t + 1] = tostring((select(i, ...)))
        end
        ngx.say(table.concat(t, " | "))
    end
    local sv = ndk.set_var
    local function call(name, ...)
        local args = { n = select("#", ...), ... }
        return pcall(function()
            return sv[name](unpack(args, 1, args.n))
        end)
    end
"""

CALLS = r"""
    show("x", ngx.var.x)
    show("esc", call("set_escape_uri", "a b/c?d=é"))
    show("unesc", call("set_unescape_uri", "a%20b%zz"))
    show("empty", call("set_escape_uri", ""))
    show("nil", call("set_quote_sql_str", nil))
    show("none", call("set_quote_sql_str"))
    show("num", call("set_escape_uri", 1.5))
    show("bool", call("set_escape_uri", true))
    show("two", call("set_escape_uri", "a", "b"))
    show("bin", call("set_encode_base64", "a\0b"))
    show("bad", call("set_decode_base64", "!!!"))
    show("hex", call("set_encode_hex", "ab"))
    show("md5", call("set_md5", "x"))
    show("sha1", call("set_sha1", "ab"))
    show("json", call("set_quote_json_str", 'a"b'))
    show("pg", call("set_quote_pgsql_str", "a'b"))
    show("multi", call("set_hashed_upstream", "a", "b"))
    show("nosuch", call("nosuch", "x"))
    show("new", pcall(function() sv.x = 1 end))
    show("raw", rawget(sv, "set_escape_uri"), type(ndk), type(sv))
    local keys = 0
    for _ in pairs(sv) do keys = keys + 1 end
    show("keys", keys)
    local ok, f = pcall(function() return sv.set_escape_uri end)
    if ok then
        show("fresh", type(f), f == sv.set_escape_uri)
    end
"""

SERVER = """
        location = /t {
            set_by_lua_block $x { return ndk.set_var.set_escape_uri("s b") }
            header_filter_by_lua_block {
                ngx.header["X-H"] = ndk.set_var.set_escape_uri("h b")
            }
            content_by_lua_block { %s %s }
        }
        location = /phase {
            content_by_lua_block {
                local base = require "resty.core.base"
                ngx.say(ngx.get_raw_phase(base.get_request()))
            }
            log_by_lua_block {
                local base = require "resty.core.base"
                ngx.log(ngx.WARN, "raw log phase: ",
                        ngx.get_raw_phase(base.get_request()))
            }
        }
""" % (SHOW, CALLS)

HTTP = r"""
    init_worker_by_lua_block {
        ngx.log(ngx.WARN, "init_worker: ", ndk.set_var.set_escape_uri("a b"))
        ngx.timer.at(0, function()
            ngx.log(ngx.WARN, "timer: ", ndk.set_var.set_escape_uri("c d"),
                    " ", ngx.get_raw_phase(require("resty.core.base")
                                               .get_request()))
        end)
    }
"""


def norm(text):
    text = re.sub(r"content_by_lua\(nginx\.conf:\d+\)", "CHUNK", text)
    return re.sub(r"0x[0-9a-f]+", "0x", text)


def start(nginx, module, with_set_misc):
    loads = []
    if module == "luaguard":
        loads.append(NDK)
    if with_set_misc:
        loads.append(SET_MISC)
    extra = "\n".join(f"load_module {p};" for p in loads)
    return nginx(module=module, server=SERVER, http=HTTP, extra_load=extra)


def test_set_misc_directives_through_ndk(nginx):
    got = {}
    for m in ("luaguard", "reference"):
        n = start(nginx, m, True)
        r = n.get("/t")
        assert r.status == 200, n.read_log()
        got[m] = (norm(r.text), r.header("X-H"))
        n.wait_log(r"init_worker: a%20b")
        n.wait_log(r"timer: c%20d 128")
        assert n.get("/phase").text == "8\n"
        n.wait_log(r"raw log phase: 16")
        n.wait_log(r"set_decode_base64: invalid value")
    assert got["luaguard"] == got["reference"]
    text = got["luaguard"][0]
    assert "esc | true | a%20b%2Fc%3Fd%3D%C3%A9" in text
    assert "x | s%20b" in text and got["luaguard"][1] == "h%20b"
    assert "bad | false | calling directive set_decode_base64 failed" in text


def test_without_set_misc_every_directive_is_unknown(nginx):
    got = {}
    for m in ("luaguard", "reference"):
        n = nginx(module=m, server=SERVER.replace(
            'set_by_lua_block $x { return ndk.set_var.set_escape_uri("s b") }',
            "").replace("ngx.header[\"X-H\"] = ndk.set_var."
                        "set_escape_uri(\"h b\")", ""))
        r = n.get("/t")
        assert r.status == 200, n.read_log()
        got[m] = norm(r.text)
    assert got["luaguard"] == got["reference"]
    assert ('esc | false | CHUNK:13: ndk.set_var: directive '
            '"set_escape_uri" not found or does not use ndk_set_var_value'
            in got["luaguard"])


def test_strict_profile_has_no_ndk(nginx):
    n = nginx(extra_load=f"load_module {NDK};\nload_module {SET_MISC};",
              server="""
        location = /t {
            lua_sandbox strict;
            content_by_lua_block { ngx.say(type(ndk)) }
        }""")
    assert n.get("/t").text == "nil\n"
