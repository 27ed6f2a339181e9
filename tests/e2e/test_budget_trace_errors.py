"""A request's memory budget refuses allocations; one refused inside
compiled code must stop the request like any other, never the worker.
Compiled string operations (concatenation, string.rep, string.format,
table.concat) build their result in LuaJIT's temporary buffer: its
owner was whichever coroutine last used it from C, and the error frame
was wherever the last C function had left it, so a refusal there took the
worker down (scripts/luajit-patches/tmpbuf-owner.patch)."""

import pytest

from harness import ASAN

# The loop compiles well before i = 200, where one string.rep asks for
# 32 MB: past the hard limit of a 2 MB budget (2 x 2 MB + 16 MB), so the
# allocation itself is refused, inside the trace.
REP = """
        location /rep {
            lua_budget_memory 2m;
            content_by_lua_block {
                local id = ngx.var.request_id
                local floor, rep = math.floor, string.rep
                local acc = {}
                for i = 1, 1000 do
                    acc[i] = rep(id, 1 + floor(i / 200) * 1000000)
                end
                ngx.say(#acc)
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
"""


@pytest.mark.asan_fast
def test_refused_string_rep_in_a_compiled_loop_stops_the_request(nginx):
    n = nginx(server=REP)
    (pid,) = n.worker_pids()
    # Without the patch about one request in twelve crashed the worker.
    for i in range(100):
        r = n.get("/rep")
        assert r.status == 500, i
        assert n.worker_pids() == [pid], i
    assert n.get("/ok").text == "ok\n"
    assert n.read_log().count("not enough memory") >= 100


def refuse_each(n, path, pid, count=700):
    """Requests `path` with each of its first `count` allocations refused
    in turn: each ends in 200 or 500, worker `pid` serves them all.
    Returns the statuses seen."""
    statuses = set()
    for i in range(1, count + 1):
        r = n.get(path, headers={"X-Luaguard-Fail-Alloc": str(i)})
        statuses.add(r.status)
        assert r.status in (200, 500), i
        assert n.worker_pids() == [pid], i
    return statuses


# A concatenation inside an __index metamethod the trace took in, its
# strings new in every request (request_id), each allocation of the
# request refused in turn.
CONCAT = """
        location /concat {
            content_by_lua_block {
                local id = ngx.var.request_id
                local t = setmetatable({}, {
                    __index = function(_, k) return id .. k end })
                local acc = {}
                for i = 1, 300 do acc[i] = t[i] end
                ngx.say(#acc)
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
"""


@pytest.mark.asan_fast
@pytest.mark.skipif(not ASAN, reason="needs the fault-injection (ASan) build")
def test_every_refused_allocation_of_a_compiled_concat_stops_the_request(
        nginx):
    n = nginx(server=CONCAT)
    (pid,) = n.worker_pids()
    assert n.get("/concat").text == "300\n"
    # Without the patch one such sweep crashed the worker at the 299th (a
    # buffer of the compiled concatenation); another went through.
    assert refuse_each(n, "/concat", pid) == {200, 500}
    assert n.get("/ok").text == "ok\n"


# Every kind of allocation a trace makes itself (a call from machine code,
# not from the interpreter): tables and their growth, closures, strings
# from each string function the trace compiles, the temporary buffer,
# string.buffer, FFI cdata (with finalizers, some taken back), and the
# collector's steps between them. Each of the request's first
# allocations is refused in turn; the request must end in 200 or 500 and
# the worker stay. 700 covers every allocation of the smaller kinds
# (their sweeps end in 200s) and the first 700 of the others.
KINDS = {
    "table": "for i = 1, 300 do acc[i] = {i, id} end",
    "table_hash": "for i = 1, 100 do local t = {} t.a = i t.b = id "
                  "t.c = i t.d = i t.e = i acc[i] = t end",
    "table_grow": "local t = {} for i = 1, 600 do t[id .. (i % 7)] = i "
                  "t[i] = i end acc[1] = t",
    "table_insert": "for i = 1, 600 do table.insert(acc, id) end",
    "setmetatable": "local mt = {} "
                    "for i = 1, 300 do acc[i] = setmetatable({i}, mt) end",
    "closure": "for i = 1, 300 do acc[i] = function() return i end end",
    "sub": "local s = id .. id "
           "for i = 1, 300 do acc[i] = s:sub(1 + i % 20, 40) end",
    "format": "for i = 1, 300 do acc[i] = string.format('%s-%d', id, i) end",
    "tostring": "for i = 1, 300 do acc[i] = tostring(i + 0.5) .. id end",
    "upper": "for i = 1, 300 do acc[i] = (id .. i):upper() end",
    "gsub": "for i = 1, 100 do acc[i] = (id .. i):gsub('a', 'b') end",
    "table_concat": "local p = {} for i = 1, 200 do p[i] = id end "
                    "for i = 1, 30 do acc[i] = table.concat(p, ',', 1, i * 5)"
                    " end",
    "string_buffer": "local b = require('string.buffer').new() "
                     "for i = 1, 300 do b:put(id, i) end "
                     "acc[1] = b:tostring()",
    "ffi_new": "local ffi = require('ffi') "
               "for i = 1, 300 do acc[i] = ffi.new('int[?]', 8 + i % 8) end",
    "garbage": "for i = 1, 3000 do acc[i % 10 + 1] = id .. i end",
    "finalizers": "local ffi = require('ffi') local function nop() end "
                  "for i = 1, 600 do local c = ffi.gc(ffi.new('int[4]'), nop) "
                  "if i % 3 == 0 then ffi.gc(c, nil) end "
                  "acc[i % 10 + 1] = c end",
}


# Without tmpbuf-owner.patch these sweeps crashed the worker: sub in both
# runs that reached it, upper, garbage and format in one of three.
QUICK = {"garbage", "sub"}


@pytest.mark.skipif(not ASAN, reason="needs the fault-injection (ASan) build")
@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=[pytest.mark.asan_fast] if k in QUICK else [])
    for k in sorted(KINDS)])
def test_every_refused_allocation_of_a_trace_stops_the_request(nginx, kind):
    n = nginx(server="""
        location /k {
            lua_budget_memory 4m;
            content_by_lua_block {
                local id = ngx.var.request_id
                local acc = {}
                %s
                ngx.say(#acc)
            }
        }
        location /ok { content_by_lua_block { ngx.say("ok") } }
""" % KINDS[kind])
    (pid,) = n.worker_pids()
    assert n.get("/k").status == 200
    assert 500 in refuse_each(n, "/k", pid)
    assert n.get("/ok").text == "ok\n"
    assert "not enough memory" in n.read_log()
