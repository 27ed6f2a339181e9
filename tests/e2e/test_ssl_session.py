"""ssl_session_fetch_by_lua / ssl_session_store_by_lua and ngx.ssl.session:
Lua is the TLS session cache (here a lua_shared_dict), and the client sees
its handshakes resumed. Neither phase may yield on Debian's OpenSSL 3 (the
reference logs "cannot yield in sess get cb" and gives up the session);
luaguard raises the API-disabled error in both instead. Certificates come
from test_ssl_cert's pki fixture; clients are Python's ssl module with
session tickets off."""
import re
import socket
import ssl

import pytest

from harness import free_port
from test_ssl_cert import pki  # noqa: F401  (fixture)

BOTH = ["luaguard", "reference"]
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3

DUMP = """location /d { content_by_lua_block {
    local keys = ngx.shared.d:get_keys()
    table.sort(keys)
    for _, k in ipairs(keys) do ngx.say(k, "=", ngx.shared.d:get(k)) end
} }"""


def conf(pki, port, fetch="", store="", extra=""):
    return f"""
    lua_shared_dict sess 1m;
    lua_shared_dict d 1m;
    {"ssl_session_fetch_by_lua_block { " + fetch + " }" if fetch else ""}
    {"ssl_session_store_by_lua_block { " + store + " }" if store else ""}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/default.test.crt;
        ssl_certificate_key {pki}/default.test.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        {extra}
        location / {{ return 200 "ok $ssl_session_reused\\n"; }}
    }}
"""


class Client:
    """One client context (sessions belong to it), a fixed version."""

    def __init__(self, version):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        self.ctx.minimum_version = self.ctx.maximum_version = version
        self.ctx.options |= ssl.OP_NO_TICKET

    def get(self, port, session=None):
        """(session, reused on the client, body) or ("failed", error)."""
        try:
            with socket.create_connection(("127.0.0.1", port),
                                          timeout=10) as s:
                with self.ctx.wrap_socket(s, server_hostname="a.test",
                                          session=session) as t:
                    t.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    body = b""
                    while chunk := t.recv(4096):
                        body += chunk
                    return (t.session, t.session_reused,
                            body.split(b"\r\n\r\n", 1)[1].decode())
        except (ssl.SSLError, ConnectionError) as e:
            return "failed", type(e).__name__


FETCH = r"""
    local s = require "ngx.ssl.session"
    local id = assert(s.get_session_id())
    ngx.shared.d:incr("fetch", 1, 0)
    ngx.shared.d:set("fetch_id", id)
    local data = ngx.shared.sess:get(id)
    if data then
        ngx.shared.d:set("set", tostring(s.set_serialized_session(data)))
    end
"""
STORE = r"""
    local s = require "ngx.ssl.session"
    local id = assert(s.get_session_id())
    local data = assert(s.get_serialized_session())
    ngx.shared.sess:set(id, data)
    ngx.shared.d:incr("store", 1, 0)
    ngx.shared.d:set("store_id", id)
    ngx.shared.d:set("phase", ngx.get_phase())
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("module,version", [
    ("luaguard", TLS12), ("reference", TLS12), ("luaguard", TLS13)])
def test_sessions_resumed_from_a_shared_dict(nginx, pki, module, version):
    port = free_port()
    n = nginx(module=module, http=conf(pki, port, FETCH, STORE), server=DUMP)
    c = Client(version)
    sess, reused, body = c.get(port)
    assert (reused, body) == (False, "ok .\n")
    sess2, reused, body = c.get(port, sess)
    assert (reused, body) == (True, "ok r\n")
    d = dict(line.split("=", 1) for line in n.get("/d").text.split())
    assert d["fetch"] == "1" and d["set"] == "true"
    assert d["phase"] == "ssl_session_store"
    assert re.fullmatch(r"[0-9a-f]{64}", d["store_id"])
    if version == TLS12:
        assert d["store"] == "1"
        assert d["fetch_id"] == d["store_id"] == sess.id.hex()
    else:
        # A ticket per session OpenSSL makes: two after the full
        # handshake, one after the resumed one.
        assert int(d["store"]) >= 2
        assert re.fullmatch(r"[0-9a-f]{64}", d["fetch_id"])


@pytest.mark.parametrize("module", BOTH)
def test_unknown_or_bad_sessions_mean_a_full_handshake(nginx, pki, module):
    port = free_port()
    fetch = r"""
        local s = require "ngx.ssl.session"
        ngx.shared.d:set("bad", table.concat({tostring(
            s.set_serialized_session("not a session"))}, " "))
    """
    n = nginx(module=module, http=conf(pki, port, fetch, STORE), server=DUMP)
    c = Client(TLS12)
    sess, reused, _ = c.get(port)
    _, reused, body = c.get(port, sess)
    assert (reused, body) == (False, "ok .\n")
    d = dict(line.split("=", 1) for line in n.get("/d").text.split())
    assert d["store"] == "2"


def test_tls13_reference_never_calls_the_code(nginx, pki):
    # The difference luaguard makes (docs/compatibility.md): with tickets
    # off, OpenSSL 3 gives TLS 1.3 clients stateful tickets that name a
    # session of the server's cache; luaguard's store and fetch code see
    # them (test_sessions_resumed_from_a_shared_dict), the reference's
    # never runs and every TLS 1.3 handshake is a full one.
    port = free_port()
    n = nginx(module="reference", http=conf(pki, port, FETCH, STORE),
              server=DUMP)
    c = Client(TLS13)
    sess, reused, body = c.get(port)
    _, reused, body = c.get(port, sess)
    assert (reused, body) == (False, "ok .\n")
    assert n.get("/d").text == ""


def test_store_may_not_yield_but_a_timer_may(nginx, pki):
    # As documented: cosockets and ngx.sleep are disabled in the store
    # phase, ngx.timer.at is the way out; the timer finds no handshake
    # behind the session API.
    port = free_port()
    store = r"""
        local s = require "ngx.ssl.session"
        local d = ngx.shared.d
        d:set("sleep", select(2, pcall(ngx.sleep, 0.01)))
        d:set("sock", select(2, pcall(function()
            return ngx.socket.tcp():connect("127.0.0.1", 1) end)))
        local id = s.get_session_id()
        assert(ngx.timer.at(0, function()
            d:set("timer_id", id)
            d:set("timer_call", select(2, pcall(s.get_session_id)))
            d:set("timer_ser", select(2, pcall(s.get_serialized_session)))
            ngx.log(ngx.NOTICE, "the timer ran")
        end))
    """
    n = nginx(http=conf(pki, port, store=store), server=DUMP)
    c = Client(TLS12)
    sess, _, _ = c.get(port)
    n.wait_log("the timer ran")
    d = dict(line.split("=", 1) for line in n.get("/d").text.splitlines())
    assert d["sleep"] == ("API disabled in the context of "
                          "ssl_session_store_by_lua*")
    assert d["sock"].endswith("API disabled in the context of "
                              "ssl_session_store_by_lua*")
    assert d["timer_id"] == sess.id.hex()
    assert d["timer_call"] == "API disabled in the context of ngx.timer"
    assert d["timer_ser"] == "API disabled in the context of ngx.timer"


def test_fetch_may_not_yield(nginx, pki):
    # Stock OpenSSL cannot suspend the session lookup: the waiting APIs
    # raise at once (the reference logs a [crit] and drops the session).
    port = free_port()
    fetch = r"""
        local d = ngx.shared.d
        d:set("sleep", select(2, pcall(ngx.sleep, 0.01)))
        ngx.sleep(0)
    """
    n = nginx(http=conf(pki, port, fetch, STORE), server=DUMP)
    c = Client(TLS12)
    sess, _, _ = c.get(port)
    _, reused, body = c.get(port, sess)
    assert (reused, body) == (False, "ok .\n")
    d = dict(line.split("=", 1) for line in n.get("/d").text.splitlines())
    assert d["sleep"] == ("API disabled in the context of "
                          "ssl_session_fetch_by_lua*")
    assert "failed to run ssl_session_fetch_by_lua*" in n.read_log()


def test_directive_contexts(nginx_conf):
    for d in ("ssl_session_fetch_by_lua_block", "ssl_session_store_by_lua_block"):
        n = nginx_conf(server=f"{d} {{ }}")
        ok, out = n.test_config()
        assert not ok and "is not allowed here" in out


@pytest.mark.parametrize("module", BOTH)
def test_file_forms(nginx, pki, module):
    port = free_port()
    http = conf(pki, port).replace(
        "lua_shared_dict d 1m;",
        """lua_shared_dict d 1m;
        ssl_session_fetch_by_lua_file {prefix}/lua/fetch.lua;
        ssl_session_store_by_lua_file {prefix}/lua/store.lua;""")
    # the worker reads the file from the test's private directory
    nginx(module=module, http=http, main="user root;",
          files={"lua/fetch.lua": FETCH, "lua/store.lua": STORE})
    c = Client(TLS12)
    sess, _, _ = c.get(port)
    _, reused, body = c.get(port, sess)
    assert (reused, body) == (True, "ok r\n")
