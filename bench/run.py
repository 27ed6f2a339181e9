#!/usr/bin/python3
"""luaguard versus lua-nginx-module, side by side.

Both modules run in one stock /usr/sbin/nginx each (same configuration but
for the load_module lines and the ports), one worker each pinned to core 0,
wrk pinned to core 1. For every scenario the two run alternately (A B A B
...) so drift on a shared machine hits both. Reported per scenario: median
requests/s and median worker CPU time per request (utime+stime of the
worker from /proc/PID/stat around each run, divided by the requests wrk
counted), and ours/reference ratios.

    bench/run.py --module build/ngx_http_luaguard_module.so
    bench/run.py --module ... --quick                 # smoke: 1 round of 2 s
    bench/run.py --module ... --scenarios hello,shdict
    bench/run.py --update-readme        # README "Performance" <- latest.md

Results: a Markdown table on stdout and in bench/results/latest.md, JSON in
bench/results/latest.json.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import (BY_NAME, HARDENING_SCENARIOS, PENDING, SCENARIOS,  # noqa
                    NGINX, free_port, make_prefix, render, request,
                    stop_process, wait_port)

RESULTS = common.BENCH_DIR / "results"
README = common.REPO / "README.md"
MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
CLK_TCK = os.sysconf("SC_CLK_TCK")
WRK = shutil.which("wrk") or "/usr/bin/wrk"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- instances

class Instance:
    """One nginx (master + one worker pinned to `core`) serving every
    scenario."""

    def __init__(self, label, module, workdir, scenarios, http="",
                 core=0):
        self.label = label
        self.module = module
        self.prefix = make_prefix(Path(workdir) / label)
        self.port = free_port()
        self.up_port = free_port()
        main = "master_process on;\ndaemon off;"
        if core is not None:
            main += "\nworker_cpu_affinity %s;" % format(1 << core, "b")
        self.conf = self.prefix / "conf" / "nginx.conf"
        self.conf.write_text(render(module, self.prefix, self.port,
                                    self.up_port, scenarios, main=main,
                                    http=http))
        self.log_path = self.prefix / "logs" / "error.log"
        self.proc = None
        self.worker = None
        self.log_offset = 0

    def start(self):
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.prefix), "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_port(self.port, 15, self.proc):
            err = self.proc.stderr.read().decode() if self.proc.poll() \
                is not None else ""
            raise RuntimeError(f"{self.label}: nginx did not start: {err}"
                               f"\n{self.read_log()}")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            out = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                                 capture_output=True, text=True).stdout
            pids = [int(p) for p in out.split()]
            if pids:
                self.worker = pids[0]
                break
            time.sleep(0.05)
        if self.worker is None:
            raise RuntimeError(f"{self.label}: no worker")
        self.affinity = sorted(os.sched_getaffinity(self.worker))
        return self

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=20)

    def cpu_ticks(self):
        with open(f"/proc/{self.worker}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])      # utime + stime

    def read_log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def new_log(self):
        """Error log lines written since the last call."""
        text = self.read_log()
        new = text[self.log_offset:]
        self.log_offset = len(text)
        return new

    def alive(self):
        return self.proc.poll() is None and Path(f"/proc/{self.worker}").exists()


# ---------------------------------------------------------------- checking

def check(inst, s):
    """Runs scenario s a few times on inst. Returns None when the responses
    are right, else a short reason: "not available: ..." when luaguard says
    the API is not built yet, otherwise what was wrong."""
    inst.new_log()
    try:
        for _ in range(3):
            status, body = request(inst.port, s)
            if status != 200 or not body.startswith(s.expect):
                break
        else:
            status = 200
            body = s.expect
    except Exception as e:            # noqa: BLE001 - reported, not hidden
        status, body = None, repr(e).encode()
    time.sleep(0.05)                  # let the log line reach the file
    new = inst.new_log()
    m = PENDING.search(new)
    if m:
        return f"not available: {m.group(0)}"
    if status == 200 and body.startswith(s.expect):
        errs = [l for l in new.splitlines()
                if re.search(r"\[(error|alert|crit|emerg)\]", l)]
        if errs:
            return "error log: " + errs[0][-200:]
        return None
    if status == 500:
        return "not available: 500 response" + (
            f" ({last_error(new)})" if last_error(new) else "")
    return f"wrong response: status {status}, body {body[:80]!r}" + (
        f" ({last_error(new)})" if last_error(new) else "")


def last_error(text):
    errs = [l for l in text.splitlines() if "[error]" in l
            or "[alert]" in l or "[crit]" in l]
    if not errs:
        return ""
    e = errs[-1]
    e = re.sub(r"^\S+ \S+ ", "", e)
    return e[:240]


# ---------------------------------------------------------------- wrk

WRK_SCRIPT_POST = """\
wrk.method = "POST"
wrk.body = string.rep("b", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def wrk_cmd(inst, s, seconds, connections, workdir):
    cmd = []
    if os.cpu_count() and os.cpu_count() > 1:
        cmd += ["taskset", "-c", "1"]
    cmd += [WRK, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout",
            "5s"]
    for k, v in s.headers.items():
        if s.method == "POST" and k.lower() == "content-type":
            continue
        cmd += ["-H", f"{k}: {v}"]
    if s.method == "POST":
        script = Path(workdir) / "post.lua"
        script.write_text(WRK_SCRIPT_POST)
        cmd += ["-s", str(script)]
    cmd.append(f"http://127.0.0.1:{inst.port}{s.path}")
    return cmd


def parse_wrk(out):
    r = {}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not m:
        raise RuntimeError("cannot parse wrk output:\n" + out)
    r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s*([\d.]+)", out)
    r["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    r["non2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                  r"timeout (\d+)", out)
    r["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    return r


def run_once(inst, s, seconds, connections, workdir):
    inst.new_log()
    before = inst.cpu_ticks()
    out = subprocess.run(wrk_cmd(inst, s, seconds, connections, workdir),
                         capture_output=True, text=True)
    after = inst.cpu_ticks()
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed: {out.stderr}")
    r = parse_wrk(out.stdout)
    r["cpu_us"] = (after - before) * 1e6 / CLK_TCK
    r["cpu_us_per_req"] = (r["cpu_us"] / r["requests"]
                           if r["requests"] else None)
    r["load1"] = os.getloadavg()[0]
    new = inst.new_log()
    r["log_errors"] = sum(1 for l in new.splitlines()
                          if re.search(r"\[(error|alert|crit|emerg)\]", l))
    if r["log_errors"]:
        r["first_log_error"] = last_error(new)
    return r


def summarize(runs):
    rps = [r["rps"] for r in runs]
    cpu = [r["cpu_us_per_req"] for r in runs if r["cpu_us_per_req"]]
    return {
        "rps_median": statistics.median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "cpu_us_per_req_median": statistics.median(cpu) if cpu else None,
        "non2xx": sum(r["non2xx"] for r in runs),
        "socket_errors": sum(r["socket_errors"] for r in runs),
        "log_errors": sum(r["log_errors"] for r in runs),
        "runs": runs,
    }


def compare(a, b, s, args, workdir, names):
    """Alternates a and b on scenario s. Returns {name: summary}."""
    # Warm-up (JIT traces, keepalive pools), not measured.
    for inst in (a, b):
        subprocess.run(wrk_cmd(inst, s, args.warmup, args.connections,
                               workdir), capture_output=True)
    runs = {names[0]: [], names[1]: []}
    for rnd in range(args.rounds):
        for inst, name in ((a, names[0]), (b, names[1])):
            r = run_once(inst, s, args.duration, args.connections, workdir)
            runs[name].append(r)
            log(f"  round {rnd + 1} {name:>10}: {r['rps']:9.0f} req/s "
                f"{r['cpu_us_per_req']:7.2f} us/req  load {r['load1']:.2f}"
                + (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "")
                + (f"  log errors {r['log_errors']}" if r["log_errors"]
                   else ""))
    return {k: summarize(v) for k, v in runs.items()}


def paired_ratio(runs_a, runs_b, key):
    """Median over rounds of a's value / b's value in the same round: the
    two ran back to back, so a load burst on the shared machine hits the
    pair, not just one side (more robust than a ratio of medians)."""
    rs = [a[key] / b[key] for a, b in zip(runs_a, runs_b)
          if a.get(key) and b.get(key)]
    return statistics.median(rs) if rs else None


def add_ratios(row, a, b):
    sa, sb = row[a], row[b]
    row["rps_ratio_of_medians"] = ratio(sa["rps_median"], sb["rps_median"])
    row["cpu_ratio_of_medians"] = ratio(sa["cpu_us_per_req_median"],
                                        sb["cpu_us_per_req_median"])
    row["rps_ratio"] = paired_ratio(sa["runs"], sb["runs"], "rps")
    row["cpu_ratio"] = paired_ratio(sa["runs"], sb["runs"], "cpu_us_per_req")


def ratio(x, y):
    if x is None or y is None or y == 0:
        return None
    return x / y


# ---------------------------------------------------------------- report

def machine():
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx_v = subprocess.run([NGINX, "-v"], capture_output=True,
                             text=True).stderr.strip()
    return {"nproc": os.cpu_count(), "cpu": model, "kernel":
            platform.release(), "nginx": nginx_v.replace("nginx version: ",
                                                         "")}


def fmt(x, spec):
    return "n/a" if x is None else format(x, spec)


def flags(summary):
    f = []
    if summary["non2xx"]:
        f.append(f"{summary['non2xx']} non-2xx")
    if summary["socket_errors"]:
        f.append(f"{summary['socket_errors']} socket errors")
    if summary["log_errors"]:
        f.append(f"{summary['log_errors']} error-log lines")
    return ", ".join(f)


def markdown(res):
    m = res["machine"]
    lines = [
        f"Run {res['date']} on {m['nproc']} x {m['cpu']} "
        f"(kernel {m['kernel']}, nginx {m['nginx']}); "
        f"{res['settings']['rounds']} rounds x {res['settings']['duration']} s "
        f"per module and scenario, alternating, wrk -t1 "
        f"-c{res['settings']['connections']}; load average "
        f"{res['load_before']:.2f} before, {res['load_after']:.2f} after"
        f" (shared machine).",
        "",
        "luaguard vs lua-nginx-module 0.10.23 (Debian, with lua-resty-core); "
        "one worker on core 0, wrk on core 1. Medians. "
        "CPU = worker utime+stime per request. Ratios are ours/reference, "
        "the median over rounds of the ratio within a round (the two runs "
        "of a round are back to back); req/s: higher is better for "
        "luaguard; CPU: lower is better. On a busy machine req/s swings "
        "with the CPU time nginx gets; CPU per request is the steadier "
        "figure.",
        "",
        "| scenario | luaguard req/s | reference req/s | req/s ratio | "
        "luaguard CPU us/req | reference CPU us/req | CPU ratio | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in res["scenarios"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['title']} | - | - | - | - | - | - | "
                         f"{row['status']} |")
            continue
        a, b = row["luaguard"], row["reference"]
        notes = "; ".join(x for x in (flags(a) and "luaguard: " + flags(a),
                                      flags(b) and "reference: " + flags(b))
                          if x)
        lines.append(
            f"| {row['title']} | {a['rps_median']:.0f} | "
            f"{b['rps_median']:.0f} | {fmt(row['rps_ratio'], '.2f')} | "
            f"{fmt(a['cpu_us_per_req_median'], '.1f')} | "
            f"{fmt(b['cpu_us_per_req_median'], '.1f')} | "
            f"{fmt(row['cpu_ratio'], '.2f')} | {notes} |")
    if res.get("hardening"):
        h = res["hardening"]
        lines += [
            "",
            "luaguard's hardening on (defaults) versus off ("
            + " ".join(f"`{d}`" for d in h["directives"]) + "). "
            "Ratios are on/off (median of per-round ratios).",
            "",
            "| scenario | on req/s | off req/s | req/s ratio | on CPU us/req "
            "| off CPU us/req | CPU ratio | notes |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        if h.get("missing"):
            lines.insert(-4, "Not accepted by this build (so not part "
                         "of \"off\"): " + " ".join(
                             f"`{d}`" for d in h["missing"]) + "")
        for row in h["scenarios"]:
            if row.get("status") != "ok":
                lines.append(f"| {row['title']} | - | - | - | - | - | - | "
                             f"{row['status']} |")
                continue
            a, b = row["on"], row["off"]
            notes = "; ".join(x for x in (flags(a) and "on: " + flags(a),
                                          flags(b) and "off: " + flags(b))
                              if x)
            lines.append(
                f"| {row['title']} | {a['rps_median']:.0f} | "
                f"{b['rps_median']:.0f} | {fmt(row['rps_ratio'], '.2f')} | "
                f"{fmt(a['cpu_us_per_req_median'], '.1f')} | "
                f"{fmt(b['cpu_us_per_req_median'], '.1f')} | "
                f"{fmt(row['cpu_ratio'], '.2f')} | {notes} |")
    cg = res.get("callgrind")
    if cg:
        lines += ["", f"Instructions per request under callgrind "
                  f"({cg['title']}; (Ir at {cg['n2']} requests - Ir at "
                  f"{cg['n1']}) / {cg['n2'] - cg['n1']}, serving thread; "
                  "deterministic, not affected by load):", ""]
        if cg.get("error"):
            lines.append(f"callgrind failed: {cg['error']}")
        else:
            lines += [
                "| | luaguard | reference | ratio |",
                "|---|---:|---:|---:|",
                f"| instructions/request | "
                f"{cg['luaguard']['ir_main_per_req']:.0f} | "
                f"{cg['reference']['ir_main_per_req']:.0f} | "
                f"{cg['ratio']:.2f} |"]
    return "\n".join(lines) + "\n"


def update_readme(md_path=RESULTS / "latest.md", readme=README):
    body = Path(md_path).read_text().strip()
    cg = Path(md_path).with_name("callgrind.md")
    if cg.exists():
        body += "\n\n" + cg.read_text().strip()
    text = readme.read_text()
    block = f"{MARK_START}\n{body}\n{MARK_END}"
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        _, post = rest.split(MARK_END, 1)
        new = pre + block + post
    else:
        new = text.rstrip("\n") + "\n\n## Performance\n\n" + block + "\n"
    if new != text:
        readme.write_text(new)
    return new != text


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--module", default=str(common.REPO / "build" /
                                            "ngx_http_luaguard_module.so"))
    ap.add_argument("--scenarios", default="",
                    help="comma-separated names (default: all): "
                    + ",".join(s.name for s in SCENARIOS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=3, help="seconds per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round of 2 s, no warm-up")
    ap.add_argument("--no-hardening", action="store_true",
                    help="skip the hardening on/off comparison")
    ap.add_argument("--callgrind", metavar="SCENARIO", default="",
                    help="also count instructions per request of SCENARIO "
                    "under callgrind (bench/callgrind.py, ~1 min)")
    ap.add_argument("--json", action="store_true",
                    help="print JSON on stdout instead of Markdown")
    ap.add_argument("--out", default=str(RESULTS),
                    help="where latest.md and latest.json go")
    ap.add_argument("--update-readme", action="store_true",
                    help="copy the latest results into README.md's "
                    "Performance section and exit (no run)")
    args = ap.parse_args()

    if args.update_readme:
        changed = update_readme(Path(args.out) / "latest.md")
        log("README.md " + ("updated" if changed else "already up to date"))
        return 0
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 2, 0

    module = str(Path(args.module).resolve())
    if not Path(module).exists():
        log(f"no module at {module}: build it first (make build)")
        return 2
    chosen = SCENARIOS
    if args.scenarios:
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
        bad = [n for n in names if n not in BY_NAME]
        if bad:
            log(f"unknown scenarios: {bad}; known: {list(BY_NAME)}")
            return 2
        chosen = [BY_NAME[n] for n in names]
    # A TLS scenario needs a server of its own: callgrind.py measures it.
    chosen = [s for s in chosen if not s.tls]

    workdir = Path(tempfile.mkdtemp(prefix="luaguard-bench-"))
    plain = [s for s in SCENARIOS if not s.tls]
    res = {
        "date": datetime.datetime.now().astimezone().isoformat(
            timespec="seconds"),
        "machine": machine(),
        "module": module,
        "settings": {"rounds": args.rounds, "duration": args.duration,
                     "warmup": args.warmup,
                     "connections": args.connections, "quick": args.quick},
        "load_before": os.getloadavg()[0],
        "scenarios": [],
    }
    hard_names = [n for n in HARDENING_SCENARIOS
                  if n in {s.name for s in chosen}]
    off = []
    if hard_names and not args.no_hardening:
        off = common.accepted_hardening_off(module, workdir / "probe")
    instances = {
        "luaguard": Instance("luaguard", module, workdir, plain),
        "reference": Instance("reference", "reference", workdir, plain),
    }
    if off:
        instances["luaguard-off"] = Instance(
            "luaguard-off", module, workdir, plain,
            http="\n".join("    " + d for d in off))
    try:
        for inst in instances.values():
            inst.start()
            log(f"{inst.label}: port {inst.port}, worker {inst.worker} "
                f"on cpus {inst.affinity}")
        lg, ref = instances["luaguard"], instances["reference"]
        for s in chosen:
            log(f"== {s.name}: {s.title}")
            row = {"name": s.name, "title": s.title, "api": s.api}
            bad_ref = check(ref, s)
            bad_lg = check(lg, s)
            if bad_ref:
                row["status"] = f"reference check failed: {bad_ref}"
            elif bad_lg:
                row["status"] = (bad_lg if bad_lg.startswith("not available")
                                 else f"luaguard check failed: {bad_lg}")
            else:
                row["status"] = "ok"
            if row["status"] != "ok":
                log("  " + row["status"])
                res["scenarios"].append(row)
                continue
            sums = compare(lg, ref, s, args, workdir,
                           ("luaguard", "reference"))
            row.update(sums)
            add_ratios(row, "luaguard", "reference")
            log(f"  median: luaguard {sums['luaguard']['rps_median']:.0f} "
                f"vs reference {sums['reference']['rps_median']:.0f} req/s "
                f"(ratio {fmt(row['rps_ratio'], '.2f')}), CPU ratio "
                f"{fmt(row['cpu_ratio'], '.2f')}")
            res["scenarios"].append(row)
            for inst in instances.values():
                if not inst.alive():
                    raise RuntimeError(f"{inst.label} died:\n"
                                       f"{inst.read_log()[-2000:]}")
        if hard_names and not args.no_hardening:
            h = {"directives": off,
                 "missing": [d for d in common.HARDENING_OFF if d not in off],
                 "scenarios": []}
            res["hardening"] = h
            if off:
                lgo = instances["luaguard-off"]
                for name in hard_names:
                    s = BY_NAME[name]
                    log(f"== hardening on/off: {s.name}")
                    row = {"name": s.name, "title": s.title}
                    bad = check(lg, s) or check(lgo, s)
                    if bad:
                        row["status"] = bad
                        h["scenarios"].append(row)
                        continue
                    row["status"] = "ok"
                    sums = compare(lg, lgo, s, args, workdir, ("on", "off"))
                    row.update(sums)
                    add_ratios(row, "on", "off")
                    h["scenarios"].append(row)
    finally:
        for inst in instances.values():
            inst.stop()
    res["load_after"] = os.getloadavg()[0]
    if args.callgrind:
        import callgrind
        s = BY_NAME[args.callgrind]
        cg = {"scenario": s.name, "title": s.title, "n1": 200, "n2": 1200}
        try:
            for label, mod in (("luaguard", module),
                               ("reference", "reference")):
                cg[label] = callgrind.per_request(mod, s, 200, 1200,
                                                  workdir / "callgrind",
                                                  label)
            cg["ratio"] = (cg["luaguard"]["ir_main_per_req"]
                           / cg["reference"]["ir_main_per_req"])
        except Exception as e:        # noqa: BLE001 - reported
            cg["error"] = str(e)[:500]
        res["callgrind"] = cg

    md = markdown(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.md").write_text(md)
    (out / "latest.json").write_text(json.dumps(res, indent=1) + "\n")
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(md)
    log(f"written {out / 'latest.md'} and {out / 'latest.json'}; "
        f"nginx prefixes in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
