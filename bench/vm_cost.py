#!/usr/bin/python3
"""What a VM per tenant (`lua_vm`) costs: memory per VM per worker,
start-up time, and instructions per request.

    bench/vm_cost.py --module build/ngx_http_luaguard_module.so \
        [--counts 0,100,1000] [--no-callgrind] [--out bench/results]

Memory and start-up: nginx with one worker and N tenant locations, each
in its own `lua_vm`, every location requested once (a VM compiles its
handler and builds its sandbox view on first use). Reported: the worker's
and the master's RSS, their growth per VM against N = 0, and the time
from starting nginx to its first answer. Per-request cost: the hello
scenario's instructions per request under callgrind (bench/callgrind.py)
in the default VM and in a `lua_vm`.
"""

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import callgrind  # noqa: E402
import common  # noqa: E402
from common import NGINX, free_port, make_prefix, stop_process  # noqa: E402

CONF = """
{load}
worker_processes 1;
error_log {prefix}/logs/error.log warn;
pid {prefix}/logs/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    lua_shared_dict shared 1m;
    init_by_lua_block {{ require "ngx.base64" }}
    server {{
        listen 127.0.0.1:{port};
{locations}
    }}
}}
"""

LOC = """        location = /t{i} {{
            lua_vm t{i};
            lua_sandbox strict;
            content_by_lua_block {{ ngx.say("tenant {i}") }}
        }}
"""


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                         text=True).stdout.split()
    return [int(p) for p in out]


def one_count(module, n, workdir):
    prefix = make_prefix(Path(workdir) / f"vms-{n}")
    port = free_port()
    locs = "".join(LOC.format(i=i) for i in range(n)) or \
        LOC.format(i=0).replace("lua_vm t0;", "")
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(CONF.format(load=common.load_lines(module), prefix=prefix,
                                port=port, locations=locs))
    t0 = time.monotonic()
    r = subprocess.run([NGINX, "-p", str(prefix), "-c", str(conf)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    if not common.wait_port(port, 300):
        raise RuntimeError("nginx did not answer")
    startup = time.monotonic() - t0
    master = int((prefix / "logs" / "nginx.pid").read_text())
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t1 = time.monotonic()
        for i in range(max(n, 1)):
            conn.request("GET", f"/t{i}")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or body != f"tenant {i}\n".encode():
                raise RuntimeError(f"/t{i}: {resp.status} {body[:80]!r}")
        first_pass = time.monotonic() - t1
        conn.close()
        worker = children(master)[0]
        return {"vms": n, "startup_s": round(startup, 3),
                "first_requests_s": round(first_pass, 3),
                "worker_rss_kb": rss_kb(worker),
                "master_rss_kb": rss_kb(master)}
    finally:
        subprocess.run([NGINX, "-p", str(prefix), "-c", str(conf), "-s",
                        "stop"], capture_output=True)
        for _ in range(100):
            if subprocess.run(["kill", "-0", str(master)],
                              capture_output=True).returncode != 0:
                break
            time.sleep(0.1)


def per_request(module, workdir):
    hello = common.BY_NAME["hello"]
    d = callgrind.per_request(module, hello, 100, 600, workdir / "d",
                              "default_vm")
    t = callgrind.per_request(module, hello, 100, 600, workdir / "t",
                              "lua_vm", extra_http="    lua_vm tenant;")
    return {"default_vm": d["ir_main_per_req"],
            "lua_vm": t["ir_main_per_req"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--module", default=str(common.REPO / "build" /
                                            "ngx_http_luaguard_module.so"))
    ap.add_argument("--counts", default="0,100,1000")
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    module = str(Path(args.module).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="luaguard-vmcost-"))
    rows = [one_count(module, int(c), workdir)
            for c in args.counts.split(",")]
    base = rows[0]
    for r in rows:
        if r["vms"] > base["vms"]:
            k = r["vms"] - base["vms"]
            r["worker_kb_per_vm"] = round(
                (r["worker_rss_kb"] - base["worker_rss_kb"]) / k, 1)
            r["master_kb_per_vm"] = round(
                (r["master_rss_kb"] - base["master_rss_kb"]) / k, 1)
    res = {"date": time.strftime("%Y-%m-%d"), "rows": rows}
    if not args.no_callgrind:
        res["instructions_per_request"] = per_request(module, workdir)
    text = json.dumps(res, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vm_cost.json").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
