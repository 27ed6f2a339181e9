"""Request data written to the error log can never forge a line."""

import re
import urllib.parse

import pytest

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
