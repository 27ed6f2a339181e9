"""ngx.run_worker_thread and lua_worker_thread_vm_pool_size (issue 21,
item 3): results, types and error texts compared with Debian's
lua-nginx-module; the budgets, lua_sandbox and lua_vm inside the thread
VMs (luaguard's own, docs/compatibility.md "Worker threads")."""

import re
import shutil
import tempfile
import urllib.parse
from pathlib import Path

import pytest

from harness import Nginx

MODULES = ["luaguard", "reference"]


@pytest.fixture
def server():
    """Like conftest's `nginx`, with the prefix outside pytest's private
    temporary directory: the thread VMs (worker user) read modules there."""
    started = []
    base = Path(tempfile.mkdtemp(prefix="luaguard-wthread-"))
    base.chmod(0o755)

    def make(**kw):
        n = Nginx(base / f"n{len(started)}", **kw)
        for p in [n.prefix, *n.prefix.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o055)
        started.append(n)
        return n.start()

    yield make
    problems = []
    for n in started:
        try:
            n.stop()
        except RuntimeError as e:
            problems.append(str(e))
        bad = n.fatal_lines()
        if bad:
            problems.append(f"{n.prefix}: " + "\n".join(bad[:20]))
    shutil.rmtree(base, ignore_errors=True)
    if problems:
        pytest.fail("nginx reported problems:\n" + "\n".join(problems))


MOD = r"""
local M = {}
function M.echo(...) return ... end
function M.count(...) return select("#", ...) end
function M.types(...)
    local t = {}
    for i = 1, select("#", ...) do t[#t + 1] = type((select(i, ...))) end
    return table.concat(t, ",")
end
function M.err() error("boom") end
function M.errtab() error({1}) end
function M.errnil() error() end
function M.retfn() return function() end end
function M.retco() return coroutine.create(print) end
function M.retnull() return 1, ngx.null, 2 end
function M.retcdata() return require("ffi").new("int[1]") end
function M.mkdeep(n)
    local t = {} local c = t
    for i = 1, n do c[1] = {} c = c[1] end
    return t
end
function M.depth(t)
    local n = 0
    while type(t) == "table" do n = n + 1 t = t[1] end
    return n
end
function M.retrec() local t = {} t.t = t return t end
function M.setg(v) LEAK = v return true end
function M.getg() return tostring(LEAK) end
function M.api()
    return ngx.md5("hello"), ngx.encode_base64("hi"), ngx.crc32_short("x"),
           ngx.quote_sql_str("a'b"), ngx.encode_args({a = 1}),
           ngx.config.subsystem, type(ngx.config.prefix()),
           type(ngx.now()), ngx.decode_base64("aGk=")
end
function M.dict() ngx.shared.d:set("k", "v") return ngx.shared.d:get("k") end
function M.cjson() return require("cjson").encode({a = 1}) end
function M.yield() return coroutine.yield(1) end
function M.sleep() return ngx.sleep(0.1) end
M.notfn = 5
function M.osx() return os.execute("true") end
function M.spin() local i = 0 while true do i = i + 1 end end
function M.spinpcall()
    while true do pcall(function() local i = 0 while true do i = i + 1 end end) end
end
function M.bomb()
    local t = {}
    for i = 1, 1e9 do t[i] = string.rep("x", 64) .. i end
end
function M.cdeep()
    local function f(s) return (s:gsub(".", f)) end
    return select(2, pcall(f, "abc"))
end
function M.hello() return "hello" end
function M.phase() return ngx.get_phase() end
return M
"""

FILES = {
    "lua/m.lua": MOD,
    "lua/m/sub.lua": 'return {echo = function() return "sub" end}',
    "lua/numod.lua": "return 5",
    "lua/badmod.lua": 'error("modfail")',
}

HTTP = """
    lua_package_path "{prefix}/lua/?.lua;;";
    lua_shared_dict d 1m;
    lua_worker_thread_vm_pool_size 1;
"""

# Runs the Lua in ?c= and prints each value it returns with its type.
EVAL = r"""
    location /t {
        content_by_lua_block {
            local f = assert(loadstring(ngx.unescape_uri(ngx.var.arg_c)))
            local r = {pcall(f)}
            local out = {}
            for i = 1, table.maxn(r) do
                out[#out + 1] = tostring(r[i]) .. ":" .. type(r[i])
            end
            ngx.say(table.concat(out, " | "))
        }
    }
"""


def start_both(make, **kw):
    return {m: make(module=m, **kw) for m in MODULES}


def run(n, code):
    r = n.get("/t?c=" + urllib.parse.quote(code))
    assert r.status == 200, r
    text = r.body.decode().strip().replace(str(n.prefix), "PREFIX")
    # require's list of the places it looked: LuaJIT's default paths
    # differ between the two builds.
    text = re.sub(r"\n\t.*", "", text, flags=re.S)
    return re.sub(r"table: 0x[0-9a-f]+", "table: ADDR", text)


def rwt(fn, args=""):
    return f'return ngx.run_worker_thread("tp", "m", "{fn}"{args})'


def deep(n, fn="depth"):
    return ("local t = {} local c = t for i = 2, %d do c[1] = {} c = c[1] "
            "end return ngx.run_worker_thread(\"tp\", \"m\", \"%s\", t)"
            % (n, fn))


SAME = [
    rwt("echo", ', 1, "a", true, nil, 2.5, -0.0, 1/0, "a\\0b"'),
    rwt("count", ", 1, nil, nil"),
    rwt("types", ', 1, "a", true, nil, {}, ngx.null'),
    rwt("retnull"),
    'local ok, r = ngx.run_worker_thread("tp", "m", "echo", '
    '{1, 2, x = {y = "z"}, [true] = 2.5}) '
    'return ok, type(r), r[1], r[2], r.x.y, r[true]',
    rwt("api"),
    rwt("dict"),
    rwt("cjson"),
    rwt("phase"),
    'return ngx.run_worker_thread("tp", "m.sub", "echo")',
    deep(99), deep(100),
    'return ngx.run_worker_thread("tp", "m", "mkdeep", 98)',
    rwt("mkdeep", ", 99"), rwt("retrec"),
    'local t = {} t.self = t return ngx.run_worker_thread("tp", "m", '
    '"echo", t)',
    # failures: false and lua-nginx-module's text
    'return ngx.run_worker_thread("nopool", "m", "echo")',
    'return ngx.run_worker_thread(1, "m", "echo")',
    'return ngx.run_worker_thread({}, "m", "echo")',
    'return ngx.run_worker_thread()',
    'return ngx.run_worker_thread("tp", "m")',
    'return ngx.run_worker_thread("tp", "nomod", "echo")',
    'return ngx.run_worker_thread("tp", "numod", "echo")',
    'return ngx.run_worker_thread("tp", "badmod", "echo")',
    rwt("nofn"), rwt("notfn"),
    'return ngx.run_worker_thread("tp", "m", 1)',
    rwt("err"), rwt("errtab"), rwt("errnil"),
    rwt("retfn"), rwt("retco"), rwt("retcdata"),
    rwt("echo", ", function() end"),
    rwt("echo", ", {f = print}"),
    rwt("echo", ", {[print] = 1}"),
    rwt("echo", ", io.stdout"),
    rwt("echo", ', require("ffi").new("int")'),
    rwt("yield"),
]


@pytest.mark.oracle
def test_results_types_and_errors_match_the_reference(server):
    ns = start_both(server, main="thread_pool tp threads=2;", http=HTTP,
                    server=EVAL, files=FILES)
    for code in SAME:
        got = {m: run(n, code) for m, n in ns.items()}
        assert got["luaguard"] == got["reference"], code
    # spot checks that the comparison compared something
    assert run(ns["luaguard"], rwt("echo", ", {1}")).startswith(
        "true:boolean | true:boolean | table: ADDR:table")
    assert run(ns["luaguard"], rwt("notfn")) == (
        "true:boolean | false:boolean | invalid function:string")
    assert run(ns["luaguard"], deep(100)).endswith(
        "suspicious circular references, table depth exceed max depth: 100 "
        "in the argument:string")


@pytest.mark.oracle
def test_a_busy_pool_answers_no_available_vm(server):
    # One VM: the second of two concurrent calls finds none.
    code = r"""
        local function call()
            return ngx.run_worker_thread("tp", "m", "wait")
        end
        -- a takes the VM and waits for the key, b finds none: only then
        -- is the key set.
        local a = ngx.thread.spawn(call)
        local b = ngx.thread.spawn(call)
        local r2 = {ngx.thread.wait(b)}
        ngx.shared.d:set("go", true)
        local r1 = {ngx.thread.wait(a)}
        ngx.say(tostring(r1[2]), "/", tostring(r1[3]), " ",
                tostring(r2[2]), "/", tostring(r2[3]))
    """
    files = dict(FILES)
    # The first call holds its VM until the second has been refused.
    files["lua/m.lua"] = MOD.replace("return M", r"""
function M.wait()
    for i = 1, 1000 do
        if ngx.shared.d:get("go") then return "done" end
        os.execute("sleep 0.01")
    end
    return "timeout"
end
return M""")
    for module in MODULES:
        n = server(module=module, main="thread_pool tp threads=2;",
                   http=HTTP,
                   server="location /c { content_by_lua_block {%s} }" % code,
                   files=files)
        body = n.get("/c").body.decode().strip()
        assert body == "true/done false/no available Lua vm", (module, body)


def test_globals_set_by_a_call_are_gone_at_the_next(server):
    ns = start_both(server, main="thread_pool tp threads=1;", http=HTTP,
                    server=EVAL, files=FILES)
    out = {}
    for m, n in ns.items():
        run(n, rwt("setg", ', "one"'))
        out[m] = run(n, rwt("getg"))
    # lua-nginx-module keeps the global in the pooled VM for the next
    # caller; luaguard does not (docs/compatibility.md).
    assert out["reference"] == "true:boolean | true:boolean | one:string"
    assert out["luaguard"] == "true:boolean | true:boolean | nil:string"


@pytest.mark.asan_fast
def test_runaway_loop_in_the_thread_is_stopped(server):
    n = server(main="thread_pool tp threads=1;",
               http=HTTP + "lua_budget_request 300ms;", server=EVAL,
               files=FILES)
    for fn in ("spin", "spinpcall"):
        got = run(n, rwt(fn))
        assert got.startswith("true:boolean | false:boolean | luaguard: "
                              "lua_budget_request exceeded: the worker "
                              "thread ran 300 ms, stopped at "), got
    # The worker serves, and the pool (one thread, one VM) runs the next
    # call on a fresh VM.
    assert run(n, rwt("hello")) == (
        "true:boolean | true:boolean | hello:string")


def test_recursion_through_c_in_the_thread_is_an_error(server):
    # A pool thread's stack has its own floor (test_cstack.py): set before
    # each call, since a VM may run on any thread of the pool. The
    # reference's thread crashes the worker here.
    n = server(main="thread_pool tp threads=1;", http=HTTP, server=EVAL,
               files=FILES)
    for _ in range(3):
        assert run(n, rwt("cdeep")) == (
            "true:boolean | true:boolean | C stack overflow:string")
    assert run(n, rwt("hello")) == (
        "true:boolean | true:boolean | hello:string")


@pytest.mark.asan_fast
def test_memory_bomb_in_the_thread_is_stopped(server):
    n = server(main="thread_pool tp threads=1;",
               http=HTTP + "lua_budget_memory 32m;", server=EVAL,
               files=FILES)
    got = run(n, rwt("bomb"))
    assert got.startswith("true:boolean | false:boolean | not enough memory "
                          "(luaguard: lua_budget_memory exceeded"), got
    assert run(n, rwt("hello")) == (
        "true:boolean | true:boolean | hello:string")


def test_thread_vms_follow_the_locations_sandbox(server):
    n = server(main="thread_pool tp threads=1;", http=HTTP, files=FILES,
               server=EVAL + r"""
    location /noos {
        lua_sandbox default -os;
        content_by_lua_block {
            ngx.say(ngx.run_worker_thread("tp", "m", "osx"))
        }
    }
    location /os {
        content_by_lua_block {
            ngx.say(ngx.run_worker_thread("tp", "m", "osx"))
        }
    }
    location /strict {
        lua_sandbox strict;
        content_by_lua_block {
            local ok, err = pcall(ngx.run_worker_thread, "tp", "m", "hello")
            ngx.say(ok, " ", err)
        }
    }
""")
    # Same VM (pool of one) for both locations: the policy is the caller's.
    body = n.get("/noos").body.decode()
    assert body.startswith("false") and (
        "capability 'os' is not allowed in this location (lua_sandbox "
        "default -os)" in body), body
    assert n.get("/os").body.decode().startswith("true"), body
    body = n.get("/strict").body.decode()
    assert "false" in body and "capability 'ffi' is not allowed" in body, body


def test_each_lua_vm_tenant_gets_its_own_thread_vms(server):
    # A module with state: the tenant of /b must not find the one /a
    # loaded (pool of one VM, one thread: VMs would be shared otherwise).
    files = {"a/t.lua": "local n = 0 return {f = function() n = n + 1 "
                        "return n end}"}
    n = server(main="thread_pool tp threads=1;", files=files,
               http='lua_package_path "{prefix}/a/?.lua;;";'
                    " lua_worker_thread_vm_pool_size 1;",
               server=r"""
    location /a {
        content_by_lua_block {
            ngx.say(select(2, ngx.run_worker_thread("tp", "t", "f")))
        }
    }
    location /b {
        lua_vm tenant_b;
        content_by_lua_block {
            ngx.say(select(2, ngx.run_worker_thread("tp", "t", "f")))
        }
    }
""")
    assert [n.get(p).body.decode().strip() for p in
            ("/a", "/a", "/b", "/a", "/b")] == ["1", "2", "1", "3", "2"]


@pytest.mark.asan_fast
def test_a_request_that_ends_while_its_call_runs(server):
    # The light thread waiting on the call is killed by ngx.exit: the task
    # keeps running on the pool's thread, then gives its VM back alone.
    files = dict(FILES)
    files["lua/m.lua"] = MOD.replace("return M", r"""
function M.wait()
    for i = 1, 1000 do
        if ngx.shared.d:get("go") then return "done" end
        os.execute("sleep 0.01")
    end
    return "timeout"
end
return M""")
    n = server(main="thread_pool tp threads=1;", http=HTTP, files=files,
               server=r"""
    location /orphan {
        content_by_lua_block {
            ngx.thread.spawn(function()
                ngx.run_worker_thread("tp", "m", "wait")
            end)
            ngx.say("left")
            ngx.exit(200)
        }
    }
    location /after {
        content_by_lua_block {
            ngx.shared.d:set("go", true)
            for i = 1, 500 do
                local ok, res = ngx.run_worker_thread("tp", "m", "hello")
                if res ~= "no available Lua vm" then
                    ngx.say(ok, " ", res)
                    return
                end
                ngx.sleep(0.01)   -- the orphaned call still holds the VM
            end
            ngx.say("the VM never came back")
        }
    }
""")
    assert n.get("/orphan").body == b"left\n"
    assert n.get("/after").body == b"true hello\n"


@pytest.mark.oracle
def test_outside_rewrite_access_and_content_it_is_refused(server):
    conf = r"""
    location /hf {
        content_by_lua_block { ngx.say("body") }
        header_filter_by_lua_block {
            local ok, err = pcall(ngx.run_worker_thread, "tp", "m", "hello")
            ngx.header["X-R"] = tostring(ok) .. " " .. tostring(err)
        }
    }
"""
    ns = start_both(server, main="thread_pool tp threads=1;", http=HTTP,
                    server=conf, files=FILES)
    got = {m: n.get("/hf").header("X-R") for m, n in ns.items()}
    assert got["luaguard"] == got["reference"], got
    assert "API disabled in the context of header_filter_by_lua*" in (
        got["luaguard"])
