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
