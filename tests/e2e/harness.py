"""Runs a real /usr/sbin/nginx with luaguard (or the reference
lua-nginx-module) loaded, on a free loopback port, and checks its error log
for anything that must never happen."""

import http.client
import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NGINX = "/usr/sbin/nginx"
MODULE = os.environ.get(
    "LUAGUARD_MODULE", str(REPO / "build" / "ngx_http_luaguard_module.so"))
REFERENCE_MODULES = [
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
]
ASAN = os.environ.get("LUAGUARD_ASAN") == "1"

# Lines that fail any test: nginx's own alarms, a crashed worker, and any
# sanitizer report.
FATAL = re.compile(
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(?:alert|crit|emerg)\]|"
    r"exited on signal|exited with code [1-9]|AddressSanitizer|LeakSanitizer|"
    r"UndefinedBehaviorSanitizer|\.(?:c|cc|cpp|h|hpp):\d+:\d+: runtime error:")


TEMPLATE = """\
{load}
worker_processes {workers};
daemon on;
master_process on;
error_log {prefix}/logs/error.log {log_level};
pid {prefix}/nginx.pid;
{main}
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type text/plain;
{http}
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
{server}
    }}
}}
"""


def exited(pid):
    """True once `pid` has ended. The daemonized master is reaped by
    whatever runs as PID 1, which may take seconds: a zombie has ended."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n):
    """n distinct free ports: bound together while chosen (a port closed
    before the next bind can be handed out again, and a port meant to
    stay closed would then be a live server's)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return tuple(s.getsockname()[1] for s in socks)
    finally:
        for s in socks:
            s.close()


class TcpServer:
    """A TCP server on loopback for tests: accepts in a thread of its own
    and hands each connection to `serve(conn)`, in the accept loop
    (`threaded = False`) or in a thread per connection. `accepted` counts
    connections. Subclasses define serve()."""

    threaded = True

    def __init__(self, host="127.0.0.1", backlog=64):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    def accept_loop(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.threaded:
                threading.Thread(target=self.serve, args=(c,),
                                 daemon=True).start()
            else:
                self.serve(c)

    def serve(self, conn):
        raise NotImplementedError

    def close(self):
        """Wakes the accept loop and waits for it before the fd is closed:
        a loop still running could accept on the next socket given the
        same fd number, another test's listener."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


class Dns:
    """A DNS server on loopback UDP. `answer(name)` gives the IPv4 address
    of a name, or None: NXDOMAIN. A known name asked for another record
    type gets an empty answer. `queries` records (name, qtype)."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.queries = []
        threading.Thread(target=self.loop, daemon=True).start()

    def loop(self):
        while True:
            try:
                q, addr = self.sock.recvfrom(512)
            except OSError:
                return
            qid, = struct.unpack("!H", q[:2])
            i, labels = 12, []
            while q[i]:
                labels.append(q[i + 1:i + 1 + q[i]].decode())
                i += 1 + q[i]
            qtype, = struct.unpack("!H", q[i + 1:i + 3])
            question = q[12:i + 5]
            name = ".".join(labels)
            self.queries.append((name, qtype))
            ip = self.answer(name)
            if ip is None:
                flags, ans = 0x8183, b""
            elif qtype == 1:
                flags, ans = 0x8180, (b"\xc0\x0c"
                                      + struct.pack("!HHIH", 1, 1, 0, 4)
                                      + socket.inet_aton(ip))
            else:
                flags, ans = 0x8180, b""
            hdr = struct.pack("!HHHHHH", qid, flags, 1, 1 if ans else 0, 0, 0)
            self.sock.sendto(hdr + question + ans, addr)

    def close(self):
        self.sock.close()


def sanitizer_env():
    env = dict(os.environ)
    if ASAN:
        libs = []
        for name in ("libasan.so", "libubsan.so"):
            out = subprocess.run(["gcc", "-print-file-name=" + name],
                                 capture_output=True, text=True).stdout.strip()
            libs.append(out)
        env["LD_PRELOAD"] = " ".join(libs)
        # nginx frees its pools at exit only partly by design; leaks are not
        # what this run looks for.
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1"
    return env


def read_chunked_response(f):
    """Reads one chunked HTTP/1.1 200 response from file f; returns its body
    (where its chunks end is the server's choice, not the body's)."""
    assert f.readline().startswith(b"HTTP/1.1 200")
    while f.readline() != b"\r\n":
        pass
    body = b""
    while True:
        size = int(f.readline().strip(), 16)
        chunk = f.read(size + 2)[:-2]
        if size == 0:
            return body
        body += chunk


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers          # list of (name, value)
        self.body = body                # bytes

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def header(self, name):
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


class Nginx:
    def __init__(self, prefix, *, server="", http="", main="", workers=1,
                 module="luaguard", log_level="info", files=None,
                 extra_load="", netns=None):
        self.prefix = Path(prefix)
        self.module = module
        self.workers = workers
        # Run inside this network namespace (ip netns): for tests whose
        # destinations must never be reachable from the host.
        self.netns = netns
        # Not a port the test chose for its own servers (free_ports closes
        # them before this: the OS may hand one out again, and the test's
        # server block would then answer on nginx's main port).
        own = server + http + main
        self.port = free_port()
        while re.search(rf"\b{self.port}\b", own):
            self.port = free_port()
        self.log_path = self.prefix / "logs" / "error.log"
        self.conf_path = self.prefix / "conf" / "nginx.conf"
        for d in ("logs", "conf", "tmp", "html"):
            (self.prefix / d).mkdir(parents=True, exist_ok=True)
        for name, content in (files or {}).items():
            path = self.prefix / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        if module == "luaguard":
            load = f"load_module {MODULE};"
        else:
            load = "\n".join(f"load_module {m};" for m in REFERENCE_MODULES)
        load += "\n" + extra_load
        fmt = dict(prefix=self.prefix, port=self.port, workers=workers,
                   log_level=log_level)
        self.conf = TEMPLATE.format(
            load=load, main=self.fill(main, fmt), http=self.fill(http, fmt),
            server=self.fill(server, fmt), **fmt)
        self.conf_path.write_text(self.conf)
        self.started = False
        self.log_offset = 0
        self.expected_exits = set()

    @staticmethod
    def fill(text, fmt):
        """Replaces {port}, {prefix} and {workers} only: Lua code is full of
        braces."""
        for k, v in fmt.items():
            text = text.replace("{" + k + "}", str(v))
        return text

    # ---- lifecycle ----
    def wrap(self, argv):
        return (["ip", "netns", "exec", self.netns] + argv if self.netns
                else argv)

    def cmd(self, *args, check=True):
        return subprocess.run(
            self.wrap([NGINX, "-p", str(self.prefix), "-c",
                       str(self.conf_path), *args]),
            capture_output=True, text=True, env=sanitizer_env(), check=check)

    def test_config(self):
        """`nginx -t`: returns (ok, output)."""
        r = self.cmd("-t", check=False)
        return r.returncode == 0, r.stdout + r.stderr

    def start(self):
        r = self.cmd(check=False)
        if r.returncode != 0:
            raise RuntimeError(f"nginx failed to start:\n{r.stderr}\n"
                               f"{self.read_log()}")
        self.started = True
        self.wait_ready()
        self.wait_workers()
        return self

    def wait_workers(self, timeout=15):
        """The master listens before it forks: wait for the workers too."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.worker_pids()) >= self.workers:
                return
            time.sleep(0.02)
        raise RuntimeError("workers did not start:\n" + self.read_log())

    def wait_ready(self, timeout=15):
        if self.netns:
            probe = ("import socket,time,sys\n"
                     "for _ in range(750):\n"
                     "    try:\n"
                     f"        socket.create_connection(('127.0.0.1', {self.port}), 0.5).close(); sys.exit(0)\n"
                     "    except OSError: time.sleep(0.02)\n"
                     "sys.exit(1)\n")
            if subprocess.run(self.wrap(["/usr/bin/python3", "-c", probe])
                              ).returncode != 0:
                raise RuntimeError("nginx did not start listening:\n"
                                   + self.read_log())
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nginx did not start listening:\n" + self.read_log())

    def master_pid(self):
        return int((self.prefix / "nginx.pid").read_text().strip())

    def worker_pids(self):
        out = subprocess.run(["pgrep", "-P", str(self.master_pid())],
                             capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def reload(self):
        old = set(self.worker_pids())
        os.kill(self.master_pid(), signal.SIGHUP)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pids = set(self.worker_pids())
            if pids and not (pids & old):
                return
            time.sleep(0.05)
        raise RuntimeError("reload did not replace the workers")

    def stop(self, graceful=True):
        if not self.started:
            return
        self.started = False
        try:
            pid = self.master_pid()
        except (OSError, ValueError):
            return
        os.kill(pid, signal.SIGQUIT if graceful else signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if exited(pid):
                return
            time.sleep(0.02)
        # Its workers too: one spinning in a test that failed would
        # otherwise outlive the master and take a core for good.
        for worker in self.worker_pids():
            os.kill(worker, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        raise RuntimeError("nginx did not stop in time")

    # ---- the error log ----
    def read_log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def new_log(self):
        """The log written since the previous call."""
        text = self.read_log()
        out = text[self.log_offset:]
        self.log_offset = len(text)
        return out

    def expect_exit(self, pid):
        """The worker `pid` is meant to end with a non-zero code (the
        watchdog's last resort): its "exited with code" line is not a
        failure."""
        self.expected_exits.add(int(pid))

    def expected_exit(self, line):
        m = re.search(r"\b(\d+) exited with code [1-9]", line)
        return bool(m) and int(m.group(1)) in self.expected_exits

    def fatal_lines(self):
        # The level is the line's own: request data quoted inside a message
        # (escaped, on that message's line) does not count.
        lines = [ln for ln in self.read_log().splitlines()
                 if FATAL.search(ln) and not self.expected_exit(ln)]
        for f in self.prefix.glob("asan.*"):
            lines.append(f.read_text(errors="replace"))
        return lines

    def wait_log(self, pattern, timeout=10, fresh=False):
        """Waits until `pattern` (a regex) appears in the error log; with
        `fresh`, in what was written since the last new_log()."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = rx.search(self.read_log()[self.log_offset if fresh else 0:])
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not in log:\n{self.read_log()}")

    # ---- requests ----
    def request(self, path, method="GET", headers=None, body=None,
                timeout=10, version=None):
        if self.netns:
            return self.netns_get(path, timeout)
        conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=timeout)
        if version == "1.0":
            conn._http_vsn = 10
            conn._http_vsn_str = "HTTP/1.0"
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return Response(resp.status, resp.getheaders(), data)
        finally:
            conn.close()

    def netns_get(self, path, timeout):
        """A GET from inside the namespace (a client there, not here)."""
        script = ("import http.client,json,base64\n"
                  f"c = http.client.HTTPConnection('127.0.0.1', {self.port}, timeout={timeout})\n"
                  f"c.request('GET', {path!r})\n"
                  "r = c.getresponse()\n"
                  "print(json.dumps([r.status, r.getheaders(), "
                  "base64.b64encode(r.read()).decode()]))\n")
        out = subprocess.run(self.wrap(["/usr/bin/python3", "-c", script]),
                             capture_output=True, text=True, check=True).stdout
        import base64
        import json
        status, headers, body = json.loads(out)
        return Response(status, [tuple(h) for h in headers],
                        base64.b64decode(body))

    def get(self, path, **kw):
        return self.request(path, **kw)

    def raw(self, data, timeout=10, read_until_close=True):
        """Sends raw bytes, returns everything the server answers."""
        with socket.create_connection(("127.0.0.1", self.port),
                                      timeout) as s:
            s.sendall(data)
            chunks = []
            while True:
                try:
                    b = s.recv(65536)
                except socket.timeout:
                    break
                if not b:
                    break
                chunks.append(b)
                if not read_until_close:
                    break
            return b"".join(chunks)
