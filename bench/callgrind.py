#!/usr/bin/python3
"""Instructions per request, deterministic: nginx (master_process off,
daemon off) under `valgrind --tool=callgrind`, once with n1 and once with
n2 requests of one scenario sent one after another on a keep-alive loopback
connection. (Ir(n2) - Ir(n1)) / (n2 - n1) cancels start-up and shutdown and
leaves the cost of one request, for luaguard and for the reference
lua-nginx-module, and their ratio.

    bench/callgrind.py --module build/ngx_http_luaguard_module.so \
        --scenarios hello,shdict|all [--n1 200 --n2 1200] [--hardening-off]
        [--out bench/results] [--json]

Instructions are counted per thread (--separate-threads=yes): "main" is
the nginx thread that serves requests; "all" adds any other thread (nginx
thread pools). luaguard's budget watchdog is a 5 ms timer signal of the
serving thread that ticks only while a run with a deadline is under way:
its few instructions per tick scale with wall time under valgrind, a
small noise in "main".

Both runs of a pair see the same random bytes (bench/fixed_seed.c,
preloaded): LuaJIT's per-process random seed otherwise moves start-up
trace aborts between the two runs, by up to a few hundred instructions per
request. Pair i of --repeat gets seed i + 1, for every configuration.
"""

import argparse
import datetime
import http.client
import json
import os
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


SEED_SHIM_SRC = Path(__file__).resolve().parent / "fixed_seed.c"


def seed_shim(workdir):
    """bench/fixed_seed.c built into workdir, once."""
    so = workdir / "fixed_seed.so"
    if not so.exists():
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so),
                        str(SEED_SHIM_SRC), "-ldl"], check=True)
    return so


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_ir(path):
    """Total Ir of one callgrind output file (its summary/totals line)."""
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.match(r"(?:summary|totals):\s*(\d+)", line)
        if m:
            return int(m.group(1))
    raise RuntimeError(f"no summary in {path}")


def measure(module, s, n, workdir, label, extra_http="", seed=1):
    prefix = make_prefix(Path(workdir) / f"{label}-{n}")
    port, up = free_port(), free_port()
    conf = prefix / "conf" / "nginx.conf"
    conf.write_text(render(module, prefix, port, up, [s],
                           main="master_process off;\ndaemon off;",
                           http=extra_http))
    out = prefix / "callgrind.out"
    cmd = VALGRIND + [f"--callgrind-out-file={out}.%p", NGINX, "-p",
                      str(prefix), "-c", str(conf)]
    env = dict(os.environ, LD_PRELOAD=str(seed_shim(Path(workdir).parent)),
               LUAGUARD_BENCH_SEED=str(seed))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(prefix / "valgrind.log", "w"))
    try:
        if not wait_port(port, 180, proc):
            raise RuntimeError(
                f"{label}: nginx under valgrind did not start:\n"
                + (prefix / "valgrind.log").read_text()[-3000:]
                + common.nginx_log_or_test(prefix, conf))
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t0 = time.monotonic()
        for i in range(n):
            status, body = common.request(port, s, conn=conn)
            if i == 0 and status == 500:
                # The first request of a worker builds the sandbox's views;
                # under valgrind (--smc-check) that alone can take longer
                # than the 1 s slice budget. Both request counts pay the
                # same, so one retry keeps the difference exact.
                status, body = common.request(port, s, conn=conn)
            if status != 200 or not body.startswith(s.expect):
                time.sleep(0.5)
                log_file = prefix / "logs" / "error.log"
                errlog = (log_file.read_text(errors="replace")
                          if log_file.exists() else "(no error.log)")
                m = common.PENDING.search(errlog)
                raise RuntimeError(m.group(0) if m else
                                   f"{label} request {i}: {status} "
                                   f"{body[:100]!r}\n{errlog[-1500:]}")
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


def per_request(module, s, n1, n2, workdir, label, extra_http="",
                repeat=1):
    # Trace activity that falls between the two counts (a trace recorded,
    # aborted or flushed) moves one measurement; with `repeat`, the median
    # of that many pairs of runs, each pair with its own seed, is reported.
    pairs = []
    for i in range(repeat):
        name = label if i == 0 else f"{label}.{i}"
        a = measure(module, s, n1, workdir, name, extra_http, seed=i + 1)
        b = measure(module, s, n2, workdir, name, extra_http, seed=i + 1)
        pairs.append((a, b))
    per = {k: sorted((b[k] - a[k]) / (n2 - n1) for a, b in pairs)
           for k in ("ir_main", "ir_all")}
    a, b = pairs[0]
    r = {"runs": [a, b]}
    for k in ("ir_main", "ir_all"):
        r[k + "_per_req"] = per[k][len(per[k]) // 2]
    if repeat > 1:
        r["repeats"] = per["ir_main"]
    log(f"{label}: {r['ir_main_per_req']:.0f} instructions/request "
        f"(main thread), {r['ir_all_per_req']:.0f} all threads; "
        f"Ir {a['ir_main']} @ {n1}, {b['ir_main']} @ {n2}"
        + (f"; repeats {[round(x) for x in per['ir_main']]}"
           if repeat > 1 else ""))
    return r


def scenario_row(module, s, n1, n2, workdir, off, repeat=1):
    row = {"name": s.name, "title": s.title, "n1": n1, "n2": n2,
           "repeat": repeat}
    runs = [("luaguard", module, ""), ("reference", "reference", "")]
    if off is not None:
        runs.append(("luaguard_off", module,
                     "\n".join("    " + d for d in off)))
    for label, mod, http in runs:
        try:
            row[label] = per_request(mod, s, n1, n2, workdir / s.name,
                                     label, http, repeat)
        except RuntimeError as e:
            # A scenario whose API luaguard has not built yet answers 500:
            # report it, do not stop the other scenarios.
            row["error"] = str(e).splitlines()[0][:200]
            if label != "luaguard":
                row["error"] = f"{label}: {row['error']}"
            log(row["error"])
            return row
    row["ratio"] = (row["luaguard"]["ir_main_per_req"]
                    / row["reference"]["ir_main_per_req"])
    if off is not None:
        row["ratio_on_off"] = (row["luaguard"]["ir_main_per_req"]
                               / row["luaguard_off"]["ir_main_per_req"])
    return row


def geomean(xs):
    if not xs:
        return None
    p = 1.0
    for x in xs:
        p *= x
    return p ** (1.0 / len(xs))


def merge(paths):
    """One result from several runs' JSON (scenarios measured with
    different request counts: the heavy ones with fewer), in BY_NAME's
    order; the first file's date and counts head the table."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = dict(parts[0])
    rows = {r["name"]: r for part in parts for r in part["scenarios"]}
    res["scenarios"] = [rows[n] for n in BY_NAME if n in rows]
    return res


def markdown(res):
    off = res.get("hardening_off") is not None
    lines = [
        f"Instructions per request under callgrind, {res['date']}: "
        f"(Ir at {res['n2']} requests - Ir at {res['n1']}) / "
        f"{res['n2'] - res['n1']}, nginx's serving thread, requests sent "
        "one at a time on one "
        "keep-alive connection, both runs with one random seed "
        "(bench/fixed_seed.c). Deterministic: machine load does not "
        "change it. Ratio = luaguard/reference (lower is better for "
        "luaguard)." + (f" Each figure is the median of {res['repeat']} "
                        "such measurements, each with its own seed."
                        if res.get("repeat", 1) > 1 else ""), ""]
    head = "| scenario | luaguard | reference | ratio |"
    sep = "|---|---:|---:|---:|"
    tail_head, tail_sep = " notes |", "---|"
    if off:
        lines.insert(1, "Hardening off = " + " ".join(
            f"`{d}`" for d in res["hardening_off"]) + ".")
        head += " luaguard, hardening off | on/off |"
        sep += "---:|---:|"
    lines += [head + tail_head, sep + tail_sep]
    for row in res["scenarios"]:
        if row.get("error"):
            lines.append(f"| {row['title']} | - | - | - |"
                         + (" - | - |" if off else "")
                         + f" not available: {row['error']} |")
            continue
        line = (f"| {row['title']} | {row['luaguard']['ir_main_per_req']:.0f}"
                f" | {row['reference']['ir_main_per_req']:.0f} | "
                f"{row['ratio']:.2f} |")
        if off and "luaguard_off" in row:
            line += (f" {row['luaguard_off']['ir_main_per_req']:.0f} | "
                     f"{row['ratio_on_off']:.2f} |")
        elif off:
            line += " - | - |"
        note = ""
        if (row.get("n1"), row.get("n2")) != (res["n1"], res["n2"]):
            note = f" {row['n1']}/{row['n2']} requests"
        if row.get("repeat", 1) != res.get("repeat", 1):
            k = row.get("repeat", 1)
            note += f" {'median of ' + str(k) if k > 1 else 'one'} run"
            note += "s" if k > 1 else ""
        lines.append(line + note + " |")
    geo = geomean([r["ratio"] for r in res["scenarios"]
                   if r.get("ratio") and r["name"] != "ceiling"])
    if geo:
        lines += ["", f"Geomean of the ratios over the Lua scenarios "
                  f"(all but `return 200`): {geo:.3f}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--module", default=str(common.REPO / "build" /
                                            "ngx_http_luaguard_module.so"))
    ap.add_argument("--scenario", "--scenarios", dest="scenarios",
                    default="hello",
                    help="comma-separated, or all: " + ",".join(BY_NAME))
    ap.add_argument("--n1", type=int, default=200)
    ap.add_argument("--n2", type=int, default=1200)
    ap.add_argument("--hardening-off", action="store_true",
                    help="also measure luaguard with its hardening off")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each module this many times and report "
                    "the median (trace activity makes single runs vary)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", default="",
                    help="directory to write callgrind.md and "
                    "callgrind.json to (e.g. bench/results)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=[],
                    help="no run: merge callgrind.json files of earlier "
                    "runs into one table (with --out)")
    args = ap.parse_args()
    if args.merge:
        res = merge(args.merge)
        md = markdown(res)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "callgrind.md").write_text(md)
            (out / "callgrind.json").write_text(json.dumps(res, indent=1)
                                                + "\n")
        print(md)
        return 0
    names = (list(BY_NAME) if args.scenarios == "all"
             else [n.strip() for n in args.scenarios.split(",") if n.strip()])
    bad = [n for n in names if n not in BY_NAME]
    if bad:
        log(f"unknown scenarios {bad}; known: {list(BY_NAME)}")
        return 2
    module = str(Path(args.module).resolve())
    workdir = Path(tempfile.mkdtemp(prefix="luaguard-callgrind-"))
    off = None
    if args.hardening_off:
        off = common.accepted_hardening_off(module, workdir / "probe")
    res = {"date": datetime.datetime.now().astimezone().isoformat(
               timespec="seconds"),
           "module": module, "n1": args.n1, "n2": args.n2,
           "repeat": args.repeat, "hardening_off": off, "scenarios": []}
    for n in names:
        log(f"== {n}")
        res["scenarios"].append(scenario_row(module, BY_NAME[n], args.n1,
                                             args.n2, workdir, off,
                                             args.repeat))
    md = markdown(res)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "callgrind.md").write_text(md)
        (out / "callgrind.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1) if args.json else md)
    log(f"callgrind files in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
