"""Issue 21, item 3: lua_capture_error_log and ngx.errlog's get_logs /
set_filter_level, as lua-resty-core's ngx/errlog.md and lua-nginx-module's
README document them.

Debian's lua-nginx-module cannot serve as the oracle for the capture
itself: its nginx lacks OpenResty's capture patch, so it refuses the
directive (checked below). The rest of ngx.errlog is compared with it in
test_resty_core.py."""

import re

READ = r"""
    local errlog = require "ngx.errlog"
    local max = tonumber(ngx.var.arg_max)
    local res, err = errlog.get_logs(max)
    if not res then
        ngx.say("ERR ", err)
        return
    end
    for i = 1, #res, 3 do
        ngx.say(res[i], "|", res[i + 1], "|", res[i + 2])
    end
    ngx.say("count ", #res / 3)
"""


def entries(text):
    """(level, time, message) of each captured line in a READ response."""
    out = []
    for line in text.splitlines():
        if line.startswith("count "):
            break
        level, time, msg = line.split("|", 2)
        out.append((int(level), float(time), msg))
    return out


def server(extra=""):
    return f"""
        location = /read {{ content_by_lua_block {{ {READ} }} }}
        location = /log {{ content_by_lua_block {{
            ngx.log(ngx.ERR, "first ", ngx.var.arg_tag)
            ngx.log(ngx.WARN, "two\\nlines ", ngx.var.arg_tag)
            ngx.log(ngx.INFO, "third ", ngx.var.arg_tag)
            require("ngx.errlog").raw_log(ngx.NOTICE, "raw " .. ngx.var.arg_tag)
            ngx.say(ngx.now())
        }} }}
        location = /static {{ }}
        {extra}"""


def test_reference_needs_a_patched_nginx(nginx_conf):
    """What the oracle says on Debian's nginx; luaguard needs no patch."""
    ok, out = nginx_conf(module="reference",
                         http="lua_capture_error_log 4k;").test_config()
    assert not ok and "missing the capture error log patch" in out
    ok, out = nginx_conf(http="lua_capture_error_log 4k;").test_config()
    assert ok, out


def test_lines_are_the_error_log_lines(nginx):
    n = nginx(http="lua_capture_error_log 64k;\n"
              "init_worker_by_lua_block { ngx.log(ngx.WARN, 'from iw') }",
              server=server())
    now = float(n.get("/log?tag=A").text)
    n.get("/static")            # nginx's own line: open() ... failed
    got = entries(n.get("/read?max=0").text)
    file_lines = n.read_log().splitlines()
    msgs = [m for _, _, m in got]
    for needle, level in (("from iw", 5), ("first A", 4),
                          ("two\\nlines A", 5), ("third A", 7),
                          (" raw A,", 6), ('open() "', 4)):
        hits = [e for e in got if needle in e[2]]
        assert len(hits) == 1, (needle, msgs)
        lvl, t, msg = hits[0]
        assert lvl == level
        # the very line the file got (the file's Lua text is escaped:
        # the newline arrives as \n, never as a line break)
        assert msg in file_lines
        assert "\n" not in msg
        if needle != "from iw":
            assert abs(t - now) < 5
    raw = [m for m in msgs if " raw A," in m][0]
    assert "[lua]" not in raw
    # get_logs removed what it returned
    assert n.get("/read?max=0").text.endswith("count 0\n") or all(
        "first A" not in m for _, _, m in entries(n.get("/read").text))


def test_max_res_table_and_removal(nginx):
    n = nginx(http="lua_capture_error_log 64k;", server=server("""
        location = /many { content_by_lua_block {
            for i = 1, 25 do ngx.log(ngx.ERR, "n=", i, ";") end
            local errlog = require "ngx.errlog"
            local function nums(res)
                local t, i = {}, 1
                while res[i] ~= nil do     -- get_logs' documented loop
                    t[#t + 1] = res[i + 2]:match("n=(%d+);") or "-"
                    i = i + 3
                end
                return table.concat(t, ",")
            end
            ngx.say(nums(errlog.get_logs()))           -- default: 10
            ngx.say(nums(errlog.get_logs(3)))
            local mine = { "x", "x", "x", "x", "x", "x", "x", "x", "x", "x" }
            local res = errlog.get_logs(2, mine)
            ngx.say(res == mine, " ", nums(res), " ", mine[10])
            ngx.say(nums(errlog.get_logs(-1)))
            ngx.say(#errlog.get_logs(0))
            ngx.say(pcall(errlog.get_logs, "x"))
        } }"""))
    lines = n.get("/many").text.splitlines()
    # ten by default; nginx's own lines (an earlier connection's) may
    # come first
    first = lines[0].split(",")
    assert len(first) == 10 and first[-1] != "-"
    got = [x for x in first if x != "-"]
    assert got == [str(i) for i in range(1, len(got) + 1)]
    rest = list(range(len(got) + 1, 26))
    assert lines[1] == ",".join(map(str, rest[:3]))
    # the caller's table is filled from 1, a nil after the last message
    assert lines[2] == "true " + ",".join(map(str, rest[3:5])) + " x"
    assert lines[3] == ",".join(map(str, rest[5:]))
    assert lines[4] == "0"
    assert lines[5].startswith("false") and \
        "attempt to perform arithmetic on local 'max'" in lines[5]


def test_oldest_lines_are_dropped_when_full(nginx):
    n = nginx(http="lua_capture_error_log 4k;", server=server("""
        location = /flood { content_by_lua_block {
            for i = 1, 100 do ngx.log(ngx.ERR, "flood ", i, " end") end
            ngx.say("ok")
        } }"""))
    n.get("/flood")
    got = entries(n.get("/read?max=0").text)
    nums = [int(re.search(r"flood (\d+) end", m).group(1))
            for _, _, m in got if "flood " in m]
    # the newest kept, in order, the oldest gone; what is kept fits 4k
    assert nums and nums[-1] == 100
    assert nums == list(range(nums[0], 101))
    assert 5 < len(nums) < 50
    assert sum(len(m) for _, _, m in got) <= 4096


def test_filter_level_from_init_and_per_worker(nginx):
    http = """lua_capture_error_log 64k;
        init_by_lua_block {
            local errlog = require "ngx.errlog"
            assert(errlog.set_filter_level(ngx.WARN))
            local ok, err = errlog.set_filter_level(99)
            assert(not ok and err == "bad log level", err)
        }"""
    n = nginx(http=http, server=server("""
        location = /lower { content_by_lua_block {
            local errlog = require "ngx.errlog"
            ngx.say(errlog.get_sys_filter_level())
            ngx.say(errlog.set_filter_level(ngx.INFO))
        } }"""))
    n.get("/log?tag=B")
    msgs = [m for _, _, m in entries(n.get("/read?max=0").text)]
    assert any("first B" in m for m in msgs)
    assert any("two\\nlines B" in m for m in msgs)
    # info and notice lines are filtered out of the buffer, not the file
    assert not any("third B" in m or " raw B," in m for m in msgs)
    assert "third B" in n.read_log()
    assert n.get("/lower").text == "7\ntrue\n"
    n.get("/log?tag=C")
    msgs = [m for _, _, m in entries(n.get("/read?max=0").text)]
    assert any("third C" in m for m in msgs)


def test_without_the_directive(nginx):
    n = nginx(server=server("""
        location = /sfl { content_by_lua_block {
            ngx.say(require("ngx.errlog").set_filter_level(ngx.ERR))
        } }"""))
    assert n.get("/read").text == \
        'ERR directive "lua_capture_error_log" is not set\n'
    assert n.get("/sfl").text == \
        'nildirective "lua_capture_error_log" is not set\n'


def test_a_lua_vm_reads_only_its_own_lines(nginx):
    vm_loc = """
        location = /{name}/log {{ lua_vm {name}; content_by_lua_block {{
            ngx.log(ngx.ERR, "secret of {name}")
            ngx.say("ok")
        }} }}
        location = /{name}/read {{ lua_vm {name}; content_by_lua_block {{
            {read}
        }} }}"""
    extra = "".join(vm_loc.format(name=v, read=READ) for v in ("ta", "tb"))
    n = nginx(http="lua_capture_error_log 64k;", server=server(extra))
    for v in ("ta", "tb"):
        n.get(f"/{v}/log")
    n.get("/log?tag=D")
    n.get("/static")
    ta = n.get("/ta/read?max=0").text
    tb = n.get("/tb/read?max=0").text
    default = n.get("/read?max=0").text
    assert "secret of ta" in ta and "secret of tb" not in ta
    assert "secret of tb" in tb and "secret of ta" not in tb
    # nginx's own lines and the default VM's stay with the default VM
    assert "first D" not in ta + tb and 'open() "' not in ta + tb
    assert "first D" in default and 'open() "' in default
    assert "secret of" not in default


def test_strict_request_code_cannot_read_or_filter_the_buffer(nginx):
    n = nginx(http="lua_capture_error_log 64k;", server=server("""
        location = /strict { lua_sandbox strict; content_by_lua_block {
            local errlog = require "ngx.errlog"
            ngx.say(pcall(errlog.get_logs))
            ngx.say(pcall(errlog.set_filter_level, ngx.ERR))
        } }"""))
    n.get("/log?tag=E")
    lines = n.get("/strict").text.splitlines()
    assert len(lines) == 2
    for line, fname in zip(lines, ("get_logs", "set_filter_level")):
        assert line.startswith("false") and (
            f"ngx.errlog.{fname} is not allowed in lua_sandbox strict"
            in line), line
    # the buffer was neither read nor filtered
    msgs = [m for _, _, m in entries(n.get("/read?max=0").text)]
    assert any("third E" in m for m in msgs)
