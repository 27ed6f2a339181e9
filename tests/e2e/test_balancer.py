"""balancer_by_lua and ngx.balancer: Lua picks the upstream peer of each
try. Behaviour is compared with lua-nginx-module where it must match; the
egress policy and the budgets are luaguard's own."""
import re
import subprocess
import threading

import pytest

from harness import Dns, TcpServer, free_port, free_ports

BOTH = ["luaguard", "reference"]

# Two backends in the same nginx, and a port nothing listens on.
BACKENDS = """
    server {{
        listen 127.0.0.1:{b1};
        location / {{ content_by_lua_block {{
            ngx.req.read_body()
            ngx.say("b1 ", ngx.var.http_x_try, " ", ngx.req.get_method(),
                    " ", ngx.req.get_body_data())
        }} }}
        location /conn {{ return 200 "$connection\\n"; }}
    }}
    server {{
        listen 127.0.0.1:{b2};
        location / {{ return 200 "b2\\n"; }}
    }}
"""


def ports():
    return free_ports(3)


def upstream(closed, code, extra=""):
    return f"""
    upstream up {{
        server 127.0.0.1:{closed};
        balancer_by_lua_block {{
            local b = require "ngx.balancer"
            {code}
        }}
        {extra}
    }}
"""


def positionless(text):
    """Error text without the chunk position, which names each module's
    own file and line."""
    text = re.sub(r"(table|function|userdata|thread): 0x[0-9a-f]+", r"\1",
                  text)
    return re.sub(r"[^ ,]*:\d+: ", "", text)


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", BOTH)
def test_lua_chooses_the_peer(nginx, module):
    b1, b2, closed = ports()
    n = nginx(module=module, http=upstream(closed, """
            local port = ngx.var.arg_to == "b2" and {b2} or {b1}
            local ok, err = b.set_current_peer("127.0.0.1", port)
            if not ok then
                ngx.log(ngx.ERR, "set_current_peer: ", err)
                return ngx.exit(500)
            end
        """.format(b1=b1, b2=b2)) + BACKENDS.format(b1=b1, b2=b2),
        server="location /p { proxy_pass http://up; }")
    assert n.get("/p?to=b1").text == "b1 nil GET nil\n"
    assert n.get("/p?to=b2").text == "b2\n"
    # host:port in one string, as lua-nginx-module accepts it
    b1, b2, closed = ports()
    n2 = nginx(module=module, http=upstream(closed, f"""
            assert(b.set_current_peer("127.0.0.1:{b2}"))
        """) + BACKENDS.format(b1=b1, b2=b2),
        server="location /p { proxy_pass http://up; }")
    assert n2.get("/p").text == "b2\n"


def test_host_names_are_refused_as_the_reference_does(nginx):
    # lua-resty-core 0.1.25 takes addresses only: a host name is refused
    # with "no host allowed" even with a resolver configured, and no name
    # is looked up (the reference's result, matched).
    dns = Dns(lambda name: "127.0.0.1" if name.endswith(".test") else None)

    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, http=upstream(closed, f"""
                local out = {{}}
                for _, h in ipairs({{"backend.test", "backend.test:{b1}",
                                    "localhost", "no.such.name"}}) do
                    local ok, err = b.set_current_peer(h, {b1})
                    out[#out + 1] = tostring(ok) .. " " .. tostring(err)
                end
                ngx.var.trace = table.concat(out, "|")
                assert(b.set_current_peer("127.0.0.1", {b2}))
            """) + BACKENDS.format(b1=b1, b2=b2),
            server=f"resolver 127.0.0.1:{dns.port};" + TRACED)
        r = n.get("/p")
        return r.status, r.text, r.header("X-Trace")

    try:
        got = differential(nginx, run)
        assert got["luaguard"] == got["reference"]
        assert got["luaguard"] == (200, "b2\n", "|".join(
            ["nil no host allowed"] * 4))
        assert dns.queries == []
    finally:
        dns.close()



def test_upstream_addr_names_the_peer_as_the_reference_does(nginx):
    # The peer and its name ($upstream_addr) for each spelling: the port
    # argument alone, in the address alone, both (the address's wins), and
    # an IPv6 literal.
    forms = [
        ('"127.0.0.1", {b1}', "b1"), ('"127.0.0.1:{b2}"', "b2"),
        ('"127.0.0.1:{b2}", {b1}', "b2"), ('"127.0.0.1:{b1}", {b1}', "b1"),
        ('"127.000.0.1", {b1}', "b1"), ('"[::1]", {b1}', None),
    ]

    def run(nginx, module):
        b1, b2, closed = ports()
        calls = ",\n".join(
            f"function() return b.set_current_peer({a}) end"
            for a, _ in forms).format(b1=b1, b2=b2)
        n = nginx(module=module, http=upstream(closed, f"""
                local calls = {{ {calls} }}
                local ok, err = calls[tonumber(ngx.var.arg_f)]()
                ngx.var.trace = tostring(ok) .. " " .. tostring(err)
            """) + BACKENDS.format(b1=b1, b2=b2), server="""
                location /p {
                    set $trace "";
                    proxy_pass http://up;
                    proxy_next_upstream off;
                    add_header X-Trace $trace always;
                    add_header X-Addr $upstream_addr always;
                }
            """)
        out = []
        for i in range(len(forms)):
            r = n.get(f"/p?f={i + 1}")
            addr = r.header("X-Addr")
            for name, port in (("b1", b1), ("b2", b2), ("closed", closed)):
                addr = addr.replace(str(port), name)
            out.append((r.header("X-Trace"), addr, r.text.split()[0]))
        return out

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"]
    for (args, want), (trace, addr, _) in zip(forms, got["luaguard"]):
        if want:
            assert (trace, addr) == ("true nil", "127.0.0.1:" + want), args
        else:
            assert addr == "[::1]:b1", args


# Arguments of the balancer functions, good and bad, each called once in
# balancer_by_lua: pcall's results. REF: as lua-nginx-module answers. The
# others are luaguard's answers, kept: a lua_CFunction's argument errors
# where lua-resty-core's Lua fails on `#addr` or an FFI conversion, ports
# out of range refused, nginx's parse error prefixed, and the egress
# policy (docs/api.md).
REF = None
ARG_PROBES = [
    ("b.set_current_peer()",
     "false bad argument #1 to '?' (string expected, got nil)"),
    ("b.set_current_peer(nil, 80)",
     "false bad argument #1 to '?' (string expected, got nil)"),
    ("b.set_current_peer(127001, 80)", "true nil no host allowed"),
    ("b.set_current_peer({{}}, 80)",
     "false bad argument #1 to '?' (string expected, got table)"),
    ("b.set_current_peer('127.0.0.1', '{b1}')", REF),
    ("b.set_current_peer('127.0.0.1', 'x')",
     "false bad argument #2 to '?' (number expected, got string)"),
    ("b.set_current_peer('127.0.0.1', 1.5)", REF),
    ("b.set_current_peer('127.0.0.1', -1)", "true nil invalid port"),
    ("b.set_current_peer('127.0.0.1', 65536)", "true nil invalid port"),
    ("b.set_current_peer('127.0.0.1', {{}})",
     "false bad argument #2 to '?' (number expected, got table)"),
    ("b.set_current_peer('', 80)",
     'true nil failed to parse host name "": no host'),
    ("b.set_current_peer('127.0.0.1:x', 80)",
     'true nil failed to parse host name "127.0.0.1:x": invalid port'),
    ("b.set_current_peer('169.254.169.254', 80)",
     "true nil destination not allowed by policy"),
    ("b.set_current_peer('127.0.0.1', {b1}, 'extra')", REF),
    ("b.set_current_peer('127.0.0.1:{b1}')", REF),
    ("b.set_more_tries()",
     "false bad argument #1 to '?' (number expected, got nil)"),
    ("b.set_more_tries('2')", "true true"),
    ("b.set_more_tries(-1)",
     "false bad argument #1 to '?' (count must not be negative)"),
    ("b.set_more_tries(1.5)", REF),
    ("b.set_more_tries(0)", REF),
    ("b.get_last_failure()", REF),
    ("b.get_last_failure(1)", REF),
]


def test_arguments_answer_as_before_and_as_the_reference(nginx):
    def run(nginx, module):
        b1, b2, closed = ports()
        calls = [p.format(b1=b1) for p, _ in ARG_PROBES]
        probes = "\n".join(
            f"probe({c!r}, function() return {c} end)" for c in calls)
        n = nginx(module=module, http=upstream(closed, f"""
            local out = {{}}
            local function probe(name, f)
                local r = {{ pcall(f) }}
                for i = 1, 3 do r[i] = tostring(r[i]) end
                out[#out + 1] = table.concat(r, " ", 1, 3)
            end
            {probes}
            ngx.ctx.out = table.concat(out, "\\n")
            assert(b.set_current_peer("127.0.0.1", {b1}))
        """) + BACKENDS.format(b1=b1, b2=b2), server="""
            location /p {
                proxy_pass http://up;
                header_filter_by_lua_block { ngx.header.content_length = nil }
                body_filter_by_lua_block {
                    ngx.arg[1] = ngx.arg[2] and ngx.ctx.out or ""
                }
            }
        """)
        r = n.get("/p")
        assert r.status == 200
        return [re.sub(r"( nil)+$", "", line)
                for line in positionless(r.text).splitlines()]

    got = differential(nginx, run)
    assert len(got["luaguard"]) == len(ARG_PROBES)
    for (call, want), mine, ref in zip(ARG_PROBES, got["luaguard"],
                                       got["reference"]):
        if want is REF:
            assert mine == ref, call
        else:
            assert mine == want, call

RETRY = """
    local st, code = b.get_last_failure()
    local trace = ngx.var.trace .. "[" .. tostring(st) .. ","
                  .. tostring(code) .. "]"
    if not st then
        local ok, err = b.set_more_tries(5)
        trace = trace .. tostring(ok) .. "," .. tostring(err)
        assert(b.set_current_peer("127.0.0.1", {closed}))
    else
        assert(b.set_current_peer("127.0.0.1", {final}))
    end
    ngx.var.trace = trace
"""

TRACED = """
    location /p {
        set $trace "";
        proxy_pass http://up;
        proxy_next_upstream_tries 3;
        add_header X-Trace $trace always;
    }
"""


def differential(nginx, make):
    """Runs make(nginx, module) on both modules; returns both results."""
    return {m: make(nginx, m) for m in BOTH}


@pytest.mark.asan_fast
def test_retries_and_last_failure_match(nginx):
    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, server=TRACED, http=upstream(
            closed, RETRY.format(closed=closed, final=b1))
            + BACKENDS.format(b1=b1, b2=b2))
        r = n.get("/p")
        return r.status, r.text, r.header("X-Trace")

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"]
    assert got["luaguard"] == (
        200, "b1 nil GET nil\n",
        "[nil,nil]true,reduced tries due to limit[failed,502]")


def test_every_try_failing_ends_in_502(nginx):
    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, server=TRACED, http=upstream(closed, f"""
            local st, code = b.get_last_failure()
            if not st then assert(b.set_more_tries(1)) end
            ngx.var.trace = ngx.var.trace .. "[" .. tostring(st) .. ","
                            .. tostring(code) .. "]"
            assert(b.set_current_peer("127.0.0.1", {closed}))
        """))
        r = n.get("/p")
        return r.status, r.header("X-Trace")

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"] == (
        502, "[nil,nil][failed,502]")


def test_no_peer_set_falls_back_to_the_servers_listed(nginx):
    def run(nginx, module):
        b1, b2, _ = ports()
        # The listed server is the fallback: a try with no peer from Lua.
        n = nginx(module=module, http=upstream(b2, """
            if ngx.var.arg_lua then
                assert(b.set_current_peer("127.0.0.1", {b1}))
            end
        """.format(b1=b1)) + BACKENDS.format(b1=b1, b2=b2),
            server="location /p { proxy_pass http://up; }")
        return n.get("/p").text, n.get("/p?lua=1").text

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"] == ("b2\n", "b1 nil GET nil\n")


# What the balancer context allows, as lua-nginx-module does: no output,
# no yielding, no cosockets; requests' data, ngx.ctx, timers, logging.
API_PROBES = [
    "ngx.get_phase()",
    "ngx.say('x')",
    "ngx.print('x')",
    "ngx.flush()",
    "ngx.sleep(0.001)",
    "ngx.socket.tcp()",
    "ngx.socket.udp()",
    "ngx.location.capture('/x')",
    "ngx.exec('/x')",
    "ngx.redirect('/x')",
    "ngx.thread.spawn(function() end)",
    "ngx.req.read_body()",
    "ngx.req.get_method()",
    "ngx.req.get_headers()['x-probe']",
    "ngx.req.get_uri_args().a",
    "ngx.var.request_uri",
    "ngx.var.arg_a",
    "(function() ngx.ctx.k = 1 return ngx.ctx.k end)()",
    "ngx.timer.at(0, function() end) ~= nil",
    "ngx.header['X-Probe']",
    "ngx.status",
    "(function() ngx.header['X-W'] = 'w' end)()",
    "(function() ngx.status = 201 end)()",
    "ngx.req.set_header('X-S', '1')",
    "ngx.req.get_body_data()",
    "ngx.req.set_method(ngx.HTTP_GET)",
    "ngx.req.set_uri_args('a=1')",
    "ngx.req.set_uri('/p')",
    "ngx.req.clear_header('X-S')",
    "ngx.req.set_body_data('x')",
    "ngx.req.get_post_args()",
    "ngx.req.init_body()",
    "ngx.req.discard_body()",
    "ngx.req.finish_body()",
    "#ngx.req.raw_header() > 0",
    "ngx.req.http_version()",
    "ngx.req.start_time() > 0",

    "ngx.arg[1]",
    "ngx.send_headers()",
    "ngx.eof()",
    "ngx.get_phase() and ngx.worker.count()",
    "ngx.log(ngx.INFO, 'probe')",
    "ngx.escape_uri('a b')",
    "ngx.time() > 0",
    "ngx.update_time()",
    "ngx.req.socket()",
    "ngx.semaphore",
    "require('ngx.semaphore').new():wait(0.001)",
    "ngx.location.capture_multi({{'/x'}})",
    "ngx.timer.every(1, function() end)",
    "ngx.resp.get_headers()['x-w']",
    "ngx.get_phase() and ngx.var.request_method",
    "(function() ngx.var.trace = 'x' return ngx.var.trace end)()",
    "ngx.shared.d:set('k', 1)",
    "ngx.re.match('abc', 'b')[0]",
    "ngx.md5('x')",
    "ngx.now() > 0",
    "ngx.worker.pid() > 0",
    "require('ngx.balancer').set_timeouts(0)",
    "require('ngx.balancer').set_timeouts(1, -1)",
    "require('ngx.balancer').set_timeouts(1, 1, 'x')",
]


def test_api_in_the_balancer_context_matches(nginx):
    probes = "\n".join(
        f"probe({p!r}, function() return {p} end)" for p in API_PROBES)

    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, http="lua_shared_dict d 1m;\n" + upstream(
            closed, f"""
            local out = {{}}
            local function probe(name, f)
                local ok, v, e = pcall(f)
                out[#out + 1] = name .. " => " .. tostring(ok) .. " "
                                .. tostring(v) .. " " .. tostring(e)
            end
            {probes}
            ngx.ctx.out = table.concat(out, "\\n")
            assert(b.set_current_peer("127.0.0.1", {b1}))
        """) + BACKENDS.format(b1=b1, b2=b2), server="""
            location /p {
                set $trace "";
                proxy_pass http://up;
                header_filter_by_lua_block { ngx.header.content_length = nil }
                body_filter_by_lua_block {
                    ngx.arg[1] = ngx.arg[2] and ngx.ctx.out or ""
                }
            }
        """)
        r = n.get("/p?a=1", headers={"X-Probe": "v"})
        assert r.status == 200
        return positionless(r.text).splitlines()

    got = differential(nginx, run)
    differ = [(mine, ref) for mine, ref in zip(got["luaguard"],
                                               got["reference"])
              if mine != ref]
    assert differ == [], "\n".join(map(str, differ))
    assert len(got["luaguard"]) == len(API_PROBES)


class Silent(TcpServer):
    """Accepts and never answers: only a timeout ends the try."""

    def __init__(self):
        self.release = threading.Event()
        super().__init__()

    def serve(self, conn):
        self.release.wait(30)
        conn.close()


def test_set_timeouts_applies_to_this_request(nginx):
    def run(nginx, module):
        silent = Silent()
        try:
            _, _, closed = ports()
            n = nginx(module=module, http=upstream(closed, f"""
                if ngx.var.arg_short then
                    assert(b.set_timeouts(nil, nil, 0.2))
                end
                assert(b.set_current_peer("127.0.0.1", {silent.port}))
            """), server="""
                location /p { proxy_pass http://up; proxy_read_timeout 1h; }
            """)
            status = n.get("/p?short=1").status
            timed_out = "upstream timed out" in n.read_log()
            return status, timed_out
        finally:
            silent.release.set()
            silent.close()

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"] == (504, True)


def test_recreate_request_rebuilds_what_goes_upstream(nginx):
    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, http=upstream(closed, f"""
            if not b.get_last_failure() then
                assert(b.set_more_tries(1))
                assert(b.set_current_peer("127.0.0.1", {closed}))
                return
            end
            ngx.var.try = "2"
            if ngx.var.arg_recreate then
                assert(b.recreate_request())
            end
            assert(b.set_current_peer("127.0.0.1", {b1}))
        """) + BACKENDS.format(b1=b1, b2=b2), server="""
            location /p {
                set $try 1;
                proxy_set_header X-Try $try;
                proxy_pass http://up;
            }
        """)
        return (n.get("/p").text, n.get("/p?recreate=1").text,
                n.request("/p?recreate=1", method="POST", body=b"abc").text)

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"] == (
        "b1 1 GET nil\n", "b1 2 GET nil\n", "b1 2 POST abc\n")


def test_keepalive_after_the_balancer_reuses_connections(nginx):
    def run(nginx, module):
        b1, b2, closed = ports()
        n = nginx(module=module, http=upstream(closed, f"""
            assert(b.set_current_peer("127.0.0.1", {b1}))
        """, extra="keepalive 4;") + BACKENDS.format(b1=b1, b2=b2), server="""
            location /p {
                proxy_pass http://up/conn;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }
        """)
        first, second = n.get("/p").text, n.get("/p").text
        return first == second

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"] is True


@pytest.mark.parametrize("module", BOTH)
def test_lua_errors_and_exit_codes(nginx, module):
    b1, b2, closed = ports()
    n = nginx(module=module, http=upstream(closed, f"""
        local t = ngx.var.arg_t
        if t == "error" then error("boom") end
        if t == "exit403" then ngx.exit(403) end
        if t == "exitok" then ngx.exit(ngx.OK) end
        assert(b.set_current_peer("127.0.0.1", {b1}))
    """) + BACKENDS.format(b1=b1, b2=b2),
        server="location /p { proxy_pass http://up; }")
    assert n.get("/p?t=error").status == 500
    assert "failed to run balancer_by_lua*: " in n.read_log()
    assert "boom" in n.read_log()
    # ngx.exit with an error status fails the try, ngx.exit(ngx.OK) lets
    # the handler go on (and here set the peer), as lua-nginx-module does.
    assert n.get("/p?t=exit403").status == 500
    assert n.get("/p?t=exitok").text == "b1 nil GET nil\n"


def test_outside_the_balancer_no_upstream_is_found(nginx):
    code = """
        local b = require "ngx.balancer"
        local function show(...)
            local t = {}
            for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
            ngx.say(table.concat(t, ","))
        end
        show(b.set_current_peer("127.0.0.1", 80))
        show(b.set_more_tries(1))
        show(b.get_last_failure())
        show(b.set_timeouts(1, 1, 1))
        show(b.recreate_request())
    """

    def run(nginx, module):
        n = nginx(module=module, server=f"""
            location /c {{ content_by_lua_block {{ {code} }} }}""")
        return n.get("/c").text

    got = differential(nginx, run)
    assert got["luaguard"] == got["reference"]
    assert got["luaguard"].splitlines()[0] == "nil,no upstream found"


@pytest.mark.parametrize("module", BOTH)
def test_directive_contexts(nginx_conf, module):
    n = nginx_conf(module=module, server="""
        location /p { balancer_by_lua_block { } }""")
    ok, out = n.test_config()
    assert not ok and "is not allowed here" in out
    n = nginx_conf(module=module, http="""
        upstream up {
            server 127.0.0.1:1;
            balancer_by_lua_block { }
            balancer_by_lua_block { }
        }""")
    ok, out = n.test_config()
    assert not ok and "is duplicate" in out


def test_syntax_errors_fail_nginx_t(nginx_conf):
    # luaguard compiles inline code while reading the configuration
    # (docs/compatibility.md); lua-nginx-module waits for the first try.
    n = nginx_conf(http="""
        upstream up {
            server 127.0.0.1:1;
            balancer_by_lua_block { local x = }
        }""")
    ok, out = n.test_config()
    assert not ok and "nginx.conf:" in out


# ---- luaguard's hardening ----

@pytest.mark.asan_fast
def test_egress_policy_judges_the_peer(nginx):
    class Recorder(TcpServer):
        def serve(self, conn):
            conn.close()

    denied = Recorder()
    try:
        b1, b2, closed = ports()
        n = nginx(http=upstream(closed, f"""
            local port = ngx.var.arg_to == "denied" and {denied.port} or {b1}
            local ok, err = b.set_current_peer("127.0.0.1", port)
            if not ok then
                ngx.log(ngx.ERR, "set_current_peer: ", err)
                return ngx.exit(500)
            end
        """) + BACKENDS.format(b1=b1, b2=b2), server=f"""
            location /p {{
                lua_egress deny 127.0.0.1 port={denied.port};
                proxy_pass http://up;
            }}
        """)
        assert n.get("/p?to=denied").status == 500
        log = n.read_log()
        assert "set_current_peer: destination not allowed by policy" in log
        assert (f"lua balancer: connection to 127.0.0.1:{denied.port} "
                "refused by the egress policy") in log
        assert n.get("/p").text == "b1 nil GET nil\n"
        assert denied.accepted == 0
    finally:
        denied.close()


RECORD = ("import socket,sys\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)\n"
          "print('ready', flush=True)\n"
          "while True:\n"
          "    c,_=s.accept(); open(sys.argv[3],'a').write('x'); c.close()\n")


def test_metadata_peer_refused_by_default(nginx, netns, tmp_path):
    # In a namespace of its own: a broken policy reaches only its lo.
    rec = tmp_path / "accepted"
    p = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3",
                          "-c", RECORD, "169.254.169.254", "80", str(rec)],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        n = nginx(netns=netns, http=upstream(free_port(), """
            local ok, err = b.set_current_peer("169.254.169.254", 80)
            ngx.log(ngx.ERR, "set_current_peer: ", err)
            if not ok then return ngx.exit(500) end
        """), server="location /p { proxy_pass http://up; }")
        assert n.get("/p").status == 500
        assert "set_current_peer: destination not allowed by policy" \
            in n.read_log()
        assert not rec.exists()
    finally:
        p.kill()
        p.wait()


@pytest.mark.asan_fast
def test_runaway_balancer_is_stopped_not_the_worker(nginx):
    b1, b2, closed = ports()
    n = nginx(http="lua_budget_slice 100ms;\n" + upstream(closed, f"""
        if ngx.var.arg_spin then while true do end end
        assert(b.set_current_peer("127.0.0.1", {b1}))
    """) + BACKENDS.format(b1=b1, b2=b2),
        server="location /p { proxy_pass http://up; }")
    before = n.worker_pids()
    assert n.get("/p?spin=1").status == 500
    assert "lua_budget_slice exceeded" in n.read_log()
    assert n.get("/p").text == "b1 nil GET nil\n"
    assert n.worker_pids() == before
