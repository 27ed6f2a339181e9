"""Request data written to the error log can never forge a line."""

import os
import re
import shutil
import socket
import tempfile
import urllib.parse

import pytest

from harness import Dns

FORGED = "\n2026/01/01 00:00:00 [emerg] 1#1: forged by the client\r\nX"

SERVER = r"""
    location /log { content_by_lua_block {
        ngx.log(ngx.ERR, "user said: ", ngx.var.arg_msg and ngx.unescape_uri(ngx.var.arg_msg))
        print("print: ", ngx.unescape_uri(ngx.var.arg_msg))
        ngx.say("logged")
    } }
    location /err { content_by_lua_block {
        error("error: " .. ngx.unescape_uri(ngx.var.arg_msg))
    } }
    location /errtable { content_by_lua_block {
        error(setmetatable({}, {__tostring = function() return "x" end}))
    } }
"""


def forged_lines(log):
    return [ln for ln in log.splitlines() if "forged by the client" in ln
            and not re.match(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(error|notice)\]",
                             ln)]


@pytest.mark.asan_fast
@pytest.mark.parametrize("path", ["/log", "/err"])
def test_forged_line_is_not_a_line(nginx, path):
    n = nginx(server=SERVER, log_level="notice")
    r = n.get(path + "?msg=" + urllib.parse.quote(FORGED))
    assert r.status in (200, 500)
    n.wait_log(r"forged by the client")
    log = n.read_log()
    # The text is there, on the line of the message that carried it...
    assert re.search(r"\\n2026/01/01 00:00:00 \[emerg\] 1#1: forged by the "
                     r"client\\r\\nX", log), log
    # ...and never at the start of a line of its own.
    assert forged_lines(log) == []
    assert not re.search(r"^2026/01/01", log, re.M)


def test_other_control_bytes_escaped(nginx):
    n = nginx(server=SERVER)
    n.get("/log?msg=" + urllib.parse.quote("a\x1b[31mred\x00b\x7f"))
    m = n.wait_log(r"user said: (.*?), client")
    assert m.group(1) == r"a\x1b[31mred\x00b\x7f"


def test_traceback_lines_start_with_a_tab(nginx):
    n = nginx(server=SERVER)
    n.get("/err?msg=" + urllib.parse.quote(FORGED))
    log = n.wait_log(r"stack traceback").string
    after = log[log.index("stack traceback:"):].splitlines()[1:]
    for line in after:
        if line.startswith("20"):   # the next real log line
            break
        assert line.startswith("\t"), line


# ---- every log path that writes text a script chose (issue 17) ----
#
# Each location takes the attack text from ?msg= and puts it where a log
# line is written from: chunk names (error tracebacks in a thread, in a
# synchronous phase, in a timer, in a light thread; ngx.log's prefix),
# function names in tracebacks, cosocket host names and unix paths,
# subrequest variable names. Short enough for a chunk name (LuaJIT keeps
# 59 bytes of it).
ATTACK = "\n2026/01/01 [emerg] forged by the client\r\n"
REAL_LINE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[\w+\] \d+#\d+: ")

PATHS = r"""
    location /chunk_thread { content_by_lua_block {
        local f = load("error('boom')", "=x" .. MSG)
        f()
    } }
    location /chunk_sync {
        content_by_lua_block { ngx.say("ok") }
        log_by_lua_block {
            local f = load("error('boom')", "=x" .. MSG)
            f()
        }
    }
    location /chunk_set {
        set_by_lua_block $out {
            local f = load("error('boom')", "=x" .. MSG)
            return f()
        }
        content_by_lua_block { ngx.say("ok") }
    }
    location /function_name { content_by_lua_block {
        -- A constant key: LuaJIT names the function after it.
        local code = "local t = {} t[" .. string.format("%q", MSG)
                     .. "] = function() error('boom') end t["
                     .. string.format("%q", MSG) .. "]()"
        load(code, "=fn")()
    } }
    location /ngx_log { content_by_lua_block {
        load("ngx.log(ngx.ERR, 'from a named chunk')", "=x" .. MSG)()
        ngx.say("ok")
    } }
    location /timer { content_by_lua_block {
        local f = load("error('boom')", "=x" .. MSG)
        ngx.timer.at(0, f)
        ngx.say("ok")
    } }
    location /light_thread { content_by_lua_block {
        local f = load("error('boom')", "=x" .. MSG)
        local t = ngx.thread.spawn(f)
        ngx.say(ngx.thread.wait(t))
    } }
    location /no_resolver { content_by_lua_block {
        local sock = ngx.socket.tcp()
        ngx.say(sock:connect("x" .. MSG, 80))
    } }
    location /unix_path { content_by_lua_block {
        local sock = ngx.socket.tcp()
        ngx.say(sock:connect("unix:" .. ngx.unescape_uri(ngx.var.arg_path)))
    } }
    location /capture_var { content_by_lua_block {
        local ok, err = pcall(ngx.location.capture, "/sub",
                              {vars = {["v" .. MSG] = "1"}})
        ngx.say(ok)
    } }
    location /sub { return 204; }
"""

# MSG: the attack text, from ?msg=
MSG_SERVER = PATHS.replace("MSG", "ngx.unescape_uri(ngx.var.arg_msg)")


def assert_no_forged_line(log):
    for ln in log.splitlines():
        if "forged by the client" in ln or ln.startswith("2026/01/01"):
            # On the line of a real message, or a traceback line (tab).
            assert REAL_LINE.match(ln) or ln.startswith("\t"), ln


@pytest.mark.asan_fast
@pytest.mark.parametrize("path", [
    "/chunk_thread", "/chunk_sync", "/chunk_set", "/function_name",
    "/ngx_log", "/timer", "/light_thread", "/unix_path", "/capture_var"])
def test_no_log_path_forges_a_line(nginx, path, request):
    request_cleanup = request.addfinalizer
    n = nginx(server=MSG_SERVER, log_level="info")
    query = "?msg=" + urllib.parse.quote(ATTACK)
    if path == "/unix_path":
        # A socket nobody listens on (connect() fails with an error, not
        # a crit) under directories named with the attack text; short
        # enough for sun_path.
        base = tempfile.mkdtemp(dir="/tmp")
        request_cleanup(lambda: shutil.rmtree(base))
        sock_path = os.path.join(base, "x" + ATTACK, "s")
        os.makedirs(os.path.dirname(sock_path))
        s = socket.socket(socket.AF_UNIX)
        s.bind(sock_path)
        s.close()
        # The workers (nobody) may reach it: connect() is refused, not
        # denied.
        d = sock_path
        while d != "/tmp":
            os.chmod(d, 0o777 if d == sock_path else 0o755)
            d = os.path.dirname(d)
        query = "?path=" + urllib.parse.quote(sock_path)
    n.get(path + query)
    # The text reached the log (the path was taken), escaped...
    n.wait_log(r"\\n2026/01/01 \[emerg\] forged by the client\\r\\n")
    # ...and the rest of that log entry is in too (the traceback).
    if path not in ("/ngx_log", "/unix_path", "/capture_var"):
        n.wait_log(r"stack traceback:")
    assert_no_forged_line(n.read_log())


@pytest.mark.parametrize("resolver", [False, True])
def test_resolver_failures_are_not_logged(nginx, resolver):
    """lua-nginx-module logs neither "no resolver defined to resolve NAME"
    nor "NAME could not be resolved": neither do we (the lines carried the
    host name raw). The script gets the error."""
    dns = Dns(lambda name: None)     # NXDOMAIN for every name
    http = f"resolver 127.0.0.1:{dns.port} ipv6=off;" if resolver else ""
    try:
        n = nginx(server=MSG_SERVER, http=http, log_level="info")
        r = n.get("/no_resolver?msg=" + urllib.parse.quote(ATTACK))
        err = ("could not be resolved (3: Host not found)" if resolver
               else "no resolver defined to resolve")
        assert err in r.text and "x\n2026/01/01 [emerg] forged" in r.text
        if resolver:
            assert dns.queries[0][0].startswith("x\n2026/01/01 [emerg]")
    finally:
        dns.close()
    # A later request's line proves the log is written up to here.
    n.get("/ngx_log?msg=end")
    n.wait_log(r"from a named chunk")
    log = n.read_log()
    assert "resolve" not in log
    assert_no_forged_line(log)


def test_traceback_names_are_escaped_in_place(nginx):
    """The chunk name shows escaped on its own traceback line, which
    starts with a tab like every line of a traceback."""
    n = nginx(server=MSG_SERVER)
    n.get("/chunk_thread?msg=" + urllib.parse.quote(ATTACK))
    m = n.wait_log(r"stack traceback:\n((?:\t[^\n]*\n)+)")
    lines = m.group(1).splitlines()
    assert any(ln.startswith("\tx\\n2026/01/01 [emerg] forged by the client"
                             "\\r\\n:1:") for ln in lines), lines
