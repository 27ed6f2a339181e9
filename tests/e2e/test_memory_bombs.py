"""Memory bombs in many shapes, in every phase: each is stopped by the
budget it runs into, named in the log, and the worker goes on serving.

The shapes are the ones that used to take a worker down: loops whose
condition calls C (a refused allocation inside a JIT trace that calls C),
FFI calls, pcall, string building, table growth, coroutines, string
buffers; and the VM ceiling, reached by one request or by several at once.
"""

import re
import threading

import pytest

# Wide slices: memory is what these tests stop.
HTTP = """
    lua_budget_slice 30s;
    lua_budget_request 60s;
    lua_budget_timer_slice 30s;
    lua_budget_memory 32m;
    lua_watchdog_grace 5s;
"""

# name -> a Lua statement that allocates without end.
SHAPES = {
    "c_call_condition": "local t = {} local i = 0 "
                        "while ngx.now() > 0 do i = i + 1 "
                        "t[i] = string.rep('x', 100) .. i end",
    "api_call_condition": "local t = {} local i = 0 "
                          "while ngx.var.uri do i = i + 1 "
                          "t[i] = {i, i, i, i, i, i, i, i} end",
    "ffi_call_condition": "local ffi = require 'ffi' "
                          "pcall(ffi.cdef, 'int abs(int);') "
                          "local t = {} local i = 0 "
                          "while ffi.C.abs(-1) == 1 do i = i + 1 "
                          "t[i] = string.rep('f', 200) .. i end",
    "pcall_swallows": "local t = {} while true do pcall(function() "
                      "for i = 1, 1e9 do t[#t + 1] = "
                      "string.rep('p', 500) .. i end end) end",
    "string_doubling": "local s = 'x' while true do s = s .. s end",
    "table_concat": "local parts = {} for i = 1, 1e9 do "
                    "parts[i] = 'abcdefgh' .. i "
                    "if i % 4096 == 0 then parts[#parts + 1] = "
                    "table.concat(parts) end end",
    "table_growth": "local t = {} for i = 1, 1e9 do t[i] = i end",
    "coroutines": "local cs = {} for i = 1, 1e9 do "
                  "cs[i] = coroutine.create(function() end) end",
    "string_buffer": "local buf = require('string.buffer').new() "
                     "while true do buf:put(string.rep('b', 4096)) end",
}

BUDGET = r"lua_budget_memory exceeded"


def pid_of(n):
    (pid,) = n.worker_pids()
    return pid


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bomb_in_content_is_stopped(nginx, shape):
    n = nginx(http=HTTP, server=f"""
        location /bomb {{ content_by_lua_block {{ {SHAPES[shape]} }} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    pid = pid_of(n)
    r = n.get("/bomb", timeout=60)
    assert r.status == 500
    assert b"luaguard" not in r.body          # details only in the log
    n.wait_log(BUDGET)
    assert n.get("/ok").text == "ok\n"
    assert pid_of(n) == pid


BOMB = SHAPES["c_call_condition"]

# phase -> (config of /bomb, status the client sees). A bomb after the
# response is out (log) leaves the response alone; one in the body filter
# cuts it.
PHASES = {
    "rewrite": (f"rewrite_by_lua_block {{ {BOMB} }} "
                "content_by_lua_block { ngx.say('no') }", 500),
    "access": (f"access_by_lua_block {{ {BOMB} }} "
               "content_by_lua_block { ngx.say('no') }", 500),
    "set": (f"set_by_lua_block $x {{ {BOMB} return 'x' }} "
            "content_by_lua_block { ngx.say('no') }", 500),
    "header_filter": ("content_by_lua_block { ngx.say('body') } "
                      f"header_filter_by_lua_block {{ {BOMB} }}", 500),
    "log": ("content_by_lua_block { ngx.say('fine') } "
            f"log_by_lua_block {{ {BOMB} }}", 200),
}


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_bomb_in_every_phase_is_stopped(nginx, phase):
    conf, status = PHASES[phase]
    n = nginx(http=HTTP, server=f"""
        location /bomb {{ {conf} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    pid = pid_of(n)
    r = n.get("/bomb", timeout=60)
    assert r.status == status
    n.wait_log(BUDGET)
    assert n.get("/ok").text == "ok\n"
    assert pid_of(n) == pid


def test_bomb_in_body_filter_cuts_the_response(nginx):
    n = nginx(http=HTTP, server=f"""
        location /bomb {{
            content_by_lua_block {{ ngx.say("first") ngx.flush(true)
                                    ngx.say("second") }}
            body_filter_by_lua_block {{
                if ngx.arg[1]:find("second") then {BOMB} end }} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    pid = pid_of(n)
    out = n.raw(b"GET /bomb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                timeout=60)
    assert b"first" in out and b"second" not in out
    n.wait_log(BUDGET)
    assert n.get("/ok").text == "ok\n"
    assert pid_of(n) == pid


def test_bomb_in_timer_and_light_thread(nginx):
    n = nginx(http=HTTP, server=f"""
        location /timer {{ content_by_lua_block {{
            ngx.timer.at(0, function() {BOMB} end)
            ngx.say("armed") }} }}
        location /thread {{ content_by_lua_block {{
            local th = ngx.thread.spawn(function() {BOMB} end)
            local ok, err = ngx.thread.wait(th)
            ngx.say(ok, " ", err:match("lua_budget_memory") or err) }} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    pid = pid_of(n)
    assert n.get("/timer").text == "armed\n"
    n.wait_log(r"lua entry thread aborted: runtime error: not enough memory "
               r"\(luaguard: lua_budget_memory exceeded")
    # The budget belongs to the request: the light thread is stopped, and
    # so is the entry thread that spawned it (the stop is not the
    # thread's alone to report).
    assert n.get("/thread", timeout=60).status == 500
    n.wait_log(r"lua user thread aborted: runtime error: not enough memory "
               r"\(luaguard: lua_budget_memory exceeded")
    assert n.get("/ok").text == "ok\n"
    assert pid_of(n) == pid


VM_HTTP = """
    lua_budget_slice 30s;
    lua_budget_request 60s;
    lua_budget_memory off;
    lua_vm_memory_limit 48m;
    lua_watchdog_grace 5s;
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("shape", ["c_call_condition", "table_growth",
                                   "string_doubling"])
def test_vm_ceiling_stops_the_request_and_logs(nginx, shape):
    # Reaching lua_vm_memory_limit used to end the worker with exit code 1
    # and no log line (the failed thread's traceback had no memory).
    n = nginx(http=VM_HTTP, server=f"""
        location /bomb {{ content_by_lua_block {{ {SHAPES[shape]} }} }}
        location /ok {{ content_by_lua_block {{ ngx.say("ok") }} }}
    """)
    pid = pid_of(n)
    for _ in range(3):
        assert n.get("/bomb", timeout=60).status == 500
        assert n.get("/ok").text == "ok\n"
    n.wait_log(r"lua_vm_memory_limit exceeded")
    assert pid_of(n) == pid


def test_concurrent_requests_reach_the_ceiling_together(nginx):
    # Four requests that each fit no budget of their own but fill the VM
    # between them, yielding so that they interleave.
    n = nginx(http=VM_HTTP, server="""
        location /bomb { content_by_lua_block {
            local t = {}
            for i = 1, 1e9 do
                t[i] = string.rep("c", 1000) .. i
                if i % 500 == 0 then ngx.sleep(0) end
            end } }
        location /ok { content_by_lua_block { ngx.say("ok") } }
    """)
    pid = pid_of(n)
    results = []
    lock = threading.Lock()

    def bomb():
        r = n.get("/bomb", timeout=60)
        with lock:
            results.append(r.status)

    threads = [threading.Thread(target=bomb) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [500] * 4
    log = n.read_log()
    assert len(re.findall(r"lua_vm_memory_limit exceeded", log)) >= 1
    assert n.get("/ok").text == "ok\n"
    assert pid_of(n) == pid
