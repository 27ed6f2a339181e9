"""The example gateway of `make run`, exercised the way README.md tells a
new user to: scripts/run-example.sh renders the configuration (here on a
free port, into the test's prefix) and prints the lines to try; nginx
starts through the harness; every printed line runs in bash, in order,
and its output is checked. README.md must show the same lines."""

import json
import os
import re
import subprocess
import time

import pytest

from harness import MODULE as BUILT, REPO, Nginx, sanitizer_env

SCRIPT = REPO / "scripts" / "run-example.sh"
README = REPO / "README.md"
MODULE = os.path.realpath(BUILT)


def start_example(nginx, tmp_path):
    """Renders the example with the script and starts it; returns the
    server and the (comment, command) lines the script printed."""
    n = Nginx(tmp_path / "example", workers=2)   # a free port, the dirs
    out = subprocess.run(
        [str(SCRIPT), "--render-only", MODULE, str(n.port), str(n.prefix)],
        capture_output=True, text=True, check=True,
        env=sanitizer_env()).stdout
    nginx.servers.append(n)      # stopped and its log checked at teardown
    n.start()
    return n, printed_lines(out)


def printed_lines(out):
    lines = out.split("Try, from another shell", 1)[1].splitlines()[1:]
    pairs, comment = [], None
    for line in lines:
        if line.startswith("#"):
            comment = line
        elif line.strip():
            pairs.append((comment, line))
    assert pairs, out
    return pairs


class Http:
    """The output of `curl -i` / `curl -sI`."""

    def __init__(self, text):
        head, _, self.body = text.replace("\r\n", "\n").partition("\n\n")
        lines = head.splitlines()
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()

    def json(self):
        return json.loads(self.body)


def metric(text, name, **labels):
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(re.escape(name) + r"\{(.*)\} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name}{{{want}}} not in:\n{text}")


TENANT = "^/tenant/acme/(?<script>[a-z]+)$"


def test_every_line_of_the_readme_works(nginx, tmp_path):
    n, lines = start_example(nginx, tmp_path)
    env = {"PATH": "/usr/bin:/bin"}
    seen = set()
    state = {}

    def run(cmd):
        r = subprocess.run(["bash", "-c", cmd], capture_output=True,
                           text=True, env=env, timeout=60)
        assert r.returncode == 0, (cmd, r.stderr)
        return r.stdout

    # One check per printed line, keyed by what the line asks for; a line
    # printed without a check here fails the test.
    def index(out):
        assert "GET /api/whoami" in json.loads(out)["endpoints"]

    def no_token(out):
        r = Http(out)
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "bearer token is required" in r.json()["error"]

    def token(out):
        tok = out.strip()
        assert re.fullmatch(r"[\w-]+\.[\w-]+", tok), out
        env["TOKEN"] = tok

    def with_token(out):
        r = Http(out)
        assert r.status == 200, out
        body = r.json()
        assert body["user"] == "demo" and body["plan"] == "free"

    def tampered(out):
        r = Http(out)
        assert r.status == 401
        assert r.json()["error"] == "bad signature"

    def order(out):
        body = json.loads(out)
        assert body["total_cents"] == 3 * 45 + 2 * 60
        assert [x["sku"] for x in body["lines"]] == ["apple", "pear"]
        # The second call took the connection the first parked in the pool.
        assert body["inventory_connection_reuse"][1] >= 1

    backends = []

    def backend(out):
        backends.append(json.loads(out)["backend"])

    def failover(out):
        r = Http(out)
        assert r.status == 200, out
        assert r.json()["backend"] == "b"
        # Round robin gave a then b to the two calls before: this one
        # tried a, which answered 503, then b.
        assert r.headers["x-upstream-tries"] == "a,b"
        assert "x-powered-by" not in r.headers

    def rate_limit(out):
        codes = out.split()
        assert len(codes) == 20 and set(codes) <= {"200", "429"}, out
        assert codes[0] == "200" and "429" in codes, out

    def hardened(out):
        r = Http(out)
        assert r.status == 200
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["content-security-policy"].startswith(
            "default-src 'none'")
        assert r.headers["cache-control"] == "no-store"
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        # log_by_lua runs after the response has left: wait for its line
        # before the next command reads the file.
        log = n.prefix / "logs" / "access.json"
        state["head_id"] = rid = r.headers["x-request-id"]
        wait(lambda: rid in log.read_text())

    def access_log(out):
        entries = [json.loads(line) for line in out.splitlines()]
        assert len(entries) == 3
        last = entries[-1]
        assert last["request_id"] == state["head_id"]
        assert (last["method"], last["uri"], last["status"]) == (
            "HEAD", "/", 200)
        assert any(e.get("user") == "demo" and e["status"] == 429
                   and e["rate_limited"] for e in entries)

    def tenant_hello(out):
        assert json.loads(out) == {"tenant": "acme", "hello": "you"}

    def tenant_loop(out):
        assert Http(out).status == 503
        n.wait_log(r"lua_budget_slice exceeded: Lua ran 100 ms without "
                   r"yielding, stopped at \S+/tenants/acme/loop\.lua:3")

    def tenant_hog(out):
        # lua_budget_status, the gateway's header filter running on the
        # error page (test_memory_stop_keeps_its_status_under_a_header_filter)
        assert Http(out).status == 503
        n.wait_log(r"lua_budget_memory exceeded, stopped at "
                   r"\S+/tenants/acme/hog\.lua")

    def tenant_escape(out):
        got = dict(line.split(": ", 1) for line in out.splitlines())
        for what in ("io.open", "os.execute", "require ffi", "string.dump",
                     "ngx.shared.ratelimit", "connect to the inventory"):
            assert got[what].startswith("refused: "), out
        assert "capability 'io' is not allowed" in got["io.open"]
        assert got["connect to the inventory"] == (
            "refused: destination not allowed by policy")
        assert got["tostring({})"] == "table: 0x00000001"

    def runaway(out):
        assert Http(out).status == 500
        n.wait_log(r"lua_budget_slice exceeded: Lua ran 250 ms")

    def memory_bomb(out):
        assert Http(out).status == 500
        n.wait_log(r"lua_budget_memory exceeded, stopped at "
                   r"content_by_lua\(nginx\.conf:\d+\)")

    def global_(out):
        assert out == "global 'leaked' seen by this request: nil\n"

    def metrics(out):
        assert metric(out, "luaguard_lua_runs_total",
                      location="/api/whoami") >= 2
        assert metric(out, "luaguard_cosocket_pool_hits_total",
                      location="/api/order") >= 1
        for kind in ("slice", "memory"):
            assert metric(out, "luaguard_budget_stops_total",
                          location=TENANT, kind=kind) == 1
        for cap in ("io", "os", "ffi", "shared"):
            assert metric(out, "luaguard_sandbox_refusals_total",
                          location=TENANT, capability=cap) == 1
        assert metric(out, "luaguard_egress_refusals_total",
                      location=TENANT) == 1
        assert " 0\n" not in out

    checks = [
        (r"^curl -s http://[\d.:]+/$", index),
        (r"^curl -i http://[\d.:]+/api/whoami$", no_token),
        (r"^TOKEN=", token),
        (r'Bearer \$TOKEN" http://[\d.:]+/api/whoami$', with_token),
        (r"Bearer \$\{TOKEN\}x", tampered),
        (r"/api/order$", order),
        (r"-s .*/api/backend$", backend),
        (r"/api/backend\?fail=a'$", failover),
        (r"^for i in \$\(seq 20\)", rate_limit),
        (r"^curl -sI ", hardened),
        (r"^tail -n 3 \S+/logs/access\.json$", access_log),
        (r"/tenant/acme/hello", tenant_hello),
        (r"/tenant/acme/loop$", tenant_loop),
        (r"/tenant/acme/hog$", tenant_hog),
        (r"/tenant/acme/escape$", tenant_escape),
        (r"/demo/runaway$", runaway),
        (r"/demo/memory-bomb$", memory_bomb),
        (r"/demo/global$", global_),
        (r"/metrics \| grep", metrics),
    ]

    for comment, cmd in lines:
        found = [(rx, f) for rx, f in checks if re.search(rx, cmd)]
        assert len(found) == 1, f"no single check for {cmd!r}"
        rx, check = found[0]
        seen.add(rx)
        times = 2 if "run it twice" in comment else 1
        for _ in range(times):
            check(run(cmd))

    assert seen == {rx for rx, _ in checks}
    assert sorted(backends) == ["a", "b"]


def wait(cond, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("condition not met")


def test_readme_shows_the_lines_make_run_prints(tmp_path):
    out = subprocess.run(
        [str(SCRIPT), "--render-only", MODULE, "8080", str(tmp_path)],
        capture_output=True, text=True, check=True,
        env=sanitizer_env()).stdout
    readme = README.read_text()
    for comment, cmd in printed_lines(out):
        cmd = cmd.replace(str(tmp_path), "build/example")
        assert cmd in readme, f"README.md lacks {cmd!r}"
        assert comment in readme, f"README.md lacks {comment!r}"


def test_the_rendered_configuration_is_the_example(tmp_path):
    """--render-only writes what `make run` serves: the same file, with the
    placeholders filled in and nothing else changed."""
    subprocess.run(
        [str(SCRIPT), "--render-only", MODULE, "8080", str(tmp_path)],
        capture_output=True, text=True, check=True, env=sanitizer_env())
    conf = (tmp_path / "conf" / "nginx.conf").read_text()
    template = (REPO / "examples" / "nginx.conf").read_text()
    assert conf == (template.replace("LUAGUARD_MODULE", MODULE)
                    .replace("PREFIX", str(tmp_path))
                    .replace("EXAMPLES", str(REPO / "examples"))
                    .replace("PORT", "8080"))
    assert "daemon" not in conf   # make run adds `-g "daemon off;"`


def test_memory_stop_keeps_its_status_under_a_header_filter(nginx):
    """The example's tenant memory bomb (/tenant/acme/hog) in a few lines:
    the stop answers lua_budget_status with a header filter that sets a
    header too (it was refused by the spent budget: a 500). The reclaim
    after the stop credits what it frees to the request."""
    n = nginx(server="""
        location /t {
            lua_budget_memory 8m;
            lua_budget_status 503;
            header_filter_by_lua_block { ngx.header["X-A"] = "1" }
            content_by_lua_block {
                local t = {}
                for i = 1, 1e6 do t[i] = string.rep("x", 1048576) .. i end
            }
        }
""")
    r = n.get("/t")
    assert r.status == 503
    assert r.header("X-A") == "1"
