#!/usr/bin/python3
"""Where the instructions of one request go, per function, from the two
runs bench/callgrind.py leaves for a scenario and module (its last line
names the directory):

    bench/cgdiff.py DIR/hello/luaguard 300 2300 [--top 40]
        [--against DIR/hello/reference] [--by-object] [--only SUBSTR]
        [--inclusive]

Self cost per request = (cost in the n2 run - cost in the n1 run) /
(n2 - n1), read from callgrind's output of the serving thread
(callgrind.out.PID-01). --against prints a second module beside it and
the difference; --by-object sums per shared object; --only keeps the
functions of objects whose name contains SUBSTR; --inclusive adds the
cost of the calls each function makes (approximate where the VM's own
labels call each other)."""

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


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("n1", type=int)
    ap.add_argument("n2", type=int)
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--against")
    ap.add_argument("--by-object", action="store_true")
    ap.add_argument("--only")
    ap.add_argument("--inclusive", action="store_true")
    args = ap.parse_args()
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
