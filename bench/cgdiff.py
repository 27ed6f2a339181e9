#!/usr/bin/python3
"""Where the instructions of one request go, per function, from the two
runs bench/callgrind.py leaves for a scenario and module (its last line
names the directory):

    bench/cgdiff.py DIR/hello/luaguard 300 2300 [--top 40]
        [--against DIR/hello/reference] [--by-object] [--only SUBSTR]
        [--inclusive]
    bench/cgdiff.py --floor DIR


Self cost per request = (cost in the n2 run - cost in the n1 run) /
(n2 - n1), read from callgrind's output of the serving thread
(callgrind.out.PID-01). --against prints a second module beside it and
the difference; --by-object sums per shared object; --only keeps the
functions of objects whose name contains SUBSTR; --inclusive adds the
cost of the calls each function makes (approximate where the VM's own
labels call each other).

--floor DIR: for every scenario under DIR, what the Lua module and its
LuaJIT cost per request (luaguard: its one .so; the reference: its .so
and libluajit; both: compiled traces) and what the rest (nginx, libc, OpenSSL, cjson, PCRE2)
costs. "floor" is the ratio luaguard would reach if its module cost
nothing and the rest were the reference's: how low a ratio the scenario
allows at all."""

import argparse
import re
from collections import defaultdict
from pathlib import Path


def load(path, by_object, only, inclusive):
    names, objects = {}, {}
    cost = defaultdict(int)
    fn, ob = None, "?"
    call_line = False

    def add(line):
        parts = line.split()
        if len(parts) >= 2 and fn is not None and (not only or only in ob):
            try:
                cost[ob if by_object else fn] += int(parts[1])
            except ValueError:
                pass

    for line in open(path, errors="replace"):
        if call_line:  # the inclusive cost of the call named above
            call_line = False
            if inclusive:
                add(line)
            continue
        m = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?", line.strip())
        if m:
            table = objects if m.group(2) == "ob" else names
            if m.group(4):
                value = m.group(4)
                table[m.group(3)] = (value.split("/")[-1]
                                     if m.group(2) == "ob" else value)
            if not m.group(1):
                if m.group(2) == "ob":
                    ob = objects.get(m.group(3), m.group(3))
                else:
                    fn = names.get(m.group(3), m.group(3))
            continue
        if line.startswith("calls="):
            call_line = True
            continue
        if line[:1].isdigit() or line[:1] in "+-*":
            add(line)
    return cost


def per_request(d, n1, n2, args):
    def one(n):
        f = sorted(Path(f"{d}-{n}").glob("callgrind.out.*-01"))[0]
        return load(f, args.by_object, args.only, args.inclusive)
    a, b = one(n1), one(n2)
    return {k: (b.get(k, 0) - a.get(k, 0)) / (n2 - n1)
            for k in set(a) | set(b)}


# The Lua side of each module: its objects, and "???" (LuaJIT's traces).
# luaguard's is whatever file was loaded as the module (not a system
# library, not nginx).
def lua_object(module, name):
    if name == "???":
        return True
    if module == "reference":
        return name in ("ngx_http_lua_module.so", "libluajit-5.1.so.2.1.0")
    return (name.endswith(".so") and not name.startswith(("lib", "ld-"))
            and name != "nginx")


def floor_table(top):
    class Opts:
        by_object, only, inclusive = True, None, False
    rows = []
    for scen in sorted(p for p in Path(top).iterdir() if p.is_dir()):
        counts = sorted({int(m.group(1)) for d in scen.iterdir()
                         if (m := re.fullmatch(r"reference-(\d+)", d.name))})
        if len(counts) != 2 or not (scen / f"luaguard-{counts[0]}").is_dir():
            continue
        split = {}
        for module in ("luaguard", "reference"):
            r = per_request(scen / module, counts[0], counts[1], Opts)
            lua = sum(v for k, v in r.items() if lua_object(module, k))
            split[module] = (lua, sum(r.values()) - lua)
        rows.append((scen.name, split))
    print("| scenario | luaguard module | its rest | reference Lua | its rest "
          "| module/Lua | floor |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    floors, sides, lua_rows = [], [], []
    for name, s in rows:
        (gl, gr), (rl, rr) = s["luaguard"], s["reference"]
        floor = rr / (rl + rr)
        if rl > 1:  # `return 200` runs no Lua
            floors.append(floor)
            sides.append(gl / rl)
            lua_rows.append((gl, gr, rl + rr))
        print(f"| {name} | {gl:,.0f} | {gr:,.0f} | {rl:,.0f} | {rr:,.0f} "
              f"| {gl / rl if rl > 1 else 0:.2f} | {floor:.2f} |")
    if not floors:
        return

    def geomean(xs):
        g = 1.0
        for x in xs:
            g *= x
        return g ** (1 / len(xs))

    def total_ratio(k):  # luaguard's Lua side scaled by k, its rest as is
        return geomean([(gr + k * gl) / tot for gl, gr, tot in lua_rows])

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total_ratio(mid) < 0.90 else (lo, mid)
    print(f"\nOver {len(floors)} Lua scenarios: geomean of the totals "
          f"{total_ratio(1.0):.3f}, of the floors {geomean(floors):.3f}, of "
          f"luaguard's Lua side against the reference's "
          f"{geomean(sides):.3f}. A geomean of 0.90 on the totals needs "
          f"luaguard's Lua side at {lo:.2f}x of what it is now in every "
          f"scenario.")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--floor", metavar="DIR")
    ap.add_argument("dir", nargs="?")
    ap.add_argument("n1", type=int, nargs="?")
    ap.add_argument("n2", type=int, nargs="?")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--against")
    ap.add_argument("--by-object", action="store_true")
    ap.add_argument("--only")
    ap.add_argument("--inclusive", action="store_true")
    args = ap.parse_args()
    if args.floor:
        floor_table(args.floor)
        return
    if args.n2 is None:
        ap.error("DIR N1 N2 (or --floor DIR) are needed")
    r = per_request(args.dir, args.n1, args.n2, args)
    if args.against:
        r2 = per_request(args.against, args.n1, args.n2, args)
        print(f"total {sum(r.values()):.0f} vs {sum(r2.values()):.0f}")
        keys = sorted(set(r) | set(r2),
                      key=lambda k: -abs(r.get(k, 0) - r2.get(k, 0)))
        for k in keys[:args.top]:
            a, b = r.get(k, 0), r2.get(k, 0)
            print(f"{a:10.1f} {b:10.1f} {a - b:+10.1f}  {k[:110]}")
        return
    print(f"total {sum(r.values()):.0f}")
    for k, v in sorted(r.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
        print(f"{v:10.1f}  {k[:120]}")


if __name__ == "__main__":
    main()
