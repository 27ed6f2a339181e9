"""Timers belong to the location that created them (issue 18): a location
takes at most its share of the worker's pending-timer slots
(lua_max_pending_timers_per_location), of memory parked in timer
arguments (lua_timer_memory_per_location) and of Lua time for its timer
callbacks (lua_timer_cpu_per_location); other locations keep creating and
running timers, and the worker is never replaced.

Rendezvous through a shared dict, no timing thresholds: the tests poll for
an event (a flag a callback sets, a log line) and fail if it never comes.
One worker, so a replaced worker cannot hide behind another.
"""

import re
import time

import pytest

HTTP = """
    lua_shared_dict rv 1m;
    lua_max_pending_timers 16;
"""

COMMON = """
    location /pid { content_by_lua_block { ngx.say(ngx.worker.pid()) } }
    location /ok { content_by_lua_block { ngx.say("ok") } }
    location /flag { content_by_lua_block {
        ngx.say(tostring(ngx.shared.rv:get(ngx.var.arg_k)))
    } }
    location /stops { content_by_lua_block {
        local loc = require("luaguard.metrics").get()
                        .locations[ngx.var.arg_loc]
        local s = loc and loc.timer_stops or {}
        ngx.say(s.pending, " ", s.memory, " ", s.cpu)
    } }
    location /metrics { lua_metrics; }
"""


def await_flag(n, key, timeout=20):
    """Waits until a callback set `key` in the shared dict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = n.get(f"/flag?k={key}")
        if r.text != "nil\n":
            return r.text.strip()
        time.sleep(0.02)
    raise AssertionError(f"{key} never set; log:\n{n.read_log()}")


def stops(n, loc):
    return [int(float(x)) for x in n.get(f"/stops?loc={loc}").text.split()]


# ---- pending slots ----

SLOTS = COMMON + """
    # The default share: a quarter of lua_max_pending_timers (16 / 4).
    location /flood { content_by_lua_block {
        local made, err = 0, nil
        for i = 1, 100 do
            local ok, e = ngx.timer.at(3600, function() end)
            if not ok then err = e break end
            made = made + 1
        end
        ngx.say(made, " ", err)
    } }
    location /flood2 {
        lua_max_pending_timers_per_location 2;
        content_by_lua_block {
            local ok1 = ngx.timer.every(3600, function() end)
            local ok2 = ngx.timer.at(3600, function() end)
            ngx.say(ngx.timer.at(3600, function() end))
        }
    }
    location /other { content_by_lua_block {
        local ok, err = ngx.timer.at(0, function()
            ngx.shared.rv:set("other_ran", "yes")
        end)
        ngx.say(tostring(ok), " ", tostring(err))
    } }
"""


def test_one_location_cannot_take_every_pending_slot(nginx):
    n = nginx(http=HTTP, server=SLOTS)
    pid = n.get("/pid").text
    assert n.get("/flood").text == "4 too many pending timers\n"
    # Refused to that location only, and again on every later request.
    assert n.get("/flood").text == "0 too many pending timers\n"
    n.wait_log(r"\[warn\].*lua timer: too many pending timers: the "
               r"location holds 4 \(lua_max_pending_timers_per_location\)")
    # 97 refusals, one line: a loop of refused calls does not flood the log.
    assert n.read_log().count("location holds 4") == 1
    # An explicit share, every timers included.
    assert n.get("/flood2").text == "niltoo many pending timers\n"
    # Another location still gets a slot and its callback runs.
    assert n.get("/other").text == "1 nil\n"
    assert await_flag(n, "other_ran") == "yes"
    assert stops(n, "/flood")[0] == 2
    assert stops(n, "/flood2")[0] == 1
    assert stops(n, "/other")[0] == 0
    assert n.get("/ok").text == "ok\n"
    assert n.get("/pid").text == pid


def test_bad_pending_share_fails_nginx_t(nginx_conf):
    for value in ("0", "abc", "-1"):
        conf = nginx_conf(
            http=f"    lua_max_pending_timers_per_location {value};\n")
        ok, out = conf.test_config()
        assert not ok, value
        assert re.search(r"in \S+nginx\.conf:\d+", out), out


# ---- memory parked in arguments ----

# Ways to park a 400 KB string in a pending timer: as an argument,
# nested in a table argument, captured by the callback, in a table or a
# closure the callback captures.
PARK = {
    "arg": "ngx.timer.at(delay, function() end, big)",
    "nested": "ngx.timer.at(delay, function() end, {x = {big, n = 1}})",
    "upvalue": "ngx.timer.at(delay, function() return #big end)",
    "upvalue_table": "(function() local t = {body = {big}} "
                     "return ngx.timer.at(delay, function() "
                     "return #t.body[1] end) end)()",
    "upvalue_closure": "(function() local function get() return big end "
                       "return ngx.timer.at(delay, function() "
                       "return #get() end) end)()",
}


def park_server():
    out = COMMON
    for name, call in PARK.items():
        out += f"""
    location /park_{name} {{
        lua_timer_memory_per_location 1m;
        content_by_lua_block {{
            local big = string.rep("x", 400 * 1024) .. ngx.var.arg_i
            local delay = tonumber(ngx.var.arg_delay or 3600)
            local ok, err = {call}
            ngx.say(tostring(ok), " ", tostring(err))
        }}
    }}"""
    out += """
    location /park_free {
        lua_timer_memory_per_location 1m;
        content_by_lua_block {
            local i = ngx.var.arg_i
            local big = string.rep("x", 400 * 1024) .. i
            ngx.say(tostring(ngx.timer.at(0, function(p, s)
                ngx.shared.rv:set("fired_" .. i, #s)
            end, big)))
        }
    }
    location /park_off {
        lua_timer_memory_per_location off;
        content_by_lua_block {
            local big = string.rep("x", 400 * 1024) .. ngx.var.arg_i
            ngx.say(tostring(ngx.timer.at(3600, function() end, big)))
        }
    }
    location /park_other { content_by_lua_block {
        local big = string.rep("y", 400 * 1024)
        ngx.say(tostring(ngx.timer.at(3600, function() end, big)))
    } }
"""
    return out


REFUSED = ("nil not enough memory (luaguard: lua_timer_memory_per_location "
           "exceeded by the timer's arguments)\n")


@pytest.mark.parametrize("how", sorted(PARK))
def test_memory_parked_in_timers_is_capped_per_location(nginx, how):
    n = nginx(http=HTTP, server=park_server())
    pid = n.get("/pid").text
    assert n.get(f"/park_{how}?i=1").text == "1 nil\n"
    assert n.get(f"/park_{how}?i=2").text == "1 nil\n"
    assert n.get(f"/park_{how}?i=3").text == REFUSED
    n.wait_log(r"\[warn\].*lua timer: arguments of about \d+ bytes "
               r"refused: the location's pending timers hold \d+ of "
               r"1048576 \(lua_timer_memory_per_location\)")
    assert stops(n, f"/park_{how}")[1] == 1
    # Another location parks its own share.
    assert n.get("/park_other").text == "1\n"
    assert n.get("/ok").text == "ok\n"
    assert n.get("/pid").text == pid


def test_timer_memory_cap_off(nginx):
    n = nginx(http=HTTP, server=park_server())
    for i in range(4):
        assert n.get(f"/park_off?i={i}").text == "1\n"
    assert "lua_timer_memory_per_location" not in n.read_log()


def test_fired_timers_give_their_memory_back(nginx):
    # Ten times the cap, one at a time: each timer's arguments are released
    # when it fires, so none is refused.
    n = nginx(http=HTTP, server=park_server())
    for i in range(10):
        assert n.get(f"/park_free?i={i}").text == "1\n"
        assert await_flag(n, f"fired_{i}") == str(400 * 1024 + len(str(i)))
    assert stops(n, "/park_free")[1] == 0


# ---- callback Lua time ----

CPU = COMMON + """
    # Four every timers whose callbacks each spin for 50 ms: without a cap
    # they keep the worker busy for as long as it lives. With ?at=1, one
    # one-shot timer of the same location instead.
    location /spin {
        lua_timer_cpu_per_location 100ms 1s;
        lua_max_pending_timers_per_location 5;
        content_by_lua_block {
            local rv = ngx.shared.rv
            if ngx.var.arg_at then
                ngx.say(ngx.timer.at(0, function()
                    rv:set("at_ran", "yes")
                end))
                return
            end
            for i = 1, 4 do
                assert(ngx.timer.every(0.001, function()
                    if rv:get("stop") then return end
                    rv:incr("spins", 1, 0)
                    ngx.update_time()
                    local t = ngx.now()
                    while ngx.now() - t < 0.05 do ngx.update_time() end
                end))
            end
            ngx.say("armed")
        }
    }
    location /stop { content_by_lua_block {
        ngx.shared.rv:set("stop", true)
        ngx.say("stopped")
    } }
    location /other { content_by_lua_block {
        ngx.say(ngx.timer.at(0, function()
            ngx.shared.rv:set("other_ran", "yes")
        end))
    } }
"""


def test_timer_every_flood_is_capped_per_location(nginx):
    n = nginx(http=HTTP, server=CPU)
    pid = n.get("/pid").text
    assert n.get("/spin").text == "armed\n"
    n.wait_log(r"\[warn\].*lua timer: the timers of location \"/spin\" "
               r"used their Lua time \(lua_timer_cpu_per_location 100ms "
               r"per 1000ms\): firings are skipped or delayed")
    # Another location's timer still fires, a request is served.
    assert n.get("/other").text == "1\n"
    assert await_flag(n, "other_ran") == "yes"
    assert n.get("/ok").text == "ok\n"
    # Skipped firings are counted, and far outnumber the callbacks that
    # ran: each ran 50 ms of Lua, the bucket holds 100 ms and refills at
    # 100 ms per second, while the four timers fire every millisecond.
    deadline = time.monotonic() + 30
    while stops(n, "/spin")[2] < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    skipped = stops(n, "/spin")[2]
    spins = int(await_flag(n, "spins"))
    assert skipped >= 400, skipped
    assert spins < skipped / 10, (spins, skipped)
    assert stops(n, "/other")[2] == 0
    # The warning is logged once per time the bucket runs dry, not once
    # per skipped firing.
    warnings = n.read_log().count("lua_timer_cpu_per_location 100ms")
    assert warnings < spins + 2, (warnings, spins)
    # A one-shot timer created meanwhile by the same location is delayed
    # until the bucket holds time again, not dropped.
    assert n.get("/spin?at=1").text == "1\n"
    assert n.get("/stop").text == "stopped\n"
    assert await_flag(n, "at_ran") == "yes"
    assert n.get("/pid").text == pid
    assert "ending this worker" not in n.read_log()


def test_timer_cpu_directive_values(nginx_conf):
    for value in ("250ms", "250ms 2s", "off", "1s 1s"):
        conf = nginx_conf(http=f"    lua_timer_cpu_per_location {value};\n")
        ok, out = conf.test_config()
        assert ok, (value, out)
    for value in ("0", "abc", "2s 1s", "off 1s"):
        conf = nginx_conf(http=f"    lua_timer_cpu_per_location {value};\n")
        ok, out = conf.test_config()
        assert not ok, value
        assert re.search(r"in \S+nginx\.conf:\d+", out), out
