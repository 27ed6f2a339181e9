"""Scenarios and nginx configurations shared by bench/run.py and
bench/callgrind.py.

Every scenario is one location in one configuration; the configuration of
luaguard and of the reference (Debian's lua-nginx-module) differ only in
their load_module lines (and the ports, since both run at once), so the two
modules serve byte-for-byte the same Lua. Traffic goes to 127.0.0.1 only.
"""

import http.client
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

NGINX = "/usr/sbin/nginx"
REFERENCE_MODULES = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
]
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

# What luaguard logs for an API another branch has not built yet.
PENDING = re.compile(
    r"((?:ngx|require)[\w.\"' ()]*?) is not implemented in luaguard yet")

POST_BODY = "b" * 1024


class Scenario:
    def __init__(self, name, title, location, path, expect, *,
                 method="GET", headers=None, body=None, api="", http="",
                 tls=False, files=None):
        self.name = name
        self.title = title
        self.location = location      # nginx location block(s)
        self.path = path              # what the client requests
        self.expect = expect          # expected body prefix (bytes)
        self.method = method
        self.headers = headers or {}
        self.body = body
        self.api = api                # what it exercises, for the table
        self.http = http              # http-level lines it needs
        # A new TLS connection per request to a server of its own
        # (bench/callgrind.py only: the wrk table leaves it out).
        self.tls = tls
        self.files = files or {}      # conf/NAME -> text, written by render


# Placeholders in a scenario's text: the loopback upstream's port, and
# luaguard's directives that the reference does not know (empty there).
def expand(text, module, up_port):
    strict = "" if module == "reference" else "lua_sandbox strict;"
    return (text.replace("{up_port}", str(up_port))
            .replace("{sandbox_strict}", strict))


# A 10 KB JSON document (the json scenario decodes and re-encodes it).
JSON_DOC = "{\"items\": [" + ", ".join(
    '{\"id\": %d, \"name\": \"item-%d\", \"tags\": [\"a\", \"b\"], '
    '\"price\": %d.5, \"ok\": true}' % (i, i, i) for i in range(130)) + "]}"

# Ten locations under `lua_sandbox strict`, one of them requested.
STRICT_LOCATIONS = "\n".join("""
        location = /strict%d {
            {sandbox_strict}
            content_by_lua_block {
                local t = {}
                for i = 1, 4 do t[i] = string.format("%%d", i * %d) end
                ngx.say("strict ", table.concat(t, ","))
            }
        }""" % (i, i) for i in range(10))


SCENARIOS = [
    Scenario(
        "ceiling", "return 200 (no Lua)", """
        location = /ceiling {
            return 200 "ok\\n";
        }""", "/ceiling", b"ok\n", api="nginx alone"),
    Scenario(
        "hello", "hello world", """
        location = /hello {
            content_by_lua_block {
                ngx.say("hello world")
            }
        }""", "/hello", b"hello world\n", api="ngx.say"),
    Scenario(
        "var_header", "ngx.var + ngx.header", """
        location = /var {
            content_by_lua_block {
                local uri = ngx.var.uri
                local a = ngx.var.arg_a
                local host = ngx.var.host
                ngx.header["X-Bench"] = "1"
                ngx.header.cache_control = "no-store"
                ngx.header.content_type = "text/plain"
                ngx.say("var ", uri, " ", a, " ", host)
            }
        }""", "/var?a=42", b"var /var 42 ", api="ngx.var, ngx.header"),
    Scenario(
        "req_headers_args", "get_headers + get_uri_args", """
        location = /reqinfo {
            content_by_lua_block {
                local h = ngx.req.get_headers()
                local args = ngx.req.get_uri_args()
                local n = 0
                for _ in pairs(h) do n = n + 1 end
                ngx.say("req ", args.a, " ", args.b, " ", h["x-bench"], " ",
                        n > 0)
            }
        }""", "/reqinfo?a=1&b=two&c=3&d=4", b"req 1 two yes true",
        headers={"X-Bench": "yes", "Accept": "*/*",
                 "User-Agent": "luaguard-bench"},
        api="ngx.req.get_headers, ngx.req.get_uri_args"),
    Scenario(
        "shdict", "shared dict set/incr", """
        location = /shdict {
            content_by_lua_block {
                local d = ngx.shared.bench
                local n = d:incr("hits", 1, 0)
                d:set("k" .. (n % 128), n)
                local v = d:get("k" .. (n % 128))
                ngx.say("shdict ", v == n)
            }
        }""", "/shdict", b"shdict true", api="lua_shared_dict"),
    Scenario(
        "regex", "ngx.re.match + gsub (jo)", """
        location /re/ {
            content_by_lua_block {
                local m = ngx.re.match(ngx.var.uri, [[^/re/(\\w+)/(\\d+)$]],
                                       "jo")
                local s, n = ngx.re.gsub("hello world, hello bench",
                                         [[hel+o]], "bye", "jo")
                ngx.say("re ", m[1], " ", m[2], " ", s, " ", n)
            }
        }""", "/re/item/12345", b"re item 12345 bye world, bye bench 2",
        api="ngx.re"),
    Scenario(
        "phases_ctx", "4 phases + ngx.ctx", """
        location = /phases {
            rewrite_by_lua_block {
                ngx.ctx.n = 1
            }
            access_by_lua_block {
                ngx.ctx.n = ngx.ctx.n + 1
            }
            content_by_lua_block {
                ngx.ctx.n = ngx.ctx.n + 1
                ngx.say("phases ", ngx.ctx.n)
            }
            log_by_lua_block {
                local n = ngx.ctx.n + 1
            }
        }""", "/phases", b"phases 3", api="rewrite/access/content/log"),
    Scenario(
        "cpu_loop", "CPU-bound Lua loop", """
        location = /loop {
            content_by_lua_block {
                local t = {}
                for i = 1, 1000 do t[i] = i * 3 end
                local s = 0
                for j = 1, 50 do
                    for i = 1, 1000 do s = (s + t[i] * j) % 1000003 end
                end
                local parts = {}
                for i = 1, 50 do parts[i] = tostring(i) end
                ngx.say("loop ", s, " ", #table.concat(parts, ","))
            }
        }""", "/loop", b"loop ", api="plain Lua (JIT)"),
    Scenario(
        "cosocket", "cosocket keepalive round trip", """
        location = /cosocket {
            content_by_lua_block {
                local sock = ngx.socket.tcp()
                sock:settimeout(2000)
                local ok, err = sock:connect("127.0.0.1", {up_port})
                if not ok then
                    ngx.status = 502
                    ngx.say("connect: ", err)
                    return
                end
                sock:send("GET /pong HTTP/1.1\\r\\nHost: up\\r\\n\\r\\n")
                local len
                while true do
                    local line, err = sock:receive("*l")
                    if not line then
                        ngx.status = 502
                        ngx.say("receive: ", err)
                        return
                    end
                    if line == "" then break end
                    local n = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
                    if n then len = tonumber(n) end
                end
                local body = sock:receive(len)
                sock:setkeepalive(10000, 16)
                ngx.say("sock ", body)
            }
        }""", "/cosocket", b"sock pong", api="ngx.socket.tcp"),
    Scenario(
        "capture", "ngx.location.capture", """
        location = /capture {
            content_by_lua_block {
                local res = ngx.location.capture("/sub")
                ngx.say("cap ", res.status, " ", res.body)
            }
        }
        location = /sub {
            internal;
            return 200 "sub";
        }""", "/capture", b"cap 200 sub", api="ngx.location.capture"),
    Scenario(
        "timer", "ngx.timer.at(0) per request", """
        location = /timer {
            content_by_lua_block {
                local ok, err = ngx.timer.at(0, function(premature, n)
                    local x = n + 1
                end, 1)
                ngx.say("timer ", ok and "ok" or err)
            }
        }""", "/timer", b"timer ok", api="ngx.timer.at"),
    Scenario(
        "body", "read_body + get_body_data (1 KiB POST)", """
        location = /body {
            client_body_buffer_size 16k;
            content_by_lua_block {
                ngx.req.read_body()
                local data = ngx.req.get_body_data()
                ngx.say("body ", data and #data)
            }
        }""", "/body", b"body 1024", method="POST", body=POST_BODY,
        headers={"Content-Type": "application/octet-stream"},
        api="ngx.req.read_body, ngx.req.get_body_data"),
    Scenario(
        "headers50", "get_headers of 50 headers", """
        location = /headers50 {
            content_by_lua_block {
                local h = ngx.req.get_headers()
                local n = 0
                for _ in pairs(h) do n = n + 1 end
                ngx.say("headers ", n, " ", h["x-h-49"])
            }
        }""", "/headers50", b"headers 52 v49",
        headers={f"X-H-{i}": f"v{i}" for i in range(50)},
        api="ngx.req.get_headers (50 headers)"),
    Scenario(
        "json", "cjson decode + encode of 10 KB", """
        location = /json {
            content_by_lua_block {
                local cjson = require "cjson"
                local doc = cjson.decode(JSON_DOC)
                doc.items[1].name = "changed"
                local out = cjson.encode(doc)
                ngx.say("json ", #doc.items, " ", #out > 8000)
            }
        }""", "/json", b"json 130 true", api="cjson",
        # lua-nginx-module refuses a string longer than 4 KiB inline
        http="""
    init_by_lua_block {
        local f = assert(io.open(ngx.config.prefix() .. "conf/bench.json"))
        JSON_DOC = f:read("*a")
        f:close()
    }""", files={"bench.json": JSON_DOC}),
    Scenario(
        "strict10", "10 locations, lua_sandbox strict", STRICT_LOCATIONS,
        "/strict7", b"strict 7,14,21,28",
        api="lua_sandbox strict (luaguard), plain (reference)"),
    Scenario(
        "balancer", "balancer_by_lua + keepalive upstream", """
        location = /balancer {
            proxy_pass http://bench_lb/pong;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }""", "/balancer", b"pong", api="balancer_by_lua, ngx.balancer",
        http="""
    upstream bench_lb {
        server 127.0.0.1:1;
        balancer_by_lua_block {
            local b = require "ngx.balancer"
            local ok, err = b.set_current_peer("127.0.0.1", {up_port})
            if not ok then ngx.log(ngx.ERR, err) end
        }
        keepalive 16;
    }"""),
    Scenario(
        "tls_cert", "TLS handshake, ssl_certificate_by_lua", """
        location = /tls {
            return 200 "tls\\n";
        }""", "/tls", b"tls\n", tls=True,
        api="ssl_certificate_by_lua, ngx.ssl (a full handshake per request)",
        http="""
    init_by_lua_block {
        local function read(name)
            local f = assert(io.open(ngx.config.prefix() .. "conf/" .. name,
                                     "rb"))
            local data = f:read("*a")
            f:close()
            return data
        end
        BENCH_CERT, BENCH_KEY = read("bench-cert.der"), read("bench-key.der")
    }"""),
]

BY_NAME = {s.name: s for s in SCENARIOS}

# The TLS scenario's server: the certificate comes from Lua; nginx wants
# one configured all the same (the same pair).
TLS_SERVER = """
        ssl_certificate {prefix}/conf/bench-cert.pem;
        ssl_certificate_key {prefix}/conf/bench-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
        ssl_certificate_by_lua_block {
            local ssl = require "ngx.ssl"
            assert(ssl.clear_certs())
            assert(ssl.set_der_cert(BENCH_CERT))
            assert(ssl.set_der_priv_key(BENCH_KEY))
        }
"""


def make_certificate(conf_dir):
    """A self-signed P-256 certificate for localhost, PEM and DER."""
    conf_dir = Path(conf_dir)
    pem, key = conf_dir / "bench-cert.pem", conf_dir / "bench-key.pem"
    if not pem.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec",
                        "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "2", "-subj", "/CN=localhost",
                        "-keyout", str(key), "-out", str(pem)],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-in", str(pem), "-outform",
                        "DER", "-out", str(conf_dir / "bench-cert.der")],
                       check=True, capture_output=True)
        subprocess.run(["openssl", "pkey", "-in", str(key), "-outform",
                        "DER", "-out", str(conf_dir / "bench-key.der")],
                       check=True, capture_output=True)
        for f in conf_dir.glob("bench-*"):
            f.chmod(0o644)  # workers run as nobody

# Scenarios also run with luaguard's hardening on versus off.
HARDENING_SCENARIOS = ["hello", "var_header", "shdict", "phases_ctx",
                       "cpu_loop"]

# Directives that turn luaguard's hardening off, in the order tried; only
# those the module under test accepts are used (and reported).
HARDENING_OFF = [
    "lua_budget_slice off;",
    "lua_budget_request off;",
    "lua_budget_memory off;",
    "lua_budget_timer_slice off;",
    "lua_budget_timer off;",
    "lua_sandbox off;",
]

TEMPLATE = """\
{load}
worker_processes 1;
{main}
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type text/plain;
    keepalive_requests 10000000;
    keepalive_timeout 60s;
    lua_shared_dict bench 16m;
{http}
    server {{
        listen 127.0.0.1:{port}{ssl};
        server_name localhost;
{locations}
    }}
    # The cosocket scenario's upstream: same worker, its own port.
    server {{
        listen 127.0.0.1:{up_port};
        server_name up;
        location / {{
            return 200 "pong";
        }}
    }}
}}
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_lines(module):
    """module: path of luaguard's .so, or "reference"."""
    if module == "reference":
        return "\n".join(f"load_module {m};" for m in REFERENCE_MODULES)
    return f"load_module {module};"


def write_files(prefix, scenarios):
    """The files the scenarios read (Scenario.files) into PREFIX/conf."""
    for s in scenarios:
        for name, text in s.files.items():
            f = Path(prefix) / "conf" / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
            f.chmod(0o644)  # workers run as nobody


def render(module, prefix, port, up_port, scenarios, *, main="", http=""):
    locs = expand("\n".join(s.location for s in scenarios), module, up_port)
    http = "\n".join([http] + [expand(s.http, module, up_port)
                               for s in scenarios if s.http])
    write_files(prefix, scenarios)
    ssl = ""
    if any(s.tls for s in scenarios):
        if len(scenarios) != 1:
            raise ValueError("a TLS scenario has a configuration of its own")
        make_certificate(Path(prefix) / "conf")
        ssl = " ssl"
        locs = TLS_SERVER.replace("{prefix}", str(prefix)) + locs
    return TEMPLATE.format(load=load_lines(module), main=main, http=http,
                           prefix=prefix, port=port, up_port=up_port,
                           locations=locs, ssl=ssl)


def make_prefix(prefix):
    prefix = Path(prefix)
    for d in ("logs", "conf", "tmp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    return prefix


def nginx_test(module, prefix, http=""):
    """`nginx -t` of a minimal configuration: does the module accept the
    directives in `http`?"""
    prefix = make_prefix(prefix)
    conf = prefix / "conf" / "probe.conf"
    conf.write_text(render(module, prefix, free_port(), free_port(), [],
                           http=http))
    r = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)],
                       capture_output=True, text=True)
    return r.returncode == 0, r.stderr


def nginx_log_or_test(prefix, conf):
    """What nginx said: its error log, or `nginx -t` when it wrote none."""
    log = Path(prefix) / "logs" / "error.log"
    if log.exists():
        return log.read_text(errors="replace")[-2000:]
    r = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)],
                       capture_output=True, text=True)
    return r.stderr[-2000:]


def accepted_hardening_off(module, workdir):
    ok = []
    for i, d in enumerate(HARDENING_OFF):
        good, _ = nginx_test(module, Path(workdir) / f"probe{i}", http=d)
        if good:
            ok.append(d)
    return ok


def wait_port(port, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def request(port, s, timeout=10, conn=None):
    """One request of scenario s; returns (status, body bytes)."""
    if s.tls:
        import ssl
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                           context=ctx)
        own = True
    else:
        own = conn is None
    if own:
        conn = conn or http.client.HTTPConnection("127.0.0.1", port,
                                                  timeout=timeout)
    hdrs = dict(s.headers)
    conn.request(s.method, s.path, body=s.body, headers=hdrs)
    r = conn.getresponse()
    body = r.read()
    if own:
        conn.close()
    return r.status, body


def stop_process(proc, sig=signal.SIGQUIT, timeout=30, resend_every=5):
    """Stops nginx with `sig`, sending it again while it has not exited
    (under valgrind the first signal is sometimes not acted on), then
    SIGKILL as a last resort. Returns how it ended."""
    if proc.poll() is not None:
        return "exited"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(resend_every)
            return "signal"
        except subprocess.TimeoutExpired:
            continue
    proc.kill()
    proc.wait()
    return "killed"
