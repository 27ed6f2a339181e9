"""The FFI fast paths of ngx.shared.DICT and ngx.re run, not just load.

Their declarations come from one place (src/api/ffi_abi.hpp) and a fast
path that fails to load stops the VM from starting; these tests show that
the hot calls go through the FFI on ordinary input: a call hook sees every
function call, and a hot method that fell back to its C implementation
would show up as a call of a lua_CFunction.
"""

CHECK = r"""
-- LuaJIT's own functions (the FFI's call and index metamethods among them)
-- print as "builtin#N"; any other C function that runs is a lua_CFunction
-- of the C API: a fallback from the fast path.
local sethook = debug.sethook
local function c_calls(fn, ...)
    local seen = 0
    sethook(function()
        local info = debug.getinfo(2, "Sf")
        if info.what == "C" and info.func ~= sethook
           and not tostring(info.func):find("builtin#", 1, true) then
            seen = seen + 1
        end
    end, "c")
    fn(...)
    sethook()
    return seen
end
"""


def test_shdict_and_regex_hot_calls_take_the_ffi_path(nginx):
    n = nginx(http="lua_shared_dict d 1m;", server=r"""
        location = /t { content_by_lua_block {
            """ + CHECK + r"""
            local d = ngx.shared.d
            ngx.say("get source ", debug.getinfo(d.get, "S").source)
            ngx.say("match source ", debug.getinfo(ngx.re.match, "S").source)
            ngx.say("set ", c_calls(d.set, d, "k", "v"))
            ngx.say("get ", c_calls(d.get, d, "k"), " ", d:get("k"))
            ngx.say("incr ", c_calls(d.incr, d, "n", 1, 0))
            ngx.say("match ", c_calls(ngx.re.match, "abc", "b", "jo"))
            ngx.say("find ", c_calls(ngx.re.find, "abc", "c", "jo"))
            -- the control: a method with no fast path is seen
            ngx.say("get_keys ", c_calls(d.get_keys, d))
            -- and so is a fallback: a bad option goes to the C function
            ngx.say("bad option ", c_calls(pcall, ngx.re.match, "a", "a",
                                           "Z"))
        } }
    """)
    assert n.get("/t").text.splitlines() == [
        "get source =luaguard.shdict",
        "match source =luaguard.regex",
        "set 0",
        "get 0 v",
        "incr 0",
        "match 0",
        "find 0",
        "get_keys 1",
        "bad option 1",
    ]


def test_request_tables_take_the_ffi_path(nginx):
    n = nginx(server=r"""
        location = /t { content_by_lua_block {
            """ + CHECK + r"""
            ngx.header["X-A"] = {"1", "2"}
            local get = ngx.req.get_headers
            ngx.say("source ", debug.getinfo(get, "S").source)
            ngx.say("default ", c_calls(get))
            ngx.say("raw ", c_calls(get, 1, true))
            ngx.say("uri args ", c_calls(ngx.req.get_uri_args))
            ngx.say("resp ", c_calls(ngx.resp.get_headers),
                    " ", table.concat(ngx.resp.get_headers().x_a, ","))
            ngx.req.read_body()
            ngx.say("post args ", c_calls(ngx.req.get_post_args, 0))
            -- the control: an argument the fast path leaves to C
            ngx.say("string max ", c_calls(get, "2"))
        } }
    """)
    assert n.request("/t?a=1&b", method="POST",
                     body="c=2").text.splitlines() == [
        "source =luaguard.req",
        "default 0",
        "raw 0",
        "uri args 0",
        "resp 0 1,2",
        "post args 0",
        "string max 1",
    ]


def test_get_headers_fast_path_in_strict_sandbox(nginx):
    """Request code in lua_sandbox strict gets a plain table (no cdata),
    with the metatable that normalises names, from the fast path."""
    n = nginx(server=r"""
        lua_sandbox strict;
        location = /t { content_by_lua_block {
            local h, e = ngx.req.get_headers()
            local n = 0
            for k, v in pairs(h) do
                n = n + 1
                assert(type(k) == "string")
                assert(type(v) == "string" or type(v) == "table")
            end
            ngx.say(n, " ", h.x_a, " ", h["X-A"], " ",
                    table.concat(h.x_d, ","), " ", tostring(e))
            local _, e2 = ngx.req.get_headers(2)
            ngx.say(e2, " ", ngx.req.get_headers(0, true)["X-A"])
        } }
    """)
    resp = n.raw(b"GET /t HTTP/1.0\r\nHost: x\r\nX-A: 1\r\nX-D: a\r\n"
                 b"x-d: b\r\n\r\n")
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], n.read_log()
    assert body.decode().splitlines() == ["3 1 1 a,b nil", "truncated 1"]


def test_request_tables_nested_from_finalizer(nginx):
    """A finalizer that runs while a table is being built and asks for
    another one gets its own: neither result mixes with the other."""
    n = nginx(server=r"""
        location = /t { content_by_lua_block {
            local nested, bad = 0, 0
            local function arm()
                local p = newproxy(true)
                getmetatable(p).__gc = function()
                    local h = ngx.req.get_headers(0)
                    if h["x-h1"] ~= "h1" or h.k1 ~= nil then
                        bad = bad + 1
                    end
                    nested = nested + 1
                    arm()
                end
            end
            for _ = 1, 20 do arm() end
            for _ = 1, 300 do
                local a = ngx.req.get_uri_args(0)
                for i = 1, 60 do
                    if a["k" .. i] ~= "v" .. i then bad = bad + 1 end
                end
                if a["x-h1"] ~= nil then bad = bad + 1 end
            end
            ngx.say(nested > 0, " ", bad)
        } }
    """)
    args = "&".join(f"k{i}=v{i}" for i in range(1, 61))
    hdrs = "".join(f"X-H{i}: h{i}\r\n" for i in range(1, 61))
    resp = n.raw(f"GET /t?{args} HTTP/1.0\r\nHost: x\r\n{hdrs}\r\n"
                 .encode())
    head, _, body = resp.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], n.read_log()
    assert body == b"true 0\n"


def test_ngx_var_reads_take_the_ffi_path(nginx):
    """ngx.var.NAME runs no lua_CFunction; a capture by number, a write,
    and a name too long for the fast path's buffer are the C functions'
    (the controls)."""
    n = nginx(server=r"""
        location ~ ^/t(\d+) {
            set $mine "";
            content_by_lua_block {
            """ + CHECK + r"""
            ngx.say("uri ", c_calls(function() return ngx.var.uri end),
                    " ", ngx.var.uri)
            ngx.say("arg ", c_calls(function() return ngx.var.arg_a end),
                    " ", ngx.var.arg_a)
            ngx.say("unknown ", c_calls(function() return ngx.var.nope end),
                    " ", tostring(ngx.var.nope))
            ngx.say("capture ", c_calls(function() return ngx.var[1] end),
                    " ", ngx.var[1])
            ngx.say("write ", c_calls(function() ngx.var.mine = "m" end),
                    " ", ngx.var.MINE)
            local long = "arg_" .. string.rep("x", 70)
            ngx.say("long ", c_calls(function() return ngx.var[long] end),
                    " ", ngx.var[long])
        } }
    """)
    assert n.get("/t42?a=1&" + "x" * 70 + "=long").text.splitlines() == [
        "uri 0 /t42", "arg 0 1", "unknown 0 nil", "capture 1 42",
        "write 1 m", "long 1 long"]


def test_ngx_ctx_reads_take_the_ffi_path(nginx):
    """ngx.ctx once the request has its table: no lua_CFunction runs (a C
    metamethod would keep every handler reading it out of LuaJIT's
    traces). The first read, which makes the table, and ngx.status, are
    the C __index's. Each request still reads its own table: a second
    request, made while the first one sleeps, sees none of its fields."""
    n = nginx(server=r"""
        location = /t { content_by_lua_block {
            """ + CHECK + r"""
            local function read() return ngx.ctx end
            ngx.say("first ", c_calls(read))
            ngx.ctx.mine = ngx.var.arg_id
            ngx.say("again ", c_calls(read))
            ngx.say("status ", c_calls(function() return ngx.status end))
            ngx.sleep(tonumber(ngx.var.arg_sleep) or 0)
            ngx.say("mine ", ngx.ctx.mine, " ", c_calls(read))
        } }
        location = /both { content_by_lua_block {
            -- a waits in its sleep while b runs
            local a, b = ngx.location.capture_multi({
                {"/t?id=a&sleep=0.01"}, {"/t?id=b"}})
            ngx.print(a.body, b.body)
        } }
    """)
    assert n.get("/t?id=x").text.splitlines() == [
        "first 1", "again 0", "status 1", "mine x 0"]
    out = n.get("/both").text.splitlines()
    assert [line for line in out if line.startswith("mine")] == [
        "mine a 0", "mine b 0"]
