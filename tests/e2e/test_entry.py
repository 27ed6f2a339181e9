"""The entry seam: a failure that belongs to one request leaves nothing
behind for the next one."""

import pytest


@pytest.mark.parametrize("module", ["luaguard", "reference"])
def test_failed_module_load_does_not_poison_require(nginx, module):
    # A module whose chunk fails (here: always; in life, a request's budget
    # or a refused allocation) is loaded afresh by the next require.
    # Lua 5.1 leaves a "loading" mark behind, and lua-nginx-module then
    # answers "loop or previous error" for the worker's lifetime.
    # Workers as root: the module lives under pytest's private tmp dir.
    n = nginx(module=module, main="user root;",
              http='lua_package_path "{prefix}/?.lua;;";',
              files={"flaky.lua": """
                  local n = (rawget(_G, "FLAKY_TRIES") or 0) + 1
                  rawset(_G, "FLAKY_TRIES", n)
                  if n == 1 then error("first load fails") end
                  return {tries = n}
              """}, server="""
        location /r { content_by_lua_block {
            local ok, m = pcall(require, "flaky")
            ngx.say(ok and ("loaded after " .. m.tries) or m)
        } }
    """)
    first = n.get("/r").text
    second = n.get("/r").text
    assert "first load fails" in first
    if module == "luaguard":
        assert second == "loaded after 2\n"
    else:
        assert "loop or previous error loading module 'flaky'" in second
