"""No Lua runs unbudgeted: code LuaJIT runs with hooks off (xpcall
message handlers of errors raised in a hook, __gc finalizers) is never
where a budget stop goes unheard."""

import pytest

HTTP = """
    lua_budget_slice 200ms;
    lua_budget_memory 32m;
    lua_watchdog_grace 1s;
"""

OK = 'location /ok { content_by_lua_block { ngx.say("ok") } }'


@pytest.mark.asan_fast
@pytest.mark.parametrize("body", [
    # The handler would spin with hooks off, for a runaway loop...
    "xpcall(function() while true do end end, "
    "function(e) while true do end end)",
    # ...and for a memory bomb.
    "xpcall(function() local t = {} for i = 1, 1e9 do "
    "t[i] = string.rep('m', 1000) .. i end end, "
    "function(e) while true do end end)",
])
def test_xpcall_handler_is_not_called_for_a_budget_stop(nginx, body):
    n = nginx(http=HTTP, server=f"""
        location /x {{ content_by_lua_block {{ {body} ngx.say("survived") }} }}
        {OK}
    """)
    (pid,) = n.worker_pids()
    r = n.get("/x", timeout=30)
    assert r.status == 500 and b"survived" not in r.body
    n.wait_log(r"lua_budget_(slice|memory) exceeded")
    assert n.get("/ok").text == "ok\n"
    assert n.worker_pids() == [pid]   # the watchdog did not have to act


def test_xpcall_handler_still_runs_for_script_errors(nginx):
    n = nginx(http=HTTP, server="""
        location /x { content_by_lua_block {
            local ok, v = xpcall(function() error("mine") end,
                                 function(e) return "handled: " .. e end)
            ngx.say(ok, " ", v)
            ngx.say(pcall(xpcall, function() end, nil))
        } }
    """)
    r = n.get("/x")
    assert r.status == 200
    lines = r.text.splitlines()
    assert lines[0].startswith("false handled: ") and lines[0].endswith("mine")


def test_finalizer_loop_after_a_stop_meets_the_watchdog(nginx):
    # A __gc that never returns, planted by a request stopped for memory:
    # the collection that reclaims the request runs it with hooks off.
    # With a deadline armed the watchdog ends the worker (its last
    # resort, logged) and the master starts a new one; it used to spin at
    # 100% CPU forever.
    n = nginx(http=HTTP, server=f"""
        location /plant {{ content_by_lua_block {{
            local p = newproxy(true)
            getmetatable(p).__gc = function() while true do end end
            -- p stays live on this stack until the stop: the collection
            -- that reclaims the request is the one that finalizes it.
            local t = {{}} for i = 1, 1e9 do t[i] = string.rep('g', 1000) .. i end
            ngx.say(tostring(p))
        }} }}
        {OK}
    """)
    (old,) = n.worker_pids()
    n.expect_exit(old)
    try:
        n.get("/plant", timeout=30)
    except Exception:
        pass  # the connection may die with the worker
    n.wait_log(r"stuck inside a C function\); ending this worker", timeout=30)
    n.wait_log(rf"{old} exited with code 1", timeout=30)
    assert n.get("/ok").text == "ok\n"
    assert old not in n.worker_pids()


@pytest.mark.parametrize("http_budget", ["lua_budget_timer_slice 200ms;", ""])
def test_init_worker_timer_runs_under_the_http_level_budgets(nginx,
                                                             http_budget):
    # A timer armed in init_worker_by_lua runs with the http block's own
    # configuration, which nginx never merges: it used to have no budget
    # at all (its limits unset), so this loop spun forever. With no
    # directive the defaults apply (1 s).
    n = nginx(http=HTTP + http_budget + """
        lua_shared_dict d 1m;
        init_worker_by_lua_block {
            ngx.timer.at(0, function()
                ngx.shared.d:set("started", true)
                while true do end
            end)
        }
    """, server='location /s { content_by_lua_block { '
                'ngx.say(ngx.shared.d:get("started")) } }')
    (pid,) = n.worker_pids()
    n.wait_log(r"lua_budget_slice exceeded: Lua ran \d+ ms without "
               r"yielding, stopped at init_worker_by_lua", timeout=15)
    assert n.get("/s").text == "true\n"
    assert n.worker_pids() == [pid]
