"""docs/api.md against the API the modules offer: the `ngx` table walked
in a running nginx (api_walk.lua), the methods of the objects it hands
out, and every module of lua-resty-core 0.1.25 (the files of Debian's
package) with the members `require` gives. Every name either module
offers must be on the page; luaguard's placeholders for what it lacks
must be marked "not yet"; a module the page says luaguard has must load.
A module the page marks "not yet" or "planned" may load already (another
change adds it): the page is then merely behind, not wrong."""

import re
import subprocess
from pathlib import Path

import pytest

from harness import REPO

PAGE = REPO / "docs" / "api.md"
WALK = (Path(__file__).parent / "api_walk.lua").read_text()
LUA_DIR = "/usr/share/lua/5.1/"
STATUSES = {"same", "differs", "not yet", "planned", "luaguard"}
ABSENT = {"not yet", "planned"}
# The dictionary methods lua-nginx-module documents: luaguard's
# dictionaries are userdata, whose methods pairs() cannot list.
DICT_METHODS = (
    "get get_stale set safe_set add safe_add replace delete incr lpush "
    "rpush lpop rpop llen ttl expire flush_all flush_expired get_keys "
    "capacity free_space").split()


def resty_core_modules():
    files = subprocess.run(["dpkg", "-L", "lua-resty-core"],
                           capture_output=True, text=True,
                           check=True).stdout.split()
    return sorted(f[len(LUA_DIR):-len(".lua")].replace("/", ".")
                  for f in files
                  if f.startswith(LUA_DIR) and f.endswith(".lua"))


def page_statuses():
    """{name: status} of every name in backticks in the first column."""
    out = {}
    for line in PAGE.read_text().splitlines():
        cells = line.split(" | ")
        if not line.startswith("| `") or len(cells) < 3:
            continue
        status = cells[1].strip()
        assert status in STATUSES, f"unknown status in: {line}"
        for name in re.findall(r"`([^`]+)`", cells[0]):
            assert name not in out, f"{name} is listed twice"
            out[name] = status
    return out


def walk(nginx, module):
    modules = resty_core_modules()
    lua = ("local modules = {%s} local method_names = {%s}\n%s" % (
        ",".join(f'"{m}"' for m in modules),
        ",".join(f'"{m}"' for m in DICT_METHODS), WALK))
    # The raw tables: luaguard's default profile hands request code
    # read-only proxies, which pairs() does not walk.
    http = "lua_shared_dict d 1m;"
    if module == "luaguard":
        http += " lua_sandbox off;"
    n = nginx(module=module, http=http,
              server=f"location /walk {{ content_by_lua_block {{ {lua} }} }}")
    r = n.get("/walk")
    assert r.status == 200, n.read_log()
    n.stop()
    return dict(line.rsplit(" ", 1) for line in r.text.splitlines())


@pytest.fixture(scope="module")
def statuses():
    return page_statuses()


def test_every_reference_name_is_on_the_page(nginx, statuses):
    ref = walk(nginx, "reference")
    assert "ngx.say" in ref and 'require "ngx.re"' in ref
    missing = sorted(set(ref) - set(statuses))
    assert not missing, f"names missing from docs/api.md: {missing}"


def test_every_luaguard_name_is_on_the_page_with_its_status(nginx,
                                                            statuses):
    ours = walk(nginx, "luaguard")
    assert "ngx.say" in ours
    missing = sorted(set(ours) - set(statuses))
    assert not missing, f"names missing from docs/api.md: {missing}"
    # Members of a module the page marks absent come with that module,
    # which another change may be adding: tolerated like the module.
    late = {m[len('require "'):-1] for m, st in statuses.items()
            if m.startswith("require ") and st in ABSENT}
    for name, kind in ours.items():
        status = statuses[name]
        if kind == "member" and name.rsplit(".", 1)[0] in late:
            continue
        if kind == "pending":
            assert status == "not yet", (
                f"{name} raises 'not implemented', the page says {status}")
        elif kind == "missing":
            assert status in ABSENT, (
                f"{name} fails in luaguard, the page says {status}")
        elif not name.startswith("require "):
            assert status not in ABSENT, (
                f"{name} exists in luaguard, the page says {status}")
