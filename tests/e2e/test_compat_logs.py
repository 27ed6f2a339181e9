"""Issue 19, item 19: error and log text users grep for, run on Debian's
lua-nginx-module (`module="reference"`) and on luaguard and compared."""

import re

from harness import TcpServer

MODULES = ["luaguard", "reference"]


def both(nginx, **kw):
    return {m: nginx(module=m, **kw) for m in MODULES}


def lines(log, level="error"):
    """The messages at `level` of a log, without time, pid, connection
    number and the request's context; configuration line numbers and
    temporary paths neutral."""
    out = []
    for m in re.finditer(rf"\[{level}\] \d+#\d+: (?:\*\d+ )?([^\n]*)", log):
        text = re.sub(r"(, client: | while |, context: ).*", "", m.group(1))
        text = re.sub(r"nginx\.conf:\d+", "nginx.conf:N", text)
        text = re.sub(r"/tmp/\S+/n\d/", "PREFIX/", text)
        text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
        out.append(text)
    return out


SCRIPT = """
local function helper()
    ngx.log(ngx.ERR, "from helper")
end
local M = {}
function M.method()
    ngx.log(ngx.WARN, "from method")
end
ngx.log(ngx.ERR, "from main chunk")
helper()
M.method()
print("from print")
local t = setmetatable({}, {__index = function() ngx.log(ngx.ERR, "meta") end})
local _ = t.x
"""

MOD = """
local _M = {}
function _M.go()
    ngx.log(ngx.ERR, "from module")
end
function _M.anon()
    (function() ngx.log(ngx.ERR, "from anon") end)()
end
return _M
"""


def test_log_prefix(nginx):
    server = r"""
        location /file { content_by_lua_file {prefix}/lua/script.lua; }
        location /inline {
            content_by_lua_block {
                local function named() ngx.log(ngx.ERR, "inline named") end
                ngx.log(ngx.ERR, "inline main")
                named()
                local m = require "mod"
                m.go()
                m.anon()
                ngx.say("ok")
            }
        }
    """
    http = 'lua_package_path "{prefix}/lua/?.lua;;";'
    got = {}
    for m, n in both(nginx, server=server, http=http,
                     files={"lua/script.lua": SCRIPT,
                            "lua/mod.lua": MOD},
                     main="user root;").items():
        n.get("/file")
        n.get("/inline")
        log = n.read_log()
        got[m] = [ln for lvl in ("error", "warn", "notice")
                  for ln in lines(log, lvl) if "[lua]" in ln]
    assert got["luaguard"] == got["reference"], got
    assert "[lua] script.lua:3: helper(): from helper" in got["luaguard"]


def test_code_cache_off_alert(nginx_conf):
    server = r"""
        location / {
            lua_code_cache off;
            content_by_lua_block { ngx.say("ok") }
        }
    """
    got = {}
    for m in MODULES:
        ok, out = nginx_conf(module=m, server=server).test_config()
        assert ok, out
        got[m] = re.findall(r"\[alert\] \d+#\d+: (.*) in \S+nginx\.conf",
                            out)
    assert got["luaguard"] == got["reference"] == [
        "lua_code_cache is off; this will hurt performance"], got


# ---- errors of API calls the script makes ----

TIMER_APIS = {
    "say": 'ngx.say("x")', "eof": "ngx.eof()", "exec": 'ngx.exec("/x")',
    "capture": 'ngx.location.capture("/x")', "var": "return ngx.var.uri",
    "header": "return ngx.header.foo", "header_set": 'ngx.header.foo = "1"',
    "status": "return ngx.status", "status_set": "ngx.status = 200",
    "headers_sent": "return ngx.headers_sent",
    "is_subrequest": "return ngx.is_subrequest",
    "get_headers": "return ngx.req.get_headers()",
    "set_header": 'ngx.req.set_header("a", "b")',
    "get_method": "return ngx.req.get_method()",
    "http_version": "return ngx.req.http_version()",
    "raw_header": "return ngx.req.raw_header()",
    "uri_args": "return ngx.req.get_uri_args()",
    "set_uri": 'ngx.req.set_uri("/x")',
    "get_body": "return ngx.req.get_body_data()",
    "read_body": "ngx.req.read_body()",
}

API_SERVER = r"""
    location /timer {
        content_by_lua_block {
            local apis = {
                %s
            }
            ngx.timer.at(0, function()
                local names = {}
                for k in pairs(apis) do names[#names + 1] = k end
                table.sort(names)
                for _, k in ipairs(names) do
                    local ok, err = pcall(apis[k])
                    err = tostring(err):gsub("^.-:%%d+: ", "")
                    ngx.log(ngx.ERR, "TIMER ", k, " ", err)
                end
                ngx.log(ngx.ERR, "TIMER DONE")
            end)
            ngx.say("ok")
        }
    }
    location /re {
        content_by_lua_block {
            for _, t in ipairs({"${", "ab$", "x${12", "$1$x", "${a}", "$-"}) do
                ngx.say(t, " ", ngx.re.sub("abc", "(b)", t))
                ngx.say(t, " ", ngx.re.gsub("abc", "(b)", t))
            end
        }
    }
    location /send {
        content_by_lua_block {
            local s = ngx.socket.tcp()
            local ok, err = s:connect("127.0.0.1", 1)
            ngx.say("refused ", ok, " ", err)
            s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", tonumber(ngx.var.arg_port)))
            for _, v in ipairs({ {true}, {false}, {nil},
                                 { {"a", {"b", true}} },
                                 { {"a", {"b", nil, "c"}} },
                                 { {1.5, 2} }, { {a = 1} }, { {1, x = 2} },
                                 { {"a", print} }, {print}, { {} } }) do
                ngx.say("send ", pcall(s.send, s, v[1]))
            end
            s:close()
        }
    }
""" % "\n                ".join(
    f"{k} = function() {v} end," for k, v in TIMER_APIS.items())

EXITS = [200, 201, 204, 300, 301, 400, 403, 408, 444, 499, 500, 501]
EXIT_SERVER = "\n".join(f"""
    location /exit{c} {{
        content_by_lua_block {{
            ngx.say("sent")
            ngx.flush(true)
            ngx.exit({c})
        }}
    }}""" for c in EXITS)


class Sink(TcpServer):
    def serve(self, conn):
        with conn:
            while conn.recv(65536):
                pass


def test_api_error_text(nginx):
    sink = Sink()
    try:
        got = {}
        for m, n in both(nginx, server=API_SERVER + EXIT_SERVER).items():
            out = {"re": n.get("/re").text,
                   "send": n.get(f"/send?port={sink.port}").text}
            n.get("/timer")
            n.wait_log("TIMER DONE")
            for c in EXITS:
                try:
                    n.raw(f"GET /exit{c} HTTP/1.1\r\nHost: x\r\n"
                          "Connection: close\r\n\r\n".encode(), timeout=5)
                except OSError:
                    pass
            n.stop()
            out["log"] = lines(n.read_log())
            got[m] = out
    finally:
        sink.close()
    for key in got["luaguard"]:
        assert got["luaguard"][key] == got["reference"][key], (key, got)
    log = got["luaguard"]["log"]
    assert 'the closing bracket in "12" variable is missing' in log
    assert "connect() failed (111: Connection refused)" in log
    assert ("attempt to set status 403 via ngx.exit after sending out the "
            "response status 200") in log
