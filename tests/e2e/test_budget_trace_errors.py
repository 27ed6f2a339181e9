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
    statuses = set()
    # Without the patch one such sweep crashed the worker at the 299th (a
    # buffer of the compiled concatenation); another went through.
    for i in range(1, 701):
        r = n.get("/concat", headers={"X-Luaguard-Fail-Alloc": str(i)})
        statuses.add(r.status)
        assert r.status in (200, 500), i
        assert n.worker_pids() == [pid], i
    assert statuses == {200, 500}
    assert n.get("/ok").text == "ok\n"
