"""ssl_client_hello_by_lua and ngx.ssl.clienthello: Lua reads the client's
hello (SNI, raw extensions, offered versions) and restricts the protocols
before OpenSSL acts on it. nginx 1.22 treats OpenSSL's "retry the hello
callback" as a failed handshake, so the code may not yield: the reference
fails the handshake at the yield, luaguard raises the API-disabled error
at the call. Compared with lua-nginx-module where both work."""
import re
import socket
import ssl
import subprocess

import pytest

from harness import free_port
from test_ssl_cert import pki, handshake  # noqa: F401  (fixture)

BOTH = ["luaguard", "reference"]

DUMP = """location /d { content_by_lua_block {
    local keys = ngx.shared.d:get_keys()
    table.sort(keys)
    for _, k in ipairs(keys) do ngx.say(k, "=", ngx.shared.d:get(k)) end
} }"""


def conf(pki, port, code, extra=""):
    return f"""
    lua_shared_dict d 1m;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/default.test.crt;
        ssl_certificate_key {pki}/default.test.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        {extra}
        ssl_client_hello_by_lua_block {{ {code} }}
        location / {{ return 200 "ok $ssl_protocol $ssl_server_name\\n"; }}
    }}
"""


def dump(n):
    return dict(line.split("=", 1) for line in n.get("/d").text.splitlines())


def s_client(port, *args):
    """Runs openssl s_client (its hello shapes the extensions)."""
    subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                    *args], input=b"", capture_output=True, timeout=20)


READ = r"""
    local ch = require "ngx.ssl.clienthello"
    local d = ngx.shared.d
    d:set("phase", ngx.get_phase())
    d:set("sni", tostring(ch.get_client_hello_server_name()))
    local sni = ch.get_client_hello_ext(0)
    d:set("ext0", sni and ngx.encode_base64(sni) or "nil")
    local sv = ch.get_client_hello_ext(43)
    d:set("ext43", sv and sv:gsub(".", function(c)
        return string.format("%02x", c:byte()) end) or "nil")
    d:set("absent", tostring(ch.get_client_hello_ext(65000)))
    local vers, err = ch.get_supported_versions()
    d:set("vers", vers and table.concat(vers, ",") or tostring(err))
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", BOTH)
def test_hello_read(nginx, pki, module):
    port = free_port()
    n = nginx(module=module, http=conf(pki, port, READ), server=DUMP)
    assert handshake(port, "a.test") == ("default.test",
                                         "ok TLSv1.3 a.test\n")
    d = dump(n)
    assert d["phase"] == "ssl_client_hello"
    assert d["sni"] == "a.test"
    # server_name_list: length 9, host_name, length 6, "a.test"
    assert d["ext0"] == "AAkAAAZhLnRlc3Q="
    assert d["absent"] == "nil"
    offered = re.findall("....", d["ext43"][2:])
    names = {"0301": "TLSv1", "0302": "TLSv1.1", "0303": "TLSv1.2",
             "0304": "TLSv1.3"}
    assert d["vers"] == ",".join(names[v] for v in reversed(offered)
                                 if v in names)


@pytest.mark.parametrize("module", BOTH)
def test_hello_without_sni_or_versions(nginx, pki, module):
    port = free_port()
    n = nginx(module=module, http=conf(pki, port, READ), server=DUMP)
    s_client(port, "-tls1_2", "-noservername")
    assert dump(n) == {"phase": "ssl_client_hello", "sni": "nil",
                       "ext0": "nil", "ext43": "nil", "absent": "nil",
                       "vers": "nil"}
    s_client(port, "-tls1_3", "-noservername")
    assert dump(n)["vers"] == "TLSv1.3"


@pytest.mark.parametrize("module", BOTH)
def test_protocols_restricted_per_name(nginx, pki, module):
    port = free_port()
    code = r"""
        local ch = require "ngx.ssl.clienthello"
        if ch.get_client_hello_server_name() == "old.test" then
            assert(ch.set_protocols({"TLSv1.2"}))
        end
    """
    nginx(module=module, http=conf(pki, port, code))
    assert handshake(port, "old.test") == ("default.test",
                                           "ok TLSv1.2 old.test\n")
    assert handshake(port, "new.test") == ("default.test",
                                           "ok TLSv1.3 new.test\n")


@pytest.mark.parametrize("module", BOTH)
def test_errors_and_exit_abort_the_handshake(nginx, pki, module):
    port = free_port()
    code = r"""
        local ch = require "ngx.ssl.clienthello"
        local name = ch.get_client_hello_server_name()
        if name == "error.test" then error("boom") end
        if name == "exit.test" then return ngx.exit(ngx.ERROR) end
        if name == "ok.test" then return ngx.exit(ngx.OK) end
    """
    n = nginx(module=module, http=conf(pki, port, code))
    assert handshake(port, "error.test")[0] == "failed"
    assert "boom" in n.read_log()
    assert handshake(port, "exit.test")[0] == "failed"
    assert handshake(port, "ok.test") == ("default.test",
                                          "ok TLSv1.3 ok.test\n")
    assert handshake(port, "x.test") == ("default.test",
                                         "ok TLSv1.3 x.test\n")


def test_hello_may_not_yield(nginx, pki):
    port = free_port()
    code = r"""
        local d = ngx.shared.d
        d:set("sleep", select(2, pcall(ngx.sleep, 0.01)))
        d:set("sock", select(2, pcall(function()
            return ngx.socket.tcp():connect("127.0.0.1", 1) end)))
        if require("ngx.ssl.clienthello").get_client_hello_server_name()
           == "wait.test"
        then
            ngx.sleep(0.01)
        end
    """
    n = nginx(http=conf(pki, port, code), server=DUMP)
    assert handshake(port, "a.test")[0] == "default.test"
    d = dump(n)
    disabled = "API disabled in the context of ssl_client_hello_by_lua*"
    assert d["sleep"] == disabled and d["sock"].endswith(disabled)
    assert handshake(port, "wait.test")[0] == "failed"
    assert disabled in n.read_log()


def test_directive_contexts(nginx_conf):
    n = nginx_conf(server="""
        location /x { ssl_client_hello_by_lua_block { } }""")
    ok, out = n.test_config()
    assert not ok and "is not allowed here" in out


@pytest.mark.parametrize("module", BOTH)
def test_file_form(nginx, pki, module):
    port = free_port()
    http = conf(pki, port, "").replace(
        "ssl_client_hello_by_lua_block {  }",
        "ssl_client_hello_by_lua_file {prefix}/lua/hello.lua;")
    # the worker reads the file from the test's private directory
    nginx(module=module, http=http, main="user root;", files={"lua/hello.lua": r"""
        local ch = require "ngx.ssl.clienthello"
        if ch.get_client_hello_server_name() == "old.test" then
            assert(ch.set_protocols({"TLSv1.2"}))
        end
    """})
    assert handshake(port, "old.test") == ("default.test",
                                           "ok TLSv1.2 old.test\n")
