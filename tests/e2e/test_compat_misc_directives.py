"""Issue 21, item 3: lua_malloc_trim, lua_sa_restart,
lua_thread_cache_max_entries and lua_load_resty_core, each against
Debian's lua-nginx-module (`module="reference"`)."""

import re

import pytest

MODULES = ["luaguard", "reference"]

# Reads the worker's disposition of SIGHUP and SIGQUIT (x86-64 glibc's
# struct sigaction) and says whether SA_RESTART is in its flags.
SIGACTION = r"""
location = /sa { content_by_lua_block {
    local ffi = require "ffi"
    pcall(ffi.cdef, [[
        struct lg_sigaction { void *handler; unsigned long mask[16];
                              int flags; void *restorer; };
        int sigaction(int sig, const struct lg_sigaction *act,
                      struct lg_sigaction *old);
    ]])
    local out = {}
    for _, sig in ipairs({ 1, 3 }) do
        local sa = ffi.new("struct lg_sigaction")
        assert(ffi.C.sigaction(sig, nil, sa) == 0)
        out[#out + 1] = tostring(bit.band(sa.flags, 0x10000000) ~= 0)
    end
    ngx.say(table.concat(out, " "))
} }
location = /t { content_by_lua_block { ngx.say("ok") } }
"""


def http_for(module, directives):
    # luaguard's default profile keeps ffi from request code
    return directives + ("\nlua_sandbox off;" if module == "luaguard" else "")


def normalize(text, prefix):
    # the reference loads one module more: its lines are one further down
    text = re.sub(r"nginx\.conf:\d+", "nginx.conf:N",
                  text.replace(str(prefix), "PREFIX"))
    return re.sub(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d \[(\w+)\] \d+#\d+: ",
                  r"[\1] ", text)


@pytest.mark.parametrize("directive", [
    "lua_load_resty_core on;", "lua_load_resty_core off;",
    "lua_malloc_trim 0;", "lua_malloc_trim 5;", "lua_sa_restart off;",
    "lua_thread_cache_max_entries 0;", "lua_thread_cache_max_entries 10;",
    "lua_malloc_trim -1;", "lua_malloc_trim x;", "lua_sa_restart x;",
    "lua_thread_cache_max_entries -1;",
    "server { lua_malloc_trim 5; }", "server { lua_sa_restart on; }",
])
def test_accepted_and_refused_alike(nginx_conf, directive):
    got = {}
    for m in MODULES:
        n = nginx_conf(module=m, http=directive)
        ok, out = n.test_config()
        lines = [ln for ln in normalize(out, n.prefix).splitlines()
                 if "[warn]" in ln or "[emerg]" in ln]
        got[m] = (ok, lines)
    assert got["luaguard"] == got["reference"]


@pytest.mark.parametrize("directives,expected", [
    ("", "true true"),
    ("lua_sa_restart on;", "true true"),
    ("lua_sa_restart off;", "false false"),
])
def test_sa_restart_on_the_workers_signal_handlers(nginx, directives,
                                                   expected):
    for m in MODULES:
        n = nginx(module=m, http=http_for(m, directives), server=SIGACTION)
        assert n.get("/sa").text == expected + "\n", m


def test_requests_served_with_malloc_trim_every_request(nginx):
    for m in MODULES:
        n = nginx(module=m, http="lua_malloc_trim 1;\n"
                  "lua_thread_cache_max_entries 1;", server=SIGACTION)
        for _ in range(5):
            assert n.get("/t").text == "ok\n", m
