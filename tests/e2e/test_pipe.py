"""ngx.pipe (lua-resty-core's ngx/pipe.md): spawning commands and talking
to them over non-blocking pipes, and the hardening around it
(docs/security.md, "Processes: ngx.pipe").

Debian's lua-nginx-module has no ngx.pipe (its nginx lacks OpenResty's
socket_cloexec patch: `require "ngx.pipe"` fails there, checked below), so
the API is checked against its documentation rather than side by side."""

import os
import time
from pathlib import Path

import pytest

ECOSYSTEM = Path(__file__).resolve().parents[3] / "shared" / "ecosystem"


def lua_location(path, code, extra=""):
    return f"""
        location = {path} {{
            {extra}
            content_by_lua_block {{
{code}
            }}
        }}"""


def serve(nginx, locations, http="", main="", **kw):
    server = "".join(lua_location(p, c) for p, c in locations.items())
    return nginx(server=server, http=http, main=main, **kw)


def proc_state(pid):
    """The state letter of /proc/PID/stat, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wait_gone(pid, timeout=10, zombie_ok=False):
    """Waits until `pid` no longer runs: gone, or (`zombie_ok`, for a
    process orphaned to PID 1, which reaps when it likes) a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = proc_state(pid)
        if st is None or (zombie_ok and st in ("Z", "X")):
            return st
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still there: {proc_state(pid)}")


def children_of(pid):
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


# ---- the API as documented ----

API = {
    "/wc": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"wc", "-c"})
        for _, s in ipairs({("1234"):rep(2048), "abc"}) do
            assert(proc:write(s))
        end
        assert(proc:shutdown("stdin"))
        ngx.say(proc:stdout_read_line())
        ngx.say(proc:wait())
    """,
    "/status": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn("exit 2")
        ngx.say(proc:wait())
        ngx.say(proc:wait())
        proc = ngx_pipe.spawn({"sh", "-c", "kill -9 $$"})
        ngx.say(proc:wait())
        ngx.say(proc:kill(9))
    """,
    "/reads": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"printf", "one\r\ntwo\nthree"})
        ngx.say(proc:stdout_read_line())
        ngx.say(proc:stdout_read_bytes(2))
        ngx.say(proc:stdout_read_any(100))
        ngx.say(proc:stdout_read_line())
        ngx.say(proc:stdout_read_all())
        proc = ngx_pipe.spawn({"printf", "abc"})
        ngx.say(proc:stdout_read_bytes(5))
        proc = ngx_pipe.spawn({"printf", "all of it"})
        ngx.say(proc:stdout_read_all())
        ngx.say(proc:stdout_read_all())
        proc = ngx_pipe.spawn({"printf", "0123456789"}, {buffer_size = 3})
        ngx.say(proc:stdout_read_any(4))
        ngx.say(proc:stdout_read_all())
    """,
    "/stderr": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c", ">&2 echo err; echo out"})
        ngx.say(proc:stderr_read_line(), " ", proc:stdout_read_line())
        proc = ngx_pipe.spawn({"sh", "-c", ">&2 echo data"},
                              {merge_stderr = true})
        ngx.say(proc:stdout_read_all())
        ngx.say(proc:stderr_read_all())
        ngx.say(proc:stderr_read_line())
        ngx.say(proc:shutdown("stderr"))
        ngx.say(proc:shutdown("stdout"), " ", proc:shutdown("stdout"))
        ngx.say(proc:stdout_read_line())
    """,
    "/timeouts": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sleep", "10"})
        proc:set_timeouts(nil, 50, nil, 60)
        ngx.say(proc:stdout_read_line())
        ngx.say(proc:wait())
        proc = ngx_pipe.spawn({"sleep", "10"}, {stdout_read_timeout = 40})
        ngx.say(proc:stdout_read_all())
        ngx.say(proc:kill(15))
        ngx.say(proc:wait())
        ngx.say(proc:kill(15))
        ngx.say(proc:kill(-3))
        ngx.say(pcall(proc.kill, proc, "TERM"))
    """,
    "/busy": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c", "read x; echo got $x"})
        local t = ngx.thread.spawn(function()
            return proc:stdout_read_line()
        end)
        local w = ngx.thread.spawn(function() return proc:wait() end)
        ngx.say(proc:stdout_read_line())
        ngx.say(proc:wait())
        assert(proc:write({"hel", {"lo"}, "\n"}))
        ngx.say(select(2, ngx.thread.wait(t)))
        ngx.say(select(2, ngx.thread.wait(w)))
    """,
    "/abort": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sleep", "10"})
        local t = ngx.thread.spawn(function()
            return proc:stdout_read_all()
        end)
        ngx.say(proc:shutdown("stdout"))
        ngx.say(select(2, ngx.thread.wait(t)))
        ngx.say(proc:stdout_read_all())
        ngx.say(proc:shutdown("stdin"), " ", proc:write("x"))
    """,
    "/env": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"env"})
        ngx.print(proc:stdout_read_all())
        ngx.say("--")
        proc = ngx_pipe.spawn({"/usr/bin/env"},
                              {environ = {"A=1", "PATH=/nowhere"}})
        ngx.print(proc:stdout_read_all())
    """,
    "/errors": r"""
        local ngx_pipe = require "ngx.pipe"
        ngx.say(ngx_pipe.spawn({"/nonexistent/cmd"}))
        ngx.say(ngx_pipe.spawn({"no-such-command-here"}))
        for _, bad in ipairs({
            function() return ngx_pipe.spawn() end,
            function() return ngx_pipe.spawn({}) end,
            function() return ngx_pipe.spawn({"ls", 1}) end,
            function() return ngx_pipe.spawn({"ls"}, "x") end,
            function() return ngx_pipe.spawn({"ls"}, {environ = "x"}) end,
            function() return ngx_pipe.spawn({"ls"}, {wait_timeout = -1}) end,
            function()
                return ngx_pipe.spawn({"ls"}):shutdown("stdio")
            end,
        }) do
            ngx.say(select(2, pcall(bad)))
        end
    """,
    "/pid": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c", "echo $$"})
        ngx.say(tonumber(proc:stdout_read_line()) == proc:pid())
        ngx.say(ngx_pipe.version)
    """,
}


@pytest.fixture
def api(nginx):
    return serve(nginx, API)


def lines(n, path):
    r = n.get(path)
    assert r.status == 200, (path, r, n.read_log()[-3000:])
    return r.text.splitlines()


@pytest.mark.asan_fast
def test_count_chars_with_wc(api):
    # ngx/pipe.md's synopsis: wc only answers once its stdin is closed
    assert lines(api, "/wc") == [str(4 * 2048 + 3), "trueexit0"]


def test_wait_reports_exit_codes_and_signals(api):
    assert lines(api, "/status") == [
        "falseexit2", "nilexited", "falsesignal9", "nilexited"]


def test_read_modes(api):
    # read_any hands out what is buffered (up to max); once a read met
    # the end, every read answers "closed"
    assert lines(api, "/reads") == [
        "one", "tw", "o", "three", "nilclosed", "nilclosed",
        "nilclosedabc", "all of it", "nilclosed", "012", "3456789"]


def test_stderr_and_merge(api):
    assert lines(api, "/stderr") == [
        "err out", "data", "", "nilmerged to stdout", "nilmerged to stdout",
        "nilmerged to stdout", "true true", "nilclosed"]


def test_timeouts_and_kill(api):
    assert lines(api, "/timeouts") == [
        "niltimeout", "niltimeout", "niltimeout", "true", "falsesignal15",
        "nilexited", "nilexited",
        "falsebad signum argument: number expected, got string"]


def test_one_reader_and_one_waiter_at_a_time(api):
    assert lines(api, "/busy") == [
        "nilpipe busy reading", "nilpipe busy waiting", "got hello",
        "trueexit0"]


def test_shutdown_aborts_a_waiting_reader(api):
    assert lines(api, "/abort") == ["true", "nilaborted", "nilclosed",
                                    "true nilclosed"]


def test_spawn_errors(api):
    got = lines(api, "/errors")
    assert got[0] == "nilexec failed: no such file or directory"
    assert got[1] == "nilexec failed: no such file or directory"
    assert got[2:] == [
        "bad args arg: table expected, got nil",
        "bad args arg: non-empty table expected",
        "bad args arg: string expected at index 2, got number",
        "bad opts arg: table expected, got string",
        "bad environ option: table expected, got string",
        "bad wait_timeout: non-negative number expected",
        "bad shutdown arg: stdio"]


def test_pid_is_the_commands(api):
    assert lines(api, "/pid") == ["true", "0.1.25"]
    log = api.read_log()
    assert 'lua pipe spawned process ' in log
    assert '"sh" "-c" "echo $$"' in log


def test_reference_has_no_ngx_pipe(nginx):
    """Why there is no side-by-side run: Debian's lua-nginx-module cannot
    load lua-resty-core's ngx.pipe (its FFI functions are missing)."""
    code = r"""
        local ok, err = pcall(require, "ngx.pipe")
        ngx.say(ok)
    """
    ref = serve(nginx, {"/t": code}, module="reference",
                http='lua_package_path "/usr/share/lua/5.1/?.lua;;";')
    assert lines(ref, "/t") == ["false"]
    ours = serve(nginx, {"/t": code})
    assert lines(ours, "/t") == ["true"]


def test_phases(nginx):
    n = nginx(server=r"""
        location = /log {
            content_by_lua_block { ngx.say("ok") }
            log_by_lua_block {
                local proc = require("ngx.pipe").spawn({"true"})
                ngx.log(ngx.ERR, "spawned in log: ", type(proc), " ",
                        select(2, pcall(proc.wait, proc)))
            }
        }
        location = /timer {
            content_by_lua_block {
                local sema = require("ngx.semaphore").new()
                local out
                ngx.timer.at(0, function()
                    local proc = require("ngx.pipe").spawn({"echo", "t"})
                    out = proc:stdout_read_line()
                    sema:post()
                end)
                sema:wait(5)
                ngx.say(out)
            }
        }
""", http=r"""
        init_by_lua_block {
            local ok, err = pcall(require("ngx.pipe").spawn, {"true"})
            INIT = err
        }
""")
    n2 = serve(nginx, {"/init": "ngx.say(INIT)"}, http=r"""
        init_by_lua_block {
            INIT = select(2, pcall(require("ngx.pipe").spawn, {"true"}))
        }""")
    assert "API disabled in the context of init_by_lua*" in \
        n2.get("/init").text
    assert lines(n, "/timer") == ["t"]
    assert lines(n, "/log") == ["ok"]
    n.wait_log(r"spawned in log: userdata API disabled in the context "
               r"of log_by_lua\*")


# ---- hardening (docs/security.md) ----

def test_strict_profile_refuses_spawn(nginx):
    n = serve(nginx, {
        "/strict": 'ngx.say(select(2, pcall(require("ngx.pipe").spawn, '
                   '{"true"})))',
    }, http="lua_sandbox strict;")
    assert "capability 'pipe' is not allowed in this location " \
           "(lua_sandbox strict)" in n.get("/strict").text
    n2 = nginx(server=r"""
        location = /off {
            lua_sandbox default -pipe;
            content_by_lua_block {
                ngx.say(select(2, pcall(require("ngx.pipe").spawn, {"true"})))
            }
        }
        location = /granted {
            lua_sandbox strict +pipe;
            content_by_lua_block {
                ngx.say(require("ngx.pipe").spawn({"echo", "hi"})
                        :stdout_read_line())
            }
        }""")
    assert "capability 'pipe' is not allowed in this location " \
           "(lua_sandbox default -pipe)" in n2.get("/off").text
    assert n2.get("/granted").text == "hi\n"


def test_environment_is_not_the_workers(nginx):
    n = serve(nginx, {"/env": API["/env"]}, main="env SECRET_TOKEN=hunter2;")
    text = n.get("/env").text
    default, given = text.split("--\n")
    assert "hunter2" not in text and "SECRET_TOKEN" not in text
    assert [ln.split("=")[0] for ln in default.splitlines()] == ["PATH"]
    assert given.splitlines() == ["A=1", "PATH=/nowhere"]


def test_child_has_only_its_standard_fds(nginx):
    # cat waits on its stdin; ls lists cat's descriptors from the side
    n = serve(nginx, {"/fds": r"""
        local ngx_pipe = require "ngx.pipe"
        -- a cosocket and a file open in the worker at spawn time
        local sock = ngx.socket.tcp()
        assert(sock:connect("127.0.0.1", ngx.var.server_port))
        local f = assert(io.open("/dev/null"))
        local cat = ngx_pipe.spawn({"cat"})
        local ls = ngx_pipe.spawn({"ls", "/proc/" .. cat:pid() .. "/fd"})
        ngx.print(ls:stdout_read_all())
        f:close()
        sock:close()
    """})
    assert n.get("/fds").text.split() == ["0", "1", "2"]


def test_request_end_kills_command_and_what_it_forked(nginx):
    n = serve(nginx, {"/bg": r"""
        local ngx_pipe = require "ngx.pipe"
        -- the command forks a grandchild that keeps running, then waits
        local proc = ngx_pipe.spawn({"sh", "-c",
                                     "sleep 100 & echo $!; exec sleep 100"})
        ngx.say(proc:pid(), " ", proc:stdout_read_line())
    """, "/exited": r"""
        local ngx_pipe = require "ngx.pipe"
        -- the command exits at once, its grandchild stays
        local proc = ngx_pipe.spawn({"sh", "-c", "sleep 100 & echo $!"})
        local gc = proc:stdout_read_line()
        ngx.say(proc:pid(), " ", gc, " ", select(2, proc:wait()))
    """})
    worker = n.worker_pids()[0]
    for path in ("/bg", "/exited"):
        pid, grandchild = map(int, n.get(path).text.split()[:2])
        wait_gone(pid)
        # orphaned to PID 1 once its parent died: a zombie until it reaps
        wait_gone(grandchild, zombie_ok=True)
    # no supervisor or command left behind as the worker's child
    deadline = time.monotonic() + 10
    while children_of(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children_of(worker) == []


def test_child_ignoring_sigterm_is_killed_when_the_request_ends(nginx):
    n = serve(nginx, {"/stubborn": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c",
                                     "trap '' TERM; echo ready; "
                                     .. "while :; do sleep 1; done"})
        proc:stdout_read_line()
        ngx.say(proc:pid(), " ", proc:kill(15))
        proc:set_timeouts(nil, nil, nil, 100)
        ngx.say(proc:wait())
    """})
    first, second = n.get("/stubborn").text.splitlines()
    pid = int(first.split()[0])
    assert first.endswith(" true") and second == "niltimeout"
    wait_gone(pid)


def test_request_ending_mid_read_leaves_no_process(nginx):
    # the client goes away while the handler waits on the pipe
    n = serve(nginx, {"/slow": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sleep", "100"})
        ngx.log(ngx.ERR, "spawned ", proc:pid())
        proc:set_timeouts(nil, 0)
        proc:stdout_read_all()
        ngx.say("unreachable")
    """}, http="lua_check_client_abort on;")
    worker = n.worker_pids()[0]
    import socket
    s = socket.create_connection(("127.0.0.1", n.port))
    s.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    pid = int(n.wait_log(r"spawned (\d+)").group(1))
    assert proc_state(pid) not in (None, "Z")
    s.close()
    wait_gone(pid)
    deadline = time.monotonic() + 10
    while children_of(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children_of(worker) == []


def test_fork_bomb_stopped_by_process_limit(nginx):
    # Any process limit below what the worker's user already runs stops
    # every fork of the command: the bomb ends at its first fork.
    n = serve(nginx, {"/bomb": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c",
                                     "b() { b | b & }; b; echo forked"},
                                    {merge_stderr = true})
        ngx.print(proc:stdout_read_all())
        ngx.say(proc:wait())
    """}, http="lua_pipe_limits processes=1;")
    text = n.get("/bomb").text
    assert "forked" not in text, text
    assert "can't fork" in text.lower() or "cannot fork" in text.lower() \
        or "resource temporarily unavailable" in text.lower(), text


def test_limits_are_applied(nginx):
    n = serve(nginx, {"/limits": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c",
            "ulimit -t; ulimit -v; ulimit -p; ulimit -n; ulimit -c"})
        ngx.print(proc:stdout_read_all())
    """, "/cpu": r"""
        local ngx_pipe = require "ngx.pipe"
        local proc = ngx_pipe.spawn({"sh", "-c", "while :; do :; done"})
        proc:set_timeouts(nil, nil, nil, 0)
        ngx.say(proc:wait())
    """}, http="lua_pipe_limits cpu=1s memory=64m processes=50 files=20;")
    assert n.get("/limits").text.split() == [
        "1", str(64 * 1024), "50", "20", "0"]
    # the CPU limit ends a spinning command (SIGKILL at the hard limit)
    assert n.get("/cpu", timeout=30).text in ("falsesignal9\n",
                                              "falsesignal24\n")


def test_default_limits(nginx):
    n = serve(nginx, {"/limits": r"""
        local proc = require("ngx.pipe").spawn({"sh", "-c",
            "ulimit -t; ulimit -v; ulimit -p; ulimit -n; ulimit -c"})
        ngx.print(proc:stdout_read_all())
    """})
    assert n.get("/limits").text.split() == [
        "60", str(2048 * 1024), "1024", "1024", "0"]


def test_waiting_is_not_lua_time_and_reads_count_as_memory(nginx):
    n = nginx(http="lua_budget_request 200ms; lua_budget_memory 8m;",
              server=r"""
        location = /wait { content_by_lua_block {
            local proc = require("ngx.pipe").spawn({"sleep", "1"})
            ngx.say(proc:wait())
        } }
        location = /flood { content_by_lua_block {
            local proc = require("ngx.pipe").spawn(
                {"head", "-c", "67108864", "/dev/zero"})
            local data, err = proc:stdout_read_all()
            ngx.log(ngx.ERR, "survived: ", err)
        } }""")
    # a second of waiting under a 200 ms budget of Lua time
    assert n.get("/wait").text == "trueexit0\n"
    assert n.get("/flood").status == 500
    log = n.read_log()
    assert "lua_budget_memory exceeded by a pipe read" in log
    assert "survived" not in log


def test_data_waiting_to_be_written_counts_as_memory(nginx):
    # Three commands that never read: each write parks what the pipe does
    # not take outside the VM (12 MB each) under a 32 MB budget.
    n = nginx(http="lua_budget_memory 32m;", server=r"""
        location = /park { content_by_lua_block {
            local ngx_pipe = require "ngx.pipe"
            local s = string.rep("w", 12 * 1024 * 1024)
            local threads = {}
            for i = 1, 3 do
                threads[i] = ngx.thread.spawn(function()
                    local proc = ngx_pipe.spawn({"sleep", "100"})
                    local ok, err = pcall(proc.write, proc, s)
                    ngx.log(ngx.ERR, "survived: ", err)
                end)
            end
            for i = 1, 3 do ngx.thread.wait(threads[i]) end
            ngx.say("unreachable")
        } }""")
    assert n.get("/park").status == 500
    log = n.read_log()
    assert "lua_budget_memory exceeded by a pipe write" in log
    assert "survived" not in log


def test_bad_limits_directive(nginx_conf):
    for bad in ("cpu=x", "nothing=1", "files=0", "memory"):
        c = nginx_conf(http=f"lua_pipe_limits {bad};")
        ok, out = c.test_config()
        assert not ok and "lua_pipe_limits" in out, (bad, out)


def test_worker_exit_kills_commands(nginx):
    n = serve(nginx, {"/spawn": r"""
        local proc = require("ngx.pipe").spawn({"sleep", "100"})
        KEEP = proc     -- kept past its request: killed there all the same
        ngx.say(proc:pid())
    """}, http="lua_sandbox off;")
    pid = int(n.get("/spawn").text)
    wait_gone(pid)
    n2 = nginx(http=r"""
        init_worker_by_lua_block {
            PROC = require("ngx.pipe").spawn({"sleep", "100"})
        }""", server=r"""
        location = /pid { content_by_lua_block { ngx.say(PROC:pid()) } }""")
    pid = int(n2.get("/pid").text)
    assert proc_state(pid) not in (None, "Z")
    n2.stop()
    wait_gone(pid)


@pytest.mark.skipif(not (ECOSYSTEM / "lua-resty-shell").is_dir(),
                    reason="no ../shared/ecosystem")
def test_lua_resty_shell(nginx):
    # resty.signal needs its own C library (not in the ecosystem folder):
    # resty.shell only calls it to clean up after a failure; a stand-in.
    paths = ";".join(str(ECOSYSTEM / lib / "lib" / "?.lua")
                     for lib in ("lua-resty-shell", "lua-tablepool"))
    n = nginx(http=f"""
        lua_package_path "{paths};;";
        init_by_lua_block {{
            package.preload["resty.signal"] = function()
                return {{ kill = function() return true end }}
            end
        }}""", server=r"""
        location = /t { content_by_lua_block {
            local shell = require "resty.shell"
            ngx.say(shell.run({"echo", "hello"}))
            ngx.say(shell.run("cat; echo err >&2; exit 3", "in", 1000))
        } }""")
    assert n.get("/t").text.splitlines() == [
        "truehello", "exit0", "falseinerr", "exit3"]
