"""The foundation's directives and the API's phase rules, end to end:
handler ordering (`*_no_postpone`), worker life cycle with 1 and 2
workers, `lua_code_cache off`, code blocks longer than nginx's 4 KiB read
buffer, `nginx -T`, syntax errors at `nginx -t`, and which API each phase
allows, compared with lua-nginx-module."""

import re
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from harness import Nginx

MODULES = ["luaguard", "reference"]


@pytest.fixture
def server():
    """Like conftest's `nginx`, with the prefix outside pytest's private
    temporary directory: the workers (nobody) read Lua files from it."""
    started = []
    base = Path(tempfile.mkdtemp(prefix="luaguard-foundation-"))
    base.chmod(0o755)

    def make(start=True, **kw):
        n = Nginx(base / f"n{len(started)}", **kw)
        for p in [n.prefix, *n.prefix.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o055)
        started.append(n)
        return n.start() if start else n

    yield make
    problems = []
    for n in started:
        try:
            n.stop()
        except RuntimeError as e:
            problems.append(str(e))
        problems += [f"{n.prefix}: {ln}" for ln in n.fatal_lines()]
    if problems:
        pytest.fail("nginx reported problems:\n" + "\n".join(problems[:20]))
    shutil.rmtree(base, ignore_errors=True)


# ---- *_by_lua_no_postpone: order against the rewrite and access modules --

ORDER_SERVER = r"""
        location /rw {
            set $a "from set";
            rewrite_by_lua_block { ngx.ctx.seen = ngx.var.a }
            set $a "from second set";
            content_by_lua_block { ngx.say(ngx.ctx.seen) }
        }
        location /acc {
            deny all;
            access_by_lua_block { ngx.say("lua ran first") ngx.exit(200) }
            content_by_lua_block { ngx.say("content") }
        }
"""


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("no_postpone", [False, True])
def test_no_postpone_order(server, module, no_postpone):
    flag = "on" if no_postpone else "off"
    n = server(module=module, server=ORDER_SERVER,
               http=f"rewrite_by_lua_no_postpone {flag};\n"
                    f"access_by_lua_no_postpone {flag};")
    r = n.get("/rw")
    acc = n.get("/acc")
    if no_postpone:
        # Lua runs before the rewrite module's script and before deny.
        assert r.text == "\n"
        assert (acc.status, acc.text) == (200, "lua ran first\n")
    else:
        assert r.text == "from second set\n"
        assert acc.status == 403


# ---- worker life cycle ----

LIFECYCLE_HTTP = r"""
    init_by_lua_block {
        require "resty.core"
        INIT_PID = ngx.worker.pid()
        local ok, err = pcall(require, "ngx.absent")
        SEMA = ok and "loaded" or err
    }
    init_worker_by_lua_block {
        ngx.log(ngx.NOTICE, "INITWORKER id=", ngx.worker.id(),
                " count=", ngx.worker.count(), " phase=", ngx.get_phase())
    }
    exit_worker_by_lua_block {
        ngx.log(ngx.NOTICE, "EXITWORKER id=", ngx.worker.id(),
                " exiting=", ngx.worker.exiting(), " phase=",
                ngx.get_phase())
    }
"""

LIFECYCLE_SERVER = r"""
        location /w {
            content_by_lua_block {
                ngx.say(ngx.worker.id(), " ", ngx.worker.count(), " ",
                        ngx.worker.pid() ~= INIT_PID, " ",
                        ngx.worker.exiting())
            }
        }
        location /sema { content_by_lua_block { ngx.say(SEMA) } }
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("workers", [1, 2])
def test_worker_lifecycle(server, module, workers):
    n = server(module=module, workers=workers, http=LIFECYCLE_HTTP,
               server=LIFECYCLE_SERVER)
    for i in range(workers):
        n.wait_log(rf"INITWORKER id={i} count={workers} phase=init_worker")
    seen = set()
    for _ in range(20 * workers):
        text = n.get("/w").text
        wid, count, other_pid, exiting = text.split()
        assert (count, other_pid, exiting) == (str(workers), "true", "false")
        seen.add(int(wid))
    assert seen <= set(range(workers))
    n.stop()
    log = n.read_log()
    ids = sorted(int(m) for m in re.findall(
        r"EXITWORKER id=(\d+) exiting=true phase=exit_worker", log))
    assert ids == list(range(workers)), log[-2000:]
    assert len(re.findall(r"INITWORKER", log)) == workers


@pytest.mark.parametrize("module", MODULES)
def test_main_level_files(server, module):
    n = server(module=module, workers=2, http=r"""
        init_by_lua_file lua/init.lua;
        init_worker_by_lua_file lua/iw.lua;
        exit_worker_by_lua_file lua/exit.lua;
    """, server=r"""
        location /f {
            content_by_lua_block {
                ngx.say(FROM_INIT, " ", ngx.config.prefix())
            }
        }
    """, files={
        "lua/init.lua": 'FROM_INIT = "init:" .. ngx.get_phase()\n',
        "lua/iw.lua": 'ngx.log(ngx.NOTICE, "IWFILE ", ngx.worker.id())\n',
        "lua/exit.lua": 'ngx.log(ngx.NOTICE, "EXITFILE ", ngx.worker.id())\n',
    })
    n.wait_log(r"IWFILE 0")
    n.wait_log(r"IWFILE 1")
    assert n.get("/f").text == f"init:init {n.prefix}/\n"
    n.stop()
    assert sorted(re.findall(r"EXITFILE (\d)", n.read_log())) == ["0", "1"]


@pytest.mark.parametrize("module", MODULES)
def test_reload_runs_exit_and_init_worker(server, module):
    n = server(module=module, http=LIFECYCLE_HTTP, server=LIFECYCLE_SERVER)
    n.wait_log(r"INITWORKER id=0")
    old = n.worker_pids()
    n.reload()
    n.wait_log(rf"\[notice\] {old[0]}#\d+: .*EXITWORKER id=0 exiting=true")
    n.wait_log(r"INITWORKER[\s\S]*INITWORKER id=0")
    assert n.get("/w").text.split()[0] == "0"


def test_missing_ngx_module_is_a_clear_error(server):
    n = server(http=LIFECYCLE_HTTP, server=LIFECYCLE_SERVER)
    assert n.get("/sema").text == (
        "module 'ngx.absent' is not implemented in luaguard yet\n")


# ---- lua_code_cache off: a changed file is reloaded on the next request --

def test_code_cache_off_reloads(server):
    # Ours only: the reference logs an [alert] for lua_code_cache off.
    n = server(server=r"""
        location /off { lua_code_cache off; content_by_lua_file lua/cc.lua; }
        location /on { content_by_lua_file lua/cc.lua; }
        location /rw {
            lua_code_cache off;
            rewrite_by_lua_file lua/rw.lua;
            content_by_lua_block { ngx.say(ngx.ctx.v) }
        }
    """, files={"lua/cc.lua": 'ngx.say("v1")\n',
                "lua/rw.lua": 'ngx.ctx.v = "r1"\n'})
    assert n.get("/off").text == "v1\n"
    assert n.get("/on").text == "v1\n"
    assert n.get("/rw").text == "r1\n"
    (n.prefix / "lua/cc.lua").write_text('ngx.say("v2")\n')
    (n.prefix / "lua/rw.lua").write_text('ngx.ctx.v = "r2"\n')
    assert n.get("/off").text == "v2\n"
    assert n.get("/on").text == "v1\n"  # cached
    assert n.get("/rw").text == "r2\n"
    # A file that stops compiling fails its request only.
    (n.prefix / "lua/cc.lua").write_text('ngx.say("v3"\n')
    assert n.get("/off").status == 500
    n.wait_log(r"lua/cc\.lua:\d+: .*expected")
    assert n.get("/on").text == "v1\n"


# ---- code longer than nginx's 4 KiB configuration buffer; nginx -T ----

def big_block(long_token):
    filler = "\n".join(f"            -- filler line {i} }} {{ ]] '\""
                       for i in range(200))
    long_string = "[[" + "x" * 5000 + "]]" if long_token \
        else '("x"):rep(5000)'
    return (f"content_by_lua_block {{\n{filler}\n"
            f"            local s = {long_string}\n"
            f"            local t = {{ '}}', \"{{\" }}\n"
            f"            ngx.say(#s, t[1], t[2])\n"
            f"        }}")


@pytest.mark.parametrize("module,long_token", [
    ("luaguard", True), ("luaguard", False), ("reference", False)])
def test_block_longer_than_buffer(server, module, long_token):
    # One token longer than the buffer: lua-nginx-module refuses it ("the
    # inlined Lua code may be too long"); luaguard reads it.
    block = big_block(long_token)
    assert len(block) > 2 * 4096
    conf = f"""
        location /big {{
            {block}
        }}
        location /after {{ content_by_lua_block {{ ngx.say("after") }} }}
        location /err {{
            {block.replace("ngx.say(#s", "error('deep') ngx.say(#s")}
        }}
    """
    n = server(module=module, server=conf)
    assert n.get("/big").text == "5000}{\n"
    assert n.get("/after").text == "after\n"
    assert n.get("/err").status == 500
    # The line numbers stay right across buffer refills.
    n.wait_log(r"content_by_lua\(nginx\.conf:\d+\):204: deep")
    dump = n.cmd("-T").stdout
    assert block in dump
    assert 'location /after { content_by_lua_block { ngx.say("after") } }' \
        in dump


# ---- nginx -t: syntax errors name the file and the line ----

@pytest.mark.asan_fast
@pytest.mark.parametrize("directive", [
    "content_by_lua_block", "rewrite_by_lua_block", "access_by_lua_block",
    "log_by_lua_block", "header_filter_by_lua_block",
    "body_filter_by_lua_block", "set_by_lua_block $v"])
def test_syntax_error_fails_nginx_t(server, directive):
    n = server(start=False, server=f"""
        location /x {{
            {directive} {{
                local a = 1
                local b = = 2
            }}
        }}
    """)
    ok, out = n.test_config()
    assert not ok
    line = n.conf.splitlines().index("                local b = = 2") + 1
    assert re.search(rf"\[emerg\].*in {re.escape(str(n.conf_path))}:{line}\b",
                     out), out
    assert "unexpected symbol near '='" in out, out


@pytest.mark.parametrize("conf", [
    "init_by_lua_block { local x = }",
    "init_worker_by_lua 'if then';",
])
def test_syntax_error_main_level(server, conf):
    # The reference only notices these at start; luaguard at nginx -t.
    n = server(start=False, http=conf)
    ok, out = n.test_config()
    assert not ok and "nginx.conf:" in out, out


@pytest.mark.parametrize("module", MODULES)
def test_init_error_stops_startup(server, module):
    n = server(start=False, module=module,
               http='init_by_lua_block { error("init boom") }')
    r = n.cmd(check=False)
    out = r.stderr + n.read_log()
    assert r.returncode != 0
    assert re.search(r"init_by_lua\(nginx\.conf:\d+\):1: init boom", out), out


@pytest.mark.parametrize("module", MODULES)
def test_init_worker_error_keeps_serving(server, module):
    n = server(module=module, workers=2,
               http='init_worker_by_lua_block { error("iw boom") }',
               server='location /x { content_by_lua_block { ngx.say(1) } }')
    n.wait_log(r"init_worker_by_lua\(nginx\.conf:\d+\):1: iw boom")
    assert n.get("/x").text == "1\n"


@pytest.mark.parametrize("module", MODULES)
def test_cache_helpers_run_no_lua(server, module):
    # The cache manager and loader are nginx processes too: init_worker
    # does not run in them, and they exit cleanly (the fixture fails the
    # test on a process that "exited on signal").
    n = server(module=module, main="user root;", http="""
        proxy_cache_path cache keys_zone=c:1m;
        init_worker_by_lua_block {
            ngx.log(ngx.WARN, "init worker ", ngx.worker.pid())
        }""", server='location /x { content_by_lua_block { ngx.say(1) } }')
    n.wait_log(r"start cache loader process")
    assert n.get("/x").text == "1\n"
    n.stop()
    lines = re.findall(r"init worker (\d+)", n.read_log())
    assert len(lines) == 1, lines
    assert "cache manager process" in n.read_log()


def test_syntax_error_legacy_string(server):
    n = server(start=False, server="""
        location /x {
            content_by_lua 'local a = 1
                            local b = = 2';
        }
    """)
    ok, out = n.test_config()
    assert not ok
    line = next(i for i, ln in enumerate(n.conf.splitlines(), 1)
                if "local b = = 2" in ln)
    assert re.search(rf"in {re.escape(str(n.conf_path))}:{line}\b", out), out


def test_unclosed_block(server):
    n = server(start=False, server="""
        location /x {
            content_by_lua_block {
                local s = "}"
    """)
    ok, out = n.test_config()
    assert not ok
    assert "[emerg]" in out, out


# ---- the API allowed in each phase, against lua-nginx-module ----

PROBE_HTTP = r"""
    init_by_lua_block {
        require "resty.core"
        local probes = {
            say = function() return ngx.say("") end,
            print = function() return ngx.print("") end,
            flush = function() return ngx.flush() end,
            eof = function() return ngx.eof() end,
            send_headers = function() return ngx.send_headers() end,
            exit = function() return ngx.exit(ngx.OK) end,
            exec = function() return ngx.exec("/x") end,
            redirect = function() return ngx.redirect("/x") end,
            sleep = function() return ngx.sleep(0) end,
            var = function() return ngx.var.uri end,
            header_get = function() return ngx.header["X-Probe"] end,
            header_set = function() ngx.header["X-Probe"] = "1" end,
            status_get = function() return ngx.status end,
            status_set = function() ngx.status = 200 end,
            ctx = function() return ngx.ctx end,
            headers_sent = function() return ngx.headers_sent end,
            arg_set = function() ngx.arg[1] = "x" end,
            arg_get = function() return ngx.arg[1] end,
            is_subrequest = function() return ngx.is_subrequest end,
            worker_id = function() assert(ngx.worker.id() ~= false) end,
        }
        function PROBE(names)
            local out = {}
            for name in names:gmatch("%S+") do
                local ok, err = pcall(probes[name])
                if ok then
                    out[#out + 1] = name .. "=ok"
                else
                    err = tostring(err):gsub("^.-:%d+: ", "")
                    out[#out + 1] = name .. "=" .. err
                end
            end
            return table.concat(out, "; ")
        end
        NOREQ = "say print eof send_headers exec redirect sleep var "
                .. "header_get header_set status_get status_set ctx "
                .. "headers_sent arg_get is_subrequest worker_id"
        -- Not ngx.flush: lua-nginx-module 0.10.23 crashes on it here.
        INIT_PROBE = PROBE(NOREQ .. " exit")
    }
    init_worker_by_lua_block {
        WORKER_PROBE = PROBE(NOREQ .. " flush exit")
    }
    exit_worker_by_lua_block {
        ngx.log(ngx.ERR, "PROBE exit_worker ", PROBE(NOREQ .. " flush exit"))
    }
"""

PROBE_SERVER = r"""
        location /probe {
            set_by_lua_block $p {
                ngx.log(ngx.ERR, "PROBE set ", PROBE(NOREQ .. " exit flush"))
            }
            rewrite_by_lua_block {
                ngx.log(ngx.ERR, "PROBE rewrite ", PROBE("arg_set arg_get"))
            }
            header_filter_by_lua_block {
                ngx.log(ngx.ERR, "PROBE header_filter ", PROBE(
                    "say print flush eof send_headers exec redirect sleep "
                    .. "var header_get header_set status_get status_set ctx "
                    .. "headers_sent arg_get"))
            }
            body_filter_by_lua_block {
                if ngx.arg[2] then
                    ngx.log(ngx.ERR, "PROBE body_filter ",
                            PROBE(NOREQ .. " exit flush"))
                end
            }
            log_by_lua_block {
                ngx.log(ngx.ERR, "PROBE log ", PROBE(NOREQ .. " exit flush"))
            }
            content_by_lua_block {
                ngx.say("init: ", INIT_PROBE)
                ngx.say("init_worker: ", WORKER_PROBE)
                ngx.say("content: ", PROBE("arg_set arg_get"))
            }
        }
"""


def probe_run(server, module):
    """{(phase, api): "ok" or the error} from every phase."""
    n = server(module=module, http=PROBE_HTTP, server=PROBE_SERVER)
    body = n.get("/probe").text
    n.wait_log(r"PROBE log ")
    n.stop()
    lines = re.findall(r"^(\w+): (.*)$", body, re.M)
    lines += re.findall(r"PROBE (\w+) (.*?)(?:, client: |, context: |\n|$)",
                        n.read_log())
    table = {}
    for phase, results in lines:
        for item in results.split("; "):
            api, _, result = item.partition("=")
            table[(phase, api)] = result.replace(" while logging request", "")
    return table


def test_api_phase_table(server):
    ours = probe_run(server, "luaguard")
    ref = probe_run(server, "reference")
    assert len(ours) > 100 and set(ours) == set(ref)
    diffs = {k: (ours[k], ref[k]) for k in ours if ours[k] != ref[k]}
    assert not diffs, "\n".join(f"{k}: {v}" for k, v in sorted(diffs.items()))
    # The table really covers disabled calls in every phase.
    for phase in ("init_worker", "set", "header_filter", "body_filter",
                  "log", "exit_worker"):
        assert ours[(phase, "say")] == \
            f"API disabled in the context of {phase}_by_lua*"
    assert ours[("init", "say")] == "no request object found"


# ---- ngx.flush(true) against a client that stops reading ----

@pytest.mark.parametrize("module", MODULES)
def test_flush_wait_times_out(server, module):
    # Building and printing 16 MB takes more than the default 1 s slice of
    # wall time on a loaded machine; the slice is not what is tested here.
    n = server(module=module,
               http="lua_budget_slice 60s;" if module == "luaguard" else "",
               server=r"""
        location /slow {
            send_timeout 1s;
            content_by_lua_block {
                ngx.print(string.rep("x", 16 * 1024 * 1024))
                local ok, err = ngx.flush(true)
                ngx.log(ngx.ERR, "FLUSHRES ", ok, " ", err)
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
    """)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", n.port))
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        n.wait_log(r"FLUSHRES nil timeout")
    finally:
        s.close()
    assert n.get("/ok").text == "ok\n"
