#!/usr/bin/python3
"""Instructions per request, deterministic: nginx (master_process off,
daemon off) under `valgrind --tool=callgrind`, once with n1 and once with
n2 requests of one scenario sent one after another on a keep-alive loopback
connection. (Ir(n2) - Ir(n1)) / (n2 - n1) cancels start-up and shutdown and
leaves the cost of one request, for luaguard and for the reference
lua-nginx-module, and their ratio.

    bench/callgrind.py --module build/ngx_http_luaguard_module.so \
        --scenario hello [--n1 200 --n2 1200] [--json]

Instructions are counted per thread (--separate-threads=yes): "main" is
the nginx thread that serves requests; "all" adds luaguard's budget
watchdog thread, whose 5 ms ticks scale with wall time under valgrind, not
with requests.
"""

import argparse
import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (BY_NAME, NGINX, free_port, make_prefix, render,  # noqa
                    stop_process, wait_port)

VALGRIND = ["valgrind", "--tool=callgrind", "--trace-children=no",
            # LuaJIT writes machine code and then runs it.
            "--smc-check=all-non-file",
            "--separate-threads=yes"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_ir(path):
    """Total Ir of one callgrind output file (its summary/totals line)."""
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s*(\d+)", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no summary in {path}")


def measure(module, s, n, workdir, label, extra_http=""):
    prefix = make_prefix(Path(workdir) / f"{label}-{n}")
    port, up = free_port(), free_port()
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(render(module, prefix, port, up, [s],
                           main="master_process off;\ndaemon off;",
                           http=extra_http))
    out = prefix / "callgrind.out"
    cmd = VALGRIND + [f"--callgrind-out-file={out}.%p", NGINX, "-p",
                      str(prefix), "-c", str(conf)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=open(prefix / "valgrind.log", "w"))
    try:
        if not wait_port(port, 180, proc):
            raise RuntimeError(
                f"{label}: nginx under valgrind did not start:\n"
                + (prefix / "valgrind.log").read_text()[-3000:]
                + (prefix / "logs" / "error.log").read_text()[-2000:])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.monotonic()
        for i in range(n):
            status, body = common.request(port, s, conn=conn)
            if status != 200 or not body.startswith(s.expect):
                raise RuntimeError(f"{label}: request {i}: {status} "
                                   f"{body[:200]!r}")
        conn.close()
        elapsed = time.monotonic() - t0
    finally:
        how = stop_process(proc, timeout=120, resend_every=10)
    # With --separate-threads one file per thread, named OUT.PID-TID; the
    # bare OUT.PID stays empty.
    files = sorted(f for f in prefix.glob("callgrind.out.*")
                   if re.search(r"-\d+$", f.name))
    if not files:
        raise RuntimeError(f"{label}: no callgrind output (stop: {how})")
    per_thread = {}
    for f in files:
        tid = int(re.search(r"-(\d+)$", f.name).group(1))
        per_thread[tid] = read_ir(f)
    main = per_thread.get(1, 0)
    return {"n": n, "ir_main": main, "ir_all": sum(per_thread.values()),
            "threads": len(per_thread), "seconds": elapsed, "stop": how}


def per_request(module, s, n1, n2, workdir, label, extra_http=""):
    a = measure(module, s, n1, workdir, label, extra_http)
    b = measure(module, s, n2, workdir, label, extra_http)
    r = {"runs": [a, b]}
    for k in ("ir_main", "ir_all"):
        r[k + "_per_req"] = (b[k] - a[k]) / (n2 - n1)
    log(f"{label}: {r['ir_main_per_req']:.0f} instructions/request "
        f"(main thread), {r['ir_all_per_req']:.0f} all threads; "
        f"Ir {a['ir_main']} @ {n1}, {b['ir_main']} @ {n2}")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--module", default=str(common.REPO / "build" /
                                            "ngx_http_luaguard_module.so"))
    ap.add_argument("--scenario", default="hello",
                    help="one of " + ",".join(BY_NAME))
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=1200)
    ap.add_argument("--hardening-off", action="store_true",
                    help="also measure luaguard with its budgets off")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    s = BY_NAME[args.scenario]
    module = str(Path(args.module).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="luaguard-callgrind-"))
    res = {"scenario": s.name, "n1": args.n1, "n2": args.n2}
    res["luaguard"] = per_request(module, s, args.n1, args.n2, workdir,
                                  "luaguard")
    res["reference"] = per_request("reference", s, args.n1, args.n2,
                                   workdir, "reference")
    if args.hardening_off:
        off = common.accepted_hardening_off(module, workdir / "probe")
        res["luaguard_off"] = per_request(
            module, s, args.n1, args.n2, workdir, "luaguard-off",
            "\n".join("    " + d for d in off))
        res["luaguard_off"]["directives"] = off
    for k in ("ir_main_per_req", "ir_all_per_req"):
        res["ratio_" + k] = res["luaguard"][k] / res["reference"][k]
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"| {s.title} | luaguard | reference | ratio |")
        print("|---|---:|---:|---:|")
        print(f"| instructions/request (serving thread) | "
              f"{res['luaguard']['ir_main_per_req']:.0f} | "
              f"{res['reference']['ir_main_per_req']:.0f} | "
              f"{res['ratio_ir_main_per_req']:.2f} |")
        print(f"| instructions/request (all threads) | "
              f"{res['luaguard']['ir_all_per_req']:.0f} | "
              f"{res['reference']['ir_all_per_req']:.0f} | "
              f"{res['ratio_ir_all_per_req']:.2f} |")
        if args.hardening_off:
            print(f"| luaguard, budgets off (serving thread) | "
                  f"{res['luaguard_off']['ir_main_per_req']:.0f} | | |")
    log(f"callgrind files in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
