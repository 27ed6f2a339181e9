"""lua_vm: a VM per tenant (issue 16, item 4).

Two tenants, each in its own `lua_vm`, beside each other in one nginx
worker. Each test plays tenant A against tenant B through one kind of
worker state a VM owns (module cache, PRNG, collector, memory ceiling,
budget hooks, timers, cosocket pools, ngx.ctx) and asserts that nothing
crosses. Each has a control: the same move between two locations of ONE
VM does cross, so the test fails when the VM boundary is not there.
"""

import re
import socket
import threading

import pytest

from harness import TcpServer

HTTP = r"""
    lua_package_path "{prefix}/lua/?.lua;;";
    lua_shared_dict shared 1m;
    init_by_lua_block {
        require "state"
        INIT_SEEN = (INIT_SEEN or 0) + 1
    }
"""

# A module with state: what a tenant keeps between requests.
STATE = r"""
local _M = { box = {}, parked = {} }
function _M.put(k, v) _M.box[k] = v end
function _M.get(k) return _M.box[k] end
function _M.park(v)
    _M.parked[#_M.parked + 1] = v
    return #_M.parked
end
return _M
"""

FILES = {"lua/state.lua": STATE}


def loc(path, code, vm=None, extra=""):
    directive = f"lua_vm {vm};" if vm else ""
    return f"""
        location = {path} {{
            {directive}
            {extra}
            content_by_lua_block {{ {code} }}
        }}"""


# Workers read the modules from the test prefix (private to root).
pytestmark = pytest.mark.workers_as_root


@pytest.fixture
def nginx(nginx):
    """The tenants' configuration unless a test gives its own."""
    def start(**kw):
        kw.setdefault("http", HTTP)
        kw.setdefault("files", FILES)
        return nginx(**kw)
    return start


PUT = 'require("state").put("k", "set-by-" .. ngx.var.arg_who); ngx.say("ok")'
GET = 'ngx.say(tostring(require("state").get("k")))'


@pytest.mark.asan_fast
def test_module_state_stays_in_its_vm(nginx):
    n = nginx(server=loc("/a/put", PUT, "a") + loc("/a/get", GET, "a")
              + loc("/b/get", GET, "b") + loc("/d/get", GET))
    assert n.get("/a/put?who=a").text == "ok\n"
    assert n.get("/a/get").text == "set-by-a\n"      # control: one VM
    assert n.get("/b/get").text == "nil\n"
    assert n.get("/d/get").text == "nil\n"           # the default VM


def test_init_by_lua_runs_in_every_vm(nginx):
    code = ('ngx.say(INIT_SEEN, " ", tostring(package.loaded.state ~= nil))')
    n = nginx(server=loc("/a", code, "a") + loc("/b", code, "b")
              + loc("/d", code), http=HTTP.replace(
                  "init_by_lua_block", "lua_sandbox off;\n    "
                  "init_by_lua_block"))
    for path in ("/a", "/b", "/d"):
        assert n.get(path).text == "1 true\n", path


def test_prng_seed_stays_in_its_vm(nginx):
    seed = "math.randomseed(4242); ngx.say('seeded')"
    draw = "ngx.say(math.random(1, 2^30), ' ', math.random(1, 2^30))"
    ref = "math.randomseed(4242); " + draw
    n = nginx(server=loc("/a/seed", seed, "a") + loc("/a/draw", draw, "a")
              + loc("/b/draw", draw, "b") + loc("/c/ref", ref, "c"))
    expected = n.get("/c/ref").text
    assert n.get("/a/seed").text == "seeded\n"
    assert n.get("/a/draw").text == expected   # control: predictable in A
    assert n.get("/a/seed").text == "seeded\n"
    assert n.get("/b/draw").text != expected


def test_stopping_the_collector_stays_in_its_vm(nginx):
    stop = 'collectgarbage("stop"); ngx.say("stopped")'
    look = 'ngx.say(tostring(collectgarbage("isrunning"))); collectgarbage("restart")'
    # Request code may not stop the collector under lua_sandbox default
    # or strict; trusted code (off) may, and then only its own VM's.
    off = "lua_sandbox off;"
    n = nginx(server=loc("/a/stop", stop, "a", off)
              + loc("/a/look", look, "a", off)
              + loc("/b/look", look, "b", off))
    assert n.get("/a/stop").text == "stopped\n"
    assert n.get("/b/look").text == "true\n"
    assert n.get("/a/look").text == "false\n"  # control: A's own collector


PARK = r"""
    local st = require "state"
    local n
    for i = 1, 64 do
        n = st.park(string.rep(tostring(i), 64 * 1024) .. ngx.now() .. i)
    end
    ngx.say(n)
"""
USE = r"""
    local t = {}
    for i = 1, 32 do t[i] = string.rep("x", 64 * 1024) .. i end
    ngx.say("used ", #t)
"""


def test_memory_parked_by_one_tenant_starves_only_its_vm(nginx):
    http = HTTP.replace("lua_shared_dict", "lua_vm hog memory=16m;\n"
                        "    lua_shared_dict")
    # `lua_vm hog memory=16m` at http level names the VM and its ceiling;
    # the locations below pick VMs of their own.
    server = (loc("/hog/park", PARK, "hog") + loc("/hog/use", USE, "hog")
              + loc("/b/use", USE, "b") + loc("/d/use", USE, "default"))
    n = nginx(server=server, http=http)
    pid = n.worker_pids()
    statuses = [n.get("/hog/park").status for _ in range(8)]
    assert 500 in statuses, statuses
    n.wait_log(r"lua_vm_memory_limit exceeded")
    # Tenant B and the default VM still allocate 2 MB each.
    assert n.get("/b/use").text == "used 32\n"
    assert n.get("/d/use").text == "used 32\n"
    # Control: the hog's VM is full for every location in it.
    assert n.get("/hog/use").status == 500
    assert n.worker_pids() == pid


PARK_IN_TIMERS = r"""
    local n = 0
    for i = 1, 8 do
        local arg = string.rep(tostring(i), 1024 * 1024) .. ngx.now() .. i
        if ngx.timer.at(3600, function() end, arg) then n = n + 1 end
    end
    ngx.say(n)
"""


@pytest.mark.asan_fast
def test_memory_parked_in_timers_starves_only_its_vm(nginx):
    http = HTTP.replace("lua_shared_dict", "lua_vm hog memory=16m;\n"
                        "    lua_shared_dict")
    # 8 MB: the first request's eight timers alone hold 8 MB of the 16.
    use8 = USE.replace("1, 32", "1, 128")
    server = (loc("/hog/park", PARK_IN_TIMERS, "hog")
              + loc("/hog/use", use8, "hog") + loc("/b/use", use8, "b"))
    n = nginx(server=server, http=http)
    pid = n.worker_pids()
    statuses = [n.get("/hog/park").status for _ in range(6)]
    assert 500 in statuses, statuses
    n.wait_log(r"lua_vm_memory_limit exceeded")
    assert n.get("/b/use").text == "used 128\n"
    assert n.get("/hog/use").status == 500   # control: its own VM is full
    assert n.worker_pids() == pid


@pytest.mark.asan_fast
def test_a_budget_stop_in_one_vm_leaves_the_other_running(nginx):
    spin = "local i = 0 while true do i = i + 1 end"
    ok = 'ngx.say("b fine")'
    again = 'ngx.say("a fine")'
    n = nginx(server=loc("/a/spin", spin, "a", "lua_budget_slice 100ms;")
              + loc("/a/ok", again, "a") + loc("/b/ok", ok, "b"))
    pid = n.worker_pids()
    assert n.get("/a/spin").status == 500
    n.wait_log(r"lua_budget_slice exceeded")
    assert n.get("/b/ok").text == "b fine\n"
    assert n.get("/a/ok").text == "a fine\n"   # the hook was disarmed
    assert n.worker_pids() == pid


@pytest.mark.asan_fast
def test_timers_run_in_the_vm_that_created_them(nginx):
    arm = r"""
        local st = require "state"
        st.put("timer", "none")
        local ok, err = ngx.timer.at(0, function()
            st.put("timer", "ran in " .. ngx.var.arg_who)
        end)
        ngx.say(tostring(ok ~= nil))
    """.replace("ngx.var.arg_who", '"' + "a" + '"')
    look = 'ngx.say(tostring(require("state").get("timer")))'
    n = nginx(server=loc("/a/arm", arm, "a") + loc("/a/look", look, "a")
              + loc("/b/look", look, "b"))
    assert n.get("/a/arm").text == "true\n"
    for _ in range(200):
        if n.get("/a/look").text == "ran in a\n":
            break
    assert n.get("/a/look").text == "ran in a\n"
    assert n.get("/b/look").text == "nil\n"


class Keeper(TcpServer):
    """Holds every connection open and counts them (`accepted`)."""

    def __init__(self):
        self.sentinel_port = None
        self.sentinel_served = threading.Event()
        super().__init__()

    def count_settled(self):
        """Connections complete in the kernel before the accept loop takes
        them: a last connection of ours, accepted after every earlier one
        (the backlog is first in, first out), tells when `accepted` holds
        them all. Returns the count without it."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.sentinel_port = probe.getsockname()[1]   # known before it lands
        probe.connect(("127.0.0.1", self.port))
        assert self.sentinel_served.wait(10)
        probe.close()
        return self.accepted - 1

    def serve(self, conn):
        if conn.getpeername()[1] == self.sentinel_port:
            self.sentinel_served.set()
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass


POOL = r"""
    local s = ngx.socket.tcp()
    local ok, err = s:connect("127.0.0.1", {port}, {{ pool = "shared-name" }})
    if not ok then ngx.say("connect: ", err) return end
    ngx.say("reused ", s:getreusedtimes())
    s:setkeepalive()
"""


def test_cosocket_pools_stay_in_their_vm(nginx):
    peer = Keeper()
    try:
        code = POOL.replace("{port}", str(peer.port)).replace("{{", "{") \
                   .replace("}}", "}")
        n = nginx(server=loc("/a/c", code, "a") + loc("/a/c2", code, "a")
                  + loc("/b/c", code, "b"))
        assert n.get("/a/c").text == "reused 0\n"
        assert n.get("/a/c2").text == "reused 1\n"  # control: one VM
        assert n.get("/b/c").text == "reused 0\n"
        assert peer.count_settled() == 2
    finally:
        peer.close()


def test_shared_dicts_stay_the_shared_channel(nginx):
    put = 'ngx.shared.shared:set("k", "from a") ngx.say("ok")'
    get = 'ngx.say(ngx.shared.shared:get("k"))'
    n = nginx(server=loc("/a/put", put, "a") + loc("/b/get", get, "b"))
    assert n.get("/a/put").text == "ok\n"
    assert n.get("/b/get").text == "from a\n"


def test_ngx_ctx_does_not_cross_into_another_vm(nginx):
    server = r"""
        lua_vm front;
        server_rewrite_by_lua_block { ngx.ctx.tag = "front" }
    """ + loc("/same", 'ngx.say(tostring(ngx.ctx.tag))', "front") \
        + loc("/other", 'ngx.say(tostring(ngx.ctx.tag))', "b")
    n = nginx(server=server)
    assert n.get("/same").text == "front\n"   # control: one VM
    assert n.get("/other").text == "nil\n"


def test_a_vm_per_tenant_under_strict(nginx):
    code = ('require("state").put("k", "x"); '
            'ngx.say(type(newproxy), " ", tostring(require("state").get("k")))')
    n = nginx(server=loc("/a", code, "a", "lua_sandbox strict;")
              + loc("/b", GET, "b", "lua_sandbox strict;"))
    assert n.get("/a").text == "nil x\n"
    assert n.get("/b").text == "nil\n"


@pytest.mark.parametrize("directives,message", [
    ("lua_vm a memory=16m; lua_vm a memory=32m;", "is duplicate"),
    ("lua_vm a/b;", "invalid name"),
    ("lua_vm a memory=1k;", "invalid memory"),
    ("lua_vm a size=16m;", 'invalid parameter "size=16m"'),
    ("lua_vm default memory=16m;", "sets no memory for the default VM"),
])
def test_bad_lua_vm_fails_nginx_t(nginx_conf, directives, message):
    conf = nginx_conf(http="    " + directives + "\n")
    ok, out = conf.test_config()
    assert not ok
    assert message in out, out
    assert re.search(r"in \S+nginx\.conf:\d+", out), out


def test_two_memory_limits_for_one_vm_fail_nginx_t(nginx_conf):
    server = ("location /x { lua_vm a memory=16m; }\n"
              "        location /y { lua_vm a memory=32m; }\n")
    conf = nginx_conf(server=server)
    ok, out = conf.test_config()
    assert not ok
    assert "gives this VM a second memory limit" in out, out


def test_capture_ctx_into_another_vm_is_dropped(nginx):
    """ngx.location.capture's ctx option hands the parent's table to the
    subrequest; when the subrequest's location runs in another lua_vm the
    table is dropped there (it belongs to the parent's VM) and the
    subrequest starts with an empty ngx.ctx of its own VM, never a value
    of the other VM's registry. Same VM: the table is shared."""
    server = loc("/parent", """
            local shared = { tag = "parent" }
            local a = ngx.location.capture("/child_other", { ctx = shared })
            local b = ngx.location.capture("/child_same", { ctx = shared })
            ngx.print(a.body, b.body, tostring(shared.seen_same), " ",
                      tostring(shared.seen_other))
        """, "a") \
        + loc("/child_other", """
            local c = ngx.ctx
            ngx.say(type(c), " ", tostring(c.tag))
            c.seen_other = true
        """, "b") \
        + loc("/child_same", """
            local c = ngx.ctx
            ngx.say(type(c), " ", tostring(c.tag))
            c.seen_same = true
        """, "a")
    n = nginx(server=server)
    for _ in range(5):
        r = n.get("/parent")
        assert r.status == 200, r.text
        assert r.text == "table nil\ntable parent\ntrue nil", r.text
