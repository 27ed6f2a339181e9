"""Egress policy: which destinations cosockets may reach.

Denied destinations here are loopback addresses (127.0.0.2, ...) with a
listener that records every connection, or, for the cloud metadata
default, 169.254.169.254 on the loopback of a private network namespace:
a broken policy never sends anything off this machine.
"""

import socket
import subprocess
import threading

import pytest

from harness import Dns


def stop_listener(sock, thread):
    """Wakes the accept loop of `thread` and waits for it before the fd
    is closed: a loop still running could otherwise accept on the next
    socket given the same fd number, another test's listener."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    thread.join(5)
    sock.close()


class Recorder:
    """Accepts TCP connections on (host, port), answers one line, counts."""

    def __init__(self, host="127.0.0.2"):
        while True:
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, 0))
            self.port = self.sock.getsockname()[1]
            # The same port on 127.0.0.1 stays bound and not listening:
            # tests connect there expecting a refusal, so no other server
            # of the test (nginx's own listener) may be handed that port.
            self.guard = socket.socket()
            try:
                self.guard.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.guard.close()
                self.sock.close()
        self.sock.listen(64)
        self.accepted = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.sendall(b"reached\n")
            c.close()

    def close(self):
        stop_listener(self.sock, self.thread)
        self.guard.close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


CONNECT = r"""
    local function try(host, port)
        local s = ngx.socket.tcp()
        s:settimeout(2000)
        local ok, err = s:connect(host, port)
        if not ok then return ngx.say(host, ": ", err) end
        ngx.say(host, ": ", s:receive("*l"))
        s:close()
    end
"""


@pytest.mark.asan_fast
def test_deny_rule_refuses_without_connecting(nginx, recorder):
    port = recorder.port
    n = nginx(server=f"""
        location /t {{
            lua_egress deny 127.0.0.2;
            content_by_lua_block {{ {CONNECT}
                try("127.0.0.2", {port})
                try("[::ffff:127.0.0.2]", {port})
                local u = ngx.socket.udp()
                ngx.say("udp: ", select(2, u:setpeername("127.0.0.2", {port})))
            }}
        }}
        location /free {{ content_by_lua_block {{ {CONNECT}
            try("127.0.0.2", {port}) }} }}
    """)
    assert n.get("/t").text == (
        "127.0.0.2: destination not allowed by policy\n"
        "[::ffff:127.0.0.2]: destination not allowed by policy\n"
        "udp: destination not allowed by policy\n")
    assert recorder.accepted == 0
    n.wait_log(r"refused by the egress policy \(lua_egress deny 127\.0\.0\.2\)")
    # The same destination from a location without the rule: reachable, so
    # the refusal above was the policy, not the network.
    assert n.get("/free").text == "127.0.0.2: reached\n"
    assert recorder.accepted == 1


def test_deny_by_default_with_allow_list(nginx, recorder):
    allowed = Recorder("127.0.0.3")
    try:
        n = nginx(server=f"""
            lua_egress_default deny;
            lua_egress allow 127.0.0.3/32 port={allowed.port};
            location /t {{ content_by_lua_block {{ {CONNECT}
                try("127.0.0.3", {allowed.port})
                try("127.0.0.2", {recorder.port})
                try("127.0.0.3", {recorder.port})
            }} }}
        """)
        assert n.get("/t").text == (
            "127.0.0.3: reached\n"
            "127.0.0.2: destination not allowed by policy\n"
            "127.0.0.3: destination not allowed by policy\n")
        assert recorder.accepted == 0 and allowed.accepted == 1
    finally:
        allowed.close()


def test_named_groups_and_ranges(nginx, recorder):
    n = nginx(server=f"""
        location /loop {{
            lua_egress deny loopback;
            content_by_lua_block {{ {CONNECT} try("127.0.0.2", {recorder.port}) }}
        }}
        location /ports {{
            lua_egress deny 127.0.0.0/8 port=1-1023,{recorder.port};
            content_by_lua_block {{ {CONNECT} try("127.0.0.2", {recorder.port}) }}
        }}
        location /first_match {{
            lua_egress allow 127.0.0.2;
            lua_egress deny loopback;
            content_by_lua_block {{ {CONNECT} try("127.0.0.2", {recorder.port}) }}
        }}
    """)
    assert n.get("/loop").text.endswith("destination not allowed by policy\n")
    assert n.get("/ports").text.endswith("destination not allowed by policy\n")
    assert recorder.accepted == 0
    assert n.get("/first_match").text == "127.0.0.2: reached\n"


def test_hostname_resolving_to_denied_address(nginx, recorder):
    # DNS rebinding: the name is checked after resolution, at every
    # connect, whatever it resolved to before.
    flip = {"n": 0}

    def rebinding():
        flip["n"] += 1
        return "127.0.0.1" if flip["n"] == 1 else "127.0.0.2"

    answers = {"good.test": lambda: "127.0.0.1",
               "evil.test": lambda: "127.0.0.2", "rebind.test": rebinding}
    dns = Dns(lambda name: answers[name]() if name in answers else None)
    try:
        n = nginx(server=f"""
            resolver 127.0.0.1:{dns.port} ipv6=off valid=1s;
            resolver_timeout 2s;
            lua_egress deny 127.0.0.2;
            location /t {{ content_by_lua_block {{ {CONNECT}
                try("evil.test", {recorder.port})
                try("rebind.test", {recorder.port})
                -- past the resolver's cache: valid=1s, counted in whole
                -- seconds of nginx's clock
                ngx.sleep(2.1)
                try("rebind.test", {recorder.port})
            }} }}
        """)
        text = n.get("/t").text
        lines = text.splitlines()
        assert lines[0] == "evil.test: destination not allowed by policy"
        # First answer 127.0.0.1 (allowed; nothing listens there), then the
        # name rebinds to the denied address: refused at that connect.
        assert lines[1] == "rebind.test: connection refused", text
        assert lines[2] == "rebind.test: destination not allowed by policy"
        assert recorder.accepted == 0
        assert dns.queries.count(("rebind.test", 1)) >= 2
    finally:
        dns.close()


def run_in(netns, code):
    return subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3",
                             "-c", code], stdout=subprocess.PIPE, text=True)


RECORD = ("import socket,sys\n"
          "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)\n"
          "print('ready', flush=True)\n"
          "while True:\n"
          "    c,_=s.accept(); open(sys.argv[3],'a').write('x'); "
          "c.sendall(b'reached\\n'); c.close()\n")


def listen_in(netns, host, port, record):
    p = subprocess.Popen(["ip", "netns", "exec", netns, "/usr/bin/python3",
                          "-c", RECORD, host, str(port), str(record)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_numeric_spellings_cannot_bypass(nginx, netns, tmp_path):
    # Inside a namespace whose only network is lo: whatever a spelling is
    # read as, nothing can leave. 127.0.0.2 is denied; its other
    # spellings must not reach the listener there either.
    rec = tmp_path / "accepted"
    listener = listen_in(netns, "127.0.0.2", 8080, rec)
    try:
        n = nginx(netns=netns, server=f"""
            location /t {{
                lua_egress deny 127.0.0.2;
                content_by_lua_block {{ {CONNECT}
                try("127.0.0.2", 8080)
                try("2130706434", 8080)     -- 127.0.0.2 as one decimal
                try("0177.0.0.2", 8080)     -- octal: nginx reads 177.0.0.2
                try("0x7f.0.0.2", 8080)
                try("127.2", 8080)          -- inet_aton's short form
                try("[::ffff:7f00:2]", 8080)
            }} }}
            location /free {{ content_by_lua_block {{ {CONNECT}
                try("127.0.0.2", 8080) }} }}
        """)
        lines = n.get("/t").text.splitlines()
        assert lines[0] == "127.0.0.2: destination not allowed by policy"
        assert lines[5] == "[::ffff:7f00:2]: destination not allowed by policy"
        assert all("reached" not in ln for ln in lines), lines
        assert not rec.exists()
        assert n.get("/free").text == "127.0.0.2: reached\n"
    finally:
        listener.kill()
        listener.wait()


def test_unix_socket_rules(nginx, tmp_path):
    path = tmp_path / "peer.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(8)
    got = []

    def loop():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            got.append(1)
            c.sendall(b"unix reached\n")
            c.close()

    accepter = threading.Thread(target=loop, daemon=True)
    accepter.start()
    try:
        n = nginx(main="user root;", server=f"""
            location /deny {{
                lua_egress deny unix:{tmp_path}/*;
                content_by_lua_block {{ {CONNECT} try("unix:{path}") }}
            }}
            location /allow {{
                lua_egress_default deny;
                lua_egress allow unix:{path};
                content_by_lua_block {{ {CONNECT} try("unix:{path}") }}
            }}
        """)
        assert n.get("/deny").text.endswith("destination not allowed by policy\n")
        assert got == []
        assert n.get("/allow").text.endswith("unix reached\n")
    finally:
        stop_listener(srv, accepter)


@pytest.mark.parametrize("directive", [
    "lua_egress allow;", "lua_egress maybe 1.2.3.4;", "lua_egress deny 1.2.3;",
    "lua_egress deny 10.0.0.0/33;", "lua_egress deny any port=0;",
    "lua_egress deny unix:relative;", "lua_egress_default sometimes;"])
def test_bad_egress_directives_fail_nginx_t(nginx_conf, directive):
    ok, out = nginx_conf(http=directive).test_config()
    assert not ok and "nginx.conf:" in out, out


def test_metadata_default_in_a_private_namespace(nginx, netns, tmp_path):
    # A listener on 169.254.169.254:80 inside the namespace records any
    # connection; nginx runs in the same namespace.
    rec = tmp_path / "accepted"
    listener = listen_in(netns, "169.254.169.254", 80, rec)
    try:
        n = nginx(netns=netns, server=f"""
            location /default {{ content_by_lua_block {{ {CONNECT}
                try("169.254.169.254", 80)
                try("[::ffff:169.254.169.254]", 80)
            }} }}
            location /allowed {{
                lua_egress allow metadata;
                content_by_lua_block {{ {CONNECT} try("169.254.169.254", 80) }}
            }}
        """)
        assert n.get("/default").text == (
            "169.254.169.254: destination not allowed by policy\n"
            "[::ffff:169.254.169.254]: destination not allowed by policy\n")
        assert not rec.exists()
        # Explicitly allowed, it is reachable: the refusal was the policy.
        assert n.get("/allowed").text == "169.254.169.254: reached\n"
        assert rec.read_text() == "x"
    finally:
        listener.kill()
        listener.wait()


# ---- side doors (issue 17) ----

class LineServer:
    """Keeps each TCP connection open and answers every line with
    "conn<N> <line>", N counting connections: a reply names the connection
    that carried it."""

    def __init__(self, host="127.0.0.2"):
        # Same port discipline as Recorder: 127.0.0.1 on that port stays
        # bound and not listening, so connecting there is refused.
        while True:
            self.sock = socket.socket()
            self.sock.bind((host, 0))
            self.port = self.sock.getsockname()[1]
            self.guard = socket.socket()
            try:
                self.guard.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.guard.close()
                self.sock.close()
        self.sock.listen(16)
        self.accepted = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.serve, args=(c, self.accepted),
                             daemon=True).start()

    def serve(self, c, n):
        f = c.makefile("rb")
        for line in f:
            c.sendall(b"conn%d %s" % (n, line))
        c.close()

    def close(self):
        stop_listener(self.sock, self.thread)
        self.guard.close()


POOLED = r"""
    local function pooled(host, port)
        local s = ngx.socket.tcp()
        s:settimeout(2000)
        local ok, err = s:connect(host, port, {pool = "shared"})
        if not ok then return ngx.say("connect: ", err) end
        ngx.say("reused: ", s:getreusedtimes())
        s:send(ngx.var.uri .. "\n")
        ngx.say(s:receive())
        ngx.say("keepalive: ", s:setkeepalive())
    end
"""


@pytest.mark.asan_fast
def test_pool_named_by_script_never_crosses_policies(nginx):
    # A connection /open may make (127.0.0.2 allowed) is parked in the
    # pool "shared". Locations with another egress policy (/steal denies
    # 127.0.0.2) or another sandbox profile (/off) name that pool while
    # connecting somewhere harmless (127.0.0.1 on a port that refuses):
    # they must get a fresh connection to where they asked, never the
    # parked one. /again has the same policies as /open and reuses it.
    srv = LineServer()
    p = srv.port
    try:
        n = nginx(server=f"""
            lua_egress allow 127.0.0.2;
            location /open {{ content_by_lua_block {{ {POOLED}
                pooled("127.0.0.2", {p}) }} }}
            location /again {{ content_by_lua_block {{ {POOLED}
                pooled("127.0.0.2", {p}) }} }}
            location /steal {{
                lua_egress deny 127.0.0.2;
                content_by_lua_block {{ {POOLED} pooled("127.0.0.1", {p}) }}
            }}
            location /off {{
                lua_sandbox off;
                content_by_lua_block {{ {POOLED} pooled("127.0.0.1", {p}) }}
            }}
        """)
        assert n.get("/open").text == (
            "reused: 0\nconn1 /open\nkeepalive: 1\n")
        assert n.get("/steal").text == "connect: connection refused\n"
        assert n.get("/off").text == "connect: connection refused\n"
        # Same policies: the parked connection is reused (pools still pool).
        assert n.get("/again").text == (
            "reused: 1\nconn1 /again\nkeepalive: 1\n")
        assert srv.accepted == 1
    finally:
        srv.close()


def test_unspecified_address_is_loopback(nginx):
    # 0.0.0.0 and :: connect to the host's own listeners.
    v4 = socket.socket()
    v4.bind(("127.0.0.1", 0))
    v4.listen(8)
    v6 = socket.socket(socket.AF_INET6)
    v6.bind(("::1", 0))
    v6.listen(8)
    p4, p6 = v4.getsockname()[1], v6.getsockname()[1]
    try:
        n = nginx(server=f"""
            location /t {{
                lua_egress deny loopback;
                content_by_lua_block {{
                    local function try(host, port)
                        local s = ngx.socket.tcp()
                        s:settimeout(2000)
                        ngx.say(host, ": ", select(2, s:connect(host, port))
                                or "connected")
                    end
                    try("0.0.0.0", {p4})
                    try("[::]", {p6})
                    try("[::ffff:0.0.0.0]", {p4})
                }}
            }}
            location /free {{ content_by_lua_block {{
                local s = ngx.socket.tcp()
                s:settimeout(2000)
                ngx.say(s:connect("0.0.0.0", {p4}))
            }} }}
        """)
        assert n.get("/t").text == (
            "0.0.0.0: destination not allowed by policy\n"
            "[::]: destination not allowed by policy\n"
            "[::ffff:0.0.0.0]: destination not allowed by policy\n")
        v4.settimeout(0.5)
        v6.settimeout(0.5)
        for s in (v4, v6):
            with pytest.raises(socket.timeout):
                s.accept()
        # Without the rule the same spelling reaches the listener.
        assert n.get("/free").text == "1\n"
        v4.settimeout(5)
        v4.accept()[0].close()
    finally:
        v4.close()
        v6.close()


class UnixServer:
    """A unix stream socket at `path` that answers "<name>\\n" and
    counts connections."""

    def __init__(self, path, name):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.name = name
        self.accepted = 0
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.sendall(self.name.encode() + b"\n")
            c.close()

    def close(self):
        stop_listener(self.sock, self.thread)


@pytest.fixture
def unix_tree(tmp_path):
    """tmp/app/ok.sock (allowed), tmp/docker.sock (the prize),
    tmp/app/link.sock -> ../docker.sock, tmp/dirlink -> tmp,
    tmp/applink -> app."""
    (tmp_path / "app").mkdir()
    ok = UnixServer(tmp_path / "app" / "ok.sock", "ok")
    prize = UnixServer(tmp_path / "docker.sock", "docker")
    (tmp_path / "app" / "link.sock").symlink_to("../docker.sock")
    (tmp_path / "dirlink").symlink_to(tmp_path)
    (tmp_path / "applink").symlink_to("app")
    yield tmp_path, ok, prize
    ok.close()
    prize.close()


UNIX_TRY = r"""
    local function try(path)
        local s = ngx.socket.tcp()
        s:settimeout(2000)
        local ok, err = s:connect("unix:" .. path)
        if not ok then return ngx.say(err) end
        ngx.say(s:receive())
        s:close()
    end
"""


def test_unix_allow_prefix_cannot_be_escaped(nginx, unix_tree):
    d, ok, prize = unix_tree
    n = nginx(main="user root;", server=f"""
        location /t {{
            lua_egress allow unix:{d}/app/*;
            content_by_lua_block {{ {UNIX_TRY}
                try("{d}/app/ok.sock")
                try("{d}/applink/ok.sock")
                try("{d}/app/../docker.sock")
                try("{d}/app/link.sock")
                try("{d}/app/./../docker.sock")
            }}
        }}
    """)
    assert n.get("/t").text == (
        "ok\nok\n" + "destination not allowed by policy\n" * 3)
    assert prize.accepted == 0 and ok.accepted == 2


@pytest.mark.asan_fast
def test_unix_deny_rule_covers_every_spelling(nginx, unix_tree):
    d, ok, prize = unix_tree
    n = nginx(main="user root;", server=f"""
        location /t {{
            lua_egress deny unix:{d}/docker.sock;
            lua_egress allow unix:*;
            content_by_lua_block {{ {UNIX_TRY}
                try("{d}//docker.sock")
                try("{d}/./docker.sock")
                try("{d}/dirlink/docker.sock")
                try("{d}/app/link.sock")
                try("{d}/app/ok.sock")
            }}
        }}
    """)
    assert n.get("/t").text == (
        "destination not allowed by policy\n" * 4 + "ok\n")
    assert prize.accepted == 0
    n.wait_log(r"refused by the egress policy \(lua_egress deny unix:")


def test_unix_sockets_need_an_allow_rule(nginx, unix_tree):
    # No rule, lua_egress_default allow, and strict: all refuse a unix
    # socket; an allow rule opens it.
    d, ok, prize = unix_tree
    n = nginx(main="user root;", server=f"""
        location /none {{ content_by_lua_block {{ {UNIX_TRY}
            try("{d}/docker.sock") }} }}
        location /open {{
            lua_egress allow any;
            content_by_lua_block {{ {UNIX_TRY} try("{d}/docker.sock") }}
        }}
        location /strict {{
            lua_sandbox strict;
            content_by_lua_block {{ {UNIX_TRY} try("{d}/docker.sock") }}
        }}
        location /allowed {{
            lua_sandbox strict;
            lua_egress allow unix:{d}/docker.sock;
            content_by_lua_block {{ {UNIX_TRY} try("{d}/dirlink/docker.sock") }}
        }}
    """)
    for loc in ("/none", "/open", "/strict"):
        assert n.get(loc).text == "destination not allowed by policy\n", loc
    assert prize.accepted == 0
    assert n.get("/allowed").text == "docker\n"


VARPROXY = r"""
        location /varproxy {
            proxy_pass http://$arg_h:$arg_p;
        }
        location /varhost {
            set $target "";
            proxy_pass http://$target;
        }
        location /hop {
            content_by_lua_block { ngx.exec("/varproxy", ngx.var.args) }
        }
        location /varfcgi { fastcgi_pass $arg_h:$arg_p; }
        location /varscgi { scgi_pass $arg_h:$arg_p; }
        location /varuwsgi { uwsgi_pass $arg_h:$arg_p; }
        location /vargrpc { grpc_pass grpc://$arg_h:$arg_p; }
"""

CAPTURES = r"""
    local function cap(uri, opts)
        local res = ngx.location.capture(uri, opts)
        ngx.say(uri, ": ", res.status)
    end
"""


@pytest.mark.asan_fast
def test_subrequest_upstream_from_variables_follows_policy(nginx, recorder):
    # Lua chooses the upstream of a captured proxy_pass through args, vars,
    # a light hop through ngx.exec, or a name the resolver answers: each
    # connection is judged by the capturing location's policy before it is
    # made.
    p = recorder.port
    dns = Dns(lambda name: "127.0.0.2" if name == "evil.test" else None)
    try:
        n = nginx(http=f"upstream inside {{ server 127.0.0.2:{p}; }}",
                  server=f"""
            resolver 127.0.0.1:{dns.port} ipv6=off;
            {VARPROXY}
            location /t {{
                lua_egress deny 127.0.0.2;
                content_by_lua_block {{ {CAPTURES}
                    cap("/varproxy", {{args = {{h = "127.0.0.2", p = {p}}}}})
                    cap("/varhost", {{vars = {{target = "127.0.0.2:{p}"}}}})
                    cap("/hop", {{args = "h=127.0.0.2&p={p}"}})
                    cap("/varproxy", {{args = {{h = "evil.test", p = {p}}}}})
                    cap("/varproxy", {{args = {{h = "0x7f000002", p = {p}}}}})
                    cap("/varhost", {{vars = {{target = "inside"}}}})
                    for _, m in ipairs{{"fcgi", "scgi", "uwsgi", "grpc"}} do
                        cap("/var" .. m, {{args = {{h = "127.0.0.2", p = {p}}}}})
                    end
                }}
            }}
            location /free {{ content_by_lua_block {{ {CAPTURES}
                cap("/varproxy", {{args = {{h = "127.0.0.2", p = {p}}}}})
            }} }}
        """)
        text = n.get("/t").text
        assert recorder.accepted == 0, text
        lines = text.splitlines()
        assert lines[:4] == ["/varproxy: 500", "/varhost: 500", "/hop: 500",
                             "/varproxy: 500"], text
        # nginx reads 0x7f000002 as a name: the resolver says NXDOMAIN.
        assert lines[4] == "/varproxy: 502", text
        # A variable naming an upstream{} block: its servers are judged.
        assert lines[5] == "/varhost: 500", text
        assert lines[6:] == ["/varfcgi: 500", "/varscgi: 500",
                             "/varuwsgi: 500", "/vargrpc: 500"], text
        n.wait_log(r"lua upstream: connection to 127\.0\.0\.2:"
                   r"\d+ refused by the egress policy \(lua_egress deny "
                   r"127\.0\.0\.2\)")
        # The same capture from a location without the rule connects: the
        # refusals above were the policy.
        n.get("/free")
        assert recorder.accepted == 1
    finally:
        dns.close()


def test_subrequest_to_metadata_refused_by_default(nginx, netns, tmp_path):
    # strict code with the built-in policy: the metadata address, reached
    # through a captured proxy_pass whose target comes from the args.
    rec = tmp_path / "accepted"
    listener = listen_in(netns, "169.254.169.254", 80, rec)
    try:
        n = nginx(netns=netns, server=f"""
            {VARPROXY}
            location /t {{
                lua_sandbox strict;
                content_by_lua_block {{ {CAPTURES}
                    cap("/varproxy", {{args = {{h = "169.254.169.254", p = 80}}}})
                    -- a string: a table's values would be URI-escaped, and
                    -- $arg_h is not unescaped
                    cap("/varproxy", {{args = "h=[::ffff:a9fe:a9fe]&p=80"}})
                }}
            }}
            location /allowed {{
                lua_egress allow metadata;
                content_by_lua_block {{ {CAPTURES}
                    cap("/varproxy", {{args = {{h = "169.254.169.254", p = 80}}}})
                }}
            }}
        """)
        assert n.get("/t").text == "/varproxy: 500\n/varproxy: 500\n"
        assert not rec.exists()
        n.get("/allowed")
        assert rec.read_text() == "x"
    finally:
        listener.kill()
        listener.wait()


def test_upstream_variable_set_by_lua_follows_policy(nginx, recorder):
    # Without a capture: Lua sets the variable a proxy_pass reads, in its
    # own location (rewrite_by_lua) or before ngx.exec into another. The
    # policy of the locations Lua ran in judges the upstream. A location
    # where no Lua ran is the configuration's own business.
    p = recorder.port
    n = nginx(server=f"""
        {VARPROXY}
        location /same {{
            lua_egress deny 127.0.0.2;
            set $target "";
            rewrite_by_lua_block {{ ngx.var.target = "127.0.0.2:{p}" }}
            proxy_pass http://$target;
        }}
        location /jump {{
            lua_egress deny 127.0.0.2;
            set $target "";
            rewrite_by_lua_block {{
                ngx.var.target = "127.0.0.2:{p}"
                ngx.exec("/varhost")
            }}
        }}
        location /sleepy {{
            lua_egress deny 127.0.0.2;
            set $target "";
            access_by_lua_block {{
                ngx.sleep(0.001)  -- the connect then runs from our event
                ngx.var.target = "127.0.0.2:{p}"
            }}
            proxy_pass http://$target;
        }}
    """)
    for loc in ("/same", "/jump", "/sleepy"):
        assert n.get(loc).status == 500, loc
    assert recorder.accepted == 0
    try:
        n.get(f"/varproxy?h=127.0.0.2&p={p}")
    except Exception:
        pass  # the recorder's answer is no HTTP: nginx relays it raw
    assert recorder.accepted == 1
