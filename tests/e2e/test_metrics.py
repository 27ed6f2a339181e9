"""lua_metrics: the Prometheus endpoint and require "luaguard.metrics".

Every counter is checked by making its event happen and expecting the
exact increase, with two workers (the counters live in shared memory) and
across a reload (the zone is kept). The exposition text is read with a
strict parser of the text format (version 0.0.4).
"""

import math
import re
import time

import pytest

from harness import TcpServer

# ---- a strict reader of the Prometheus text exposition format ----

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
SAMPLE = re.compile(
    rf"^(?P<name>{NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)$")
LABEL_PAIR = re.compile(rf'({LABEL})="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_value(text):
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text):
        raise AssertionError(f"bad value {text!r}")
    return float(text)


def parse_labels(text):
    labels = {}
    pos = 0
    while pos < len(text):
        m = LABEL_PAIR.match(text, pos)
        assert m, f"bad labels {text!r} at {pos}"
        name, raw = m.group(1), m.group(2)
        assert name not in labels, f"label {name} twice in {text!r}"
        labels[name] = re.sub(r"\\(.)",
                              lambda e: "\n" if e.group(1) == "n"
                              else e.group(1), raw)
        pos = m.end()
    return labels


def family_of(name, types):
    if name in types:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)] if name.endswith(suffix) else None
        if base and types.get(base) == "histogram":
            return base
    raise AssertionError(f"sample {name} has no TYPE line before it")


def parse_exposition(text):
    """Returns {(name, frozenset(labels)): value}; raises on anything
    the format does not allow."""
    assert text.endswith("\n"), "the text must end with a newline"
    types, helps, samples = {}, set(), {}
    seen_samples = set()
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            assert parts[0] == "#" and len(parts) >= 3, line
            if parts[1] == "HELP":
                assert re.fullmatch(NAME, parts[2]), line
                assert parts[2] not in helps, f"HELP twice: {line}"
                helps.add(parts[2])
            elif parts[1] == "TYPE":
                assert len(parts) == 4 and parts[3] in TYPES, line
                assert re.fullmatch(NAME, parts[2]), line
                assert parts[2] not in types, f"TYPE twice: {line}"
                assert parts[2] not in seen_samples, \
                    f"TYPE after samples: {line}"
                types[parts[2]] = parts[3]
            continue
        assert line, "no empty lines"
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name = m.group("name")
        labels = parse_labels(m.group("labels") or "")
        value = parse_value(m.group("value"))
        fam = family_of(name, types)
        seen_samples.add(fam)
        if types[fam] == "counter":
            assert name.endswith("_total"), name
            assert value >= 0 and value == int(value), line
        if types[fam] == "histogram" and name.endswith("_bucket"):
            assert "le" in labels, line
        key = (name, frozenset(labels.items()))
        assert key not in samples, f"duplicate sample {line}"
        samples[key] = value
    check_histograms(types, samples)
    return samples


def check_histograms(types, samples):
    for fam, t in types.items():
        if t != "histogram":
            continue
        series = {}
        for (name, labels), v in samples.items():
            if name == fam + "_bucket":
                rest = frozenset(kv for kv in labels if kv[0] != "le")
                le = parse_value(dict(labels)["le"])
                series.setdefault(rest, []).append((le, v))
        for rest, buckets in series.items():
            buckets.sort()
            les = [b[0] for b in buckets]
            assert len(set(les)) == len(les), f"{fam}: le twice"
            assert les[-1] == math.inf, f"{fam}{set(rest)}: no +Inf bucket"
            counts = [b[1] for b in buckets]
            assert counts == sorted(counts), \
                f"{fam}{set(rest)}: buckets not cumulative: {buckets}"
            count = samples.get((fam + "_count", rest))
            assert count is not None, f"{fam}{set(rest)}: no _count"
            assert counts[-1] == count, \
                f"{fam}{set(rest)}: +Inf {counts[-1]} != _count {count}"
            assert (fam + "_sum", rest) in samples, f"{fam}: no _sum"


def test_parser_rejects_what_the_format_forbids():
    good = ('# HELP a_total x\n# TYPE a_total counter\n'
            'a_total{l="v\\"q"} 3\n')
    assert parse_exposition(good) == {
        ("a_total", frozenset({("l", 'v"q')})): 3.0}
    bad = [
        "a_total 1\n",                                     # no TYPE
        "# TYPE a_total counter\na_total{l=v} 1\n",        # unquoted
        "# TYPE a_total counter\na_total 1 x\n",           # junk
        "# TYPE a_total counter\na_total 1\na_total 1\n",  # duplicate
        "# TYPE a_total counter\na_total 1",               # no newline
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\n"
        "h_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",   # not cumulative
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\n"
        "h_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 3\n",   # +Inf != count
        "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
    ]
    for text in bad:
        with pytest.raises(AssertionError):
            parse_exposition(text)


# ---- the server ----

class LineEcho(TcpServer):
    """Echoes lines back on loopback; keeps connections open."""

    @staticmethod
    def serve(c):
        f = c.makefile("rb")
        try:
            for line in f:
                c.sendall(line)
        except OSError:
            pass
        finally:
            c.close()


SERVER = r"""
location = /run {
    content_by_lua_block { ngx.say(ngx.worker.id()) }
}
location = /err {
    content_by_lua_block { error("boom") }
}
location = /slice {
    lua_budget_slice 100ms;
    content_by_lua_block { while true do end }
}
location = /ffi {
    lua_sandbox strict;
    content_by_lua_block {
        local ok, err = pcall(require, "ffi")
        ngx.say(ok, " ", err)
    }
}
location = /egress {
    lua_egress deny 127.0.0.2;
    content_by_lua_block {
        local s = ngx.socket.tcp()
        local ok, err = s:connect("127.0.0.2", 9)
        ngx.say(ok, " ", err)
    }
}
location = /timer {
    content_by_lua_block {
        local id, delay = ngx.var.arg_id, tonumber(ngx.var.arg_delay)
        assert(ngx.timer.at(delay, function(premature)
            if not premature then
                ngx.log(ngx.NOTICE, "metrics timer fired ", id)
            end
        end))
        ngx.say("armed")
    }
}
location = /sock {
    content_by_lua_block {
        for i = 1, 2 do
            local s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", tonumber(ngx.var.arg_port)))
            assert(s:send("ping\n"))
            assert(s:receive() == "ping")
            ngx.say(s:getreusedtimes())
            assert(s:setkeepalive())
        end
    }
}
location = /dict {
    content_by_lua_block {
        assert(ngx.shared.d:set(ngx.var.arg_k, string.rep("x", 200000)))
        ngx.say("set")
    }
}
location = /api {
    content_by_lua_block {
        local m = require "luaguard.metrics"
        local t = m.get()
        local run = t.locations["/run"]
        local w = 0
        for _, v in pairs(t.workers) do
            assert(v.vm_memory_bytes > 0 and v.vm_memory_ceiling_bytes > 0)
            w = w + 1
        end
        ngx.say(run.runs, " ", run.cpu_seconds.count, " ",
                run.cpu_seconds.buckets[17].count, " ", w, " ",
                t.shdict.d.capacity)
        ngx.print(m.text())
    }
}
location = /metrics {
    lua_metrics;
}
"""

HTTP = "lua_shared_dict d 1m;"


def scrape(n):
    r = n.get("/metrics")
    assert r.status == 200, r
    assert r.header("Content-Type").startswith(
        "text/plain; version=0.0.4"), r.headers
    return parse_exposition(r.text)


def val(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name):
    return sum(v for (n, _), v in samples.items() if n == name)


def wait_for(n, cond, timeout=10):
    """Scrapes until `cond` holds. What is counted at the end of a request
    (the histogram, budget stops) lands when nginx frees the request, which
    may be just after the client has its response (and the next request
    may be served by the other worker meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(n)
        if cond(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError("metric condition never held")
        time.sleep(0.1)


def hit_both_workers(n, path, limit=400):
    """Sends requests until both workers answered one; returns how many
    were sent (each answers its ngx.worker.id())."""
    seen, sent = set(), 0
    while len(seen) < 2 and sent < limit:
        r = n.get(path)
        assert r.status == 200
        seen.add(r.text.strip())
        sent += 1
    assert seen == {"0", "1"}, "the kernel never picked the second worker"
    return sent


@pytest.fixture
def srv(nginx):
    return nginx(server=SERVER, http=HTTP, workers=2)


@pytest.mark.asan_fast
def test_runs_and_cpu_histogram_count_exactly_across_two_workers(srv):
    before = scrape(srv)
    sent = hit_both_workers(srv, "/run")
    for _ in range(5):
        assert srv.get("/run").status == 200
    sent += 5
    cnt = "luaguard_lua_cpu_seconds_count"
    after = wait_for(srv, lambda s: val(s, cnt, location="/run")
                     - val(before, cnt, location="/run") >= sent)
    assert val(after, cnt, location="/run") \
        - val(before, cnt, location="/run") == sent
    runs = "luaguard_lua_runs_total"
    assert val(after, runs, location="/run") \
        - val(before, runs, location="/run") == sent
    assert val(after, "luaguard_lua_cpu_seconds_sum", location="/run") > 0
    assert val(after, "luaguard_lua_errors_total", location="/run") == 0
    # The exposition endpoint itself runs no Lua.
    assert val(after, runs, location="/metrics") == 0


def test_errors_and_budget_stops(srv):
    before = scrape(srv)
    assert srv.get("/err").status == 500
    assert srv.get("/err").status == 500
    assert srv.get("/slice").status == 500
    stops = "luaguard_budget_stops_total"
    after = wait_for(srv, lambda s: val(
        s, stops, location="/slice", kind="slice") > 0)
    err = "luaguard_lua_errors_total"
    assert val(after, err, location="/err") \
        - val(before, err, location="/err") == 2
    assert val(after, stops, location="/slice", kind="slice") \
        - val(before, stops, location="/slice", kind="slice") == 1
    for kind in ("request", "memory", "vm_memory"):
        assert val(after, stops, location="/slice", kind=kind) == 0
    # The stopped run is an error too.
    assert val(after, err, location="/slice") == 1


def test_sandbox_and_egress_refusals(srv):
    before = scrape(srv)
    r = srv.get("/ffi")
    assert "capability 'ffi' is not allowed" in r.text
    r = srv.get("/egress")
    assert r.text.strip() == "nil destination not allowed by policy"
    after = scrape(srv)
    ref = "luaguard_sandbox_refusals_total"
    assert val(after, ref, location="/ffi", capability="ffi") \
        - val(before, ref, location="/ffi", capability="ffi") == 1
    assert val(after, ref, location="/ffi", capability="io") == 0
    eg = "luaguard_egress_refusals_total"
    assert val(after, eg, location="/egress") \
        - val(before, eg, location="/egress") == 1
    assert val(after, "luaguard_cosocket_connects_total",
               location="/egress") == 0


def test_cosocket_connects_and_pool_hits(srv):
    echo = LineEcho()
    try:
        before = scrape(srv)
        r = srv.get(f"/sock?port={echo.port}")
        assert r.status == 200 and r.text.split() == ["0", "1"], r
        after = wait_for(srv, lambda s: total(
            s, "luaguard_cosocket_pool_idle") >= 1)
        c = "luaguard_cosocket_connects_total"
        h = "luaguard_cosocket_pool_hits_total"
        assert val(after, c, location="/sock") \
            - val(before, c, location="/sock") == 1
        assert val(after, h, location="/sock") \
            - val(before, h, location="/sock") == 1
        assert echo.accepted == 1
    finally:
        echo.close()


def test_timers_pending_and_callback_runs(srv):
    before = scrape(srv)
    assert total(before, "luaguard_timers_pending") == 0
    assert srv.get("/timer?id=long&delay=60").status == 200
    wait_for(srv, lambda s: total(s, "luaguard_timers_pending") == 1)
    assert srv.get("/timer?id=now&delay=0").status == 200
    srv.wait_log(r"metrics timer fired now")
    cnt = "luaguard_lua_cpu_seconds_count"
    after = wait_for(srv, lambda s: val(
        s, "luaguard_lua_runs_total", location="/timer")
        - val(before, "luaguard_lua_runs_total", location="/timer") == 3
        and val(s, cnt, location="/timer")
        - val(before, cnt, location="/timer") >= 2)
    # Two handler runs and one callback; timers are not requests.
    assert val(after, "luaguard_lua_cpu_seconds_count", location="/timer") \
        - val(before, "luaguard_lua_cpu_seconds_count",
              location="/timer") == 2


def test_vm_and_shdict_gauges(srv):
    s = wait_for(srv, lambda s: len([
        k for k in s if k[0] == "luaguard_vm_memory_bytes"]) == 2)
    for (name, labels), v in s.items():
        if name == "luaguard_vm_memory_bytes":
            assert dict(labels)["worker"] in ("0", "1") and v > 0
        if name == "luaguard_vm_memory_ceiling_bytes":
            assert v == 1024 ** 3
    cap = val(s, "luaguard_shdict_capacity_bytes", dict="d")
    free = val(s, "luaguard_shdict_free_bytes", dict="d")
    assert cap == 1024 * 1024 and 0 < free < cap
    assert srv.get("/dict?k=a").status == 200
    s2 = scrape(srv)
    assert val(s2, "luaguard_shdict_free_bytes", dict="d") < free - 100000


@pytest.mark.asan_fast
def test_counters_survive_reload(srv):
    n1 = hit_both_workers(srv, "/run")
    assert srv.get("/err").status == 500
    before = scrape(srv)
    runs = val(before, "luaguard_lua_runs_total", location="/run")
    assert runs == n1
    srv.reload()
    after = scrape(srv)
    assert val(after, "luaguard_lua_runs_total", location="/run") == runs
    assert val(after, "luaguard_lua_errors_total", location="/err") == 1
    n2 = hit_both_workers(srv, "/run")
    final = scrape(srv)
    assert val(final, "luaguard_lua_runs_total", location="/run") \
        == runs + n2
    # The new workers publish their gauges; the old ones are gone.
    workers = {dict(k[1])["worker"] for k in final
               if k[0] == "luaguard_vm_memory_bytes"}
    assert workers == {"0", "1"}


def test_lua_api_reads_the_same_numbers(srv):
    for _ in range(3):
        assert srv.get("/run").status == 200
    deadline = time.monotonic() + 10
    while True:
        r = srv.get("/api")
        assert r.status == 200, r
        first, text = r.text.split("\n", 1)
        runs, count, inf, workers, cap = first.split()
        if count == "3" or time.monotonic() > deadline:
            break
        time.sleep(0.1)   # see wait_for: the histogram lands at request end
    assert runs == count == inf == "3"
    assert cap == str(1024 * 1024)
    assert workers in ("1", "2")
    samples = parse_exposition(text)
    assert val(samples, "luaguard_lua_runs_total", location="/run") == 3


def test_metrics_endpoint_only_get(srv):
    assert srv.request("/metrics", method="POST", body="x").status == 405
    r = srv.request("/metrics", method="HEAD")
    assert r.status == 200 and r.body == b""


def test_lua_metrics_is_a_location_directive(nginx_conf):
    n = nginx_conf(http="lua_metrics;")
    ok, out = n.test_config()
    assert not ok and '"lua_metrics" directive is not allowed here' in out


def test_dashboard_and_example_use_served_names(srv):
    import json
    from harness import REPO
    dash = json.loads((REPO / "examples" / "grafana-dashboard.json")
                      .read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"]
                     for t in p["targets"])
    used = set(re.findall(r"luaguard_[a-z_]+", exprs))
    served = {name for name, _ in scrape(srv)}
    assert used and used <= served, used - served
    assert "lua_metrics;" in (REPO / "examples" / "nginx.conf").read_text()
