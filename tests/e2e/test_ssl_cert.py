"""ssl_certificate_by_lua and ngx.ssl: Lua chooses the certificate of each
TLS handshake, may wait (ngx.sleep, cosockets) while the handshake is
suspended, and is stopped by the budgets like any phase. Certificates are
made at test time by openssl; clients are Python's ssl module. Behaviour
is compared with lua-nginx-module where it must match."""
import socket
import ssl
import subprocess

import pytest

from harness import TcpServer, free_port

BOTH = ["luaguard", "reference"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a default certificate and one per SNI name, as PEM text."""
    d = tmp_path_factory.mktemp("pki")

    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True,
                       capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
        "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA")
    for name in ("default.test", "a.test", "b.test"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(f"subjectAltName=DNS:{name}\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
            "ca.key", "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
            "-extfile", f"{name}.ext")
    # a.test's key under a passphrase
    run("pkey", "-in", "a.test.key", "-aes256", "-passout", "pass:secret",
        "-out", "a.test.enc.key")
    return d


def pem(pki, name):
    return (pki / name).read_text()


def server(pki, port, code, extra=""):
    return f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/default.test.crt;
        ssl_certificate_key {pki}/default.test.key;
        {extra}
        ssl_certificate_by_lua_block {{
            {code}
        }}
        location / {{ return 200 "ok $ssl_server_name\\n"; }}
    }}
"""


def handshake(port, name, ca=None):
    """The subject CN the server presented for `name`, or the error."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    if ca:
        ctx.load_verify_locations(ca)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname=name) as t:
                der = t.getpeercert(binary_form=True)
                t.sendall(b"GET / HTTP/1.0\r\n\r\n")
                body = b""
                while chunk := t.recv(4096):
                    body += chunk
        out = subprocess.run(["openssl", "x509", "-inform", "der", "-noout",
                              "-subject", "-nameopt", "multiline"],
                             input=der, capture_output=True).stdout.decode()
        cn = out.split("commonName")[1].split("=")[1].strip()
        return cn, body.split(b"\r\n\r\n", 1)[1].decode()
    except (ssl.SSLError, ConnectionError) as e:
        return "failed", type(e).__name__


# The choice by SNI, through each of the documented paths.
CHOOSE = r"""
    local ssl = require "ngx.ssl"
    local certs = {
        ["a.test"] = { [==[%(a_crt)s]==], [==[%(a_key)s]==] },
        ["b.test"] = { [==[%(b_crt)s]==], [==[%(b_key)s]==] },
    }
    local name = ssl.server_name()
    local pair = certs[name]
    if not pair then return end
    ngx.sleep(0.001)   -- the handshake waits for the code
    assert(ssl.clear_certs())
    if name == "a.test" then
        -- DER path
        assert(ssl.set_der_cert(assert(ssl.cert_pem_to_der(pair[1]))))
        assert(ssl.set_der_priv_key(assert(ssl.priv_key_pem_to_der(pair[2],
                                                                   "secret"))))
    else
        -- parsed objects
        assert(ssl.set_cert(assert(ssl.parse_pem_cert(pair[1]))))
        assert(ssl.set_priv_key(assert(ssl.parse_pem_priv_key(pair[2]))))
    end
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", BOTH)
def test_certificate_chosen_by_sni(nginx, pki, module):
    port = free_port()
    code = CHOOSE % dict(a_crt=pem(pki, "a.test.crt"),
                         a_key=pem(pki, "a.test.enc.key"),
                         b_crt=pem(pki, "b.test.crt"),
                         b_key=pem(pki, "b.test.key"))
    nginx(module=module, http=server(pki, port, code))
    ca = str(pki / "ca.crt")
    assert handshake(port, "a.test", ca) == ("a.test", "ok a.test\n")
    assert handshake(port, "b.test", ca) == ("b.test", "ok b.test\n")
    assert handshake(port, "other.test", ca) == (
        "default.test", "ok other.test\n")


class NameServer(TcpServer):
    """Answers each connection with the certificate name to use."""

    def serve(self, conn):
        conn.recv(100)
        conn.sendall(b"a.test\n")
        conn.close()


@pytest.mark.parametrize("module", BOTH)
def test_cosocket_in_the_handshake(nginx, pki, module):
    names = NameServer()
    try:
        port = free_port()
        code = r"""
            local ssl = require "ngx.ssl"
            local s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", %d))
            assert(s:send("which?\n"))
            local name = assert(s:receive("*l"))
            s:close()
            assert(ssl.clear_certs())
            assert(ssl.set_der_cert(assert(ssl.cert_pem_to_der([==[%s]==]))))
            assert(ssl.set_der_priv_key(assert(
                ssl.priv_key_pem_to_der([==[%s]==]))))
        """ % (names.port, pem(pki, "a.test.crt"), pem(pki, "a.test.key"))
        nginx(module=module, http=server(pki, port, code))
        assert handshake(port, "x.test") == ("a.test", "ok x.test\n")
        assert names.accepted == 1
    finally:
        names.close()


def test_connection_facts_match(nginx, pki):
    code = r"""
        local ssl = require "ngx.ssl"
        local addr, kind = ssl.raw_client_addr()
        local saddr, skind = ssl.raw_server_addr()
        ngx.shared.d:set("facts", table.concat({
            ngx.get_phase(), tostring(ssl.server_name()),
            tostring(ssl.server_port() > 0),
            addr == "\127\0\0\1" and "127.0.0.1" or "?", kind,
            saddr == "\127\0\0\1" and "127.0.0.1" or "?", skind,
            tostring(ssl.get_tls1_version() == ssl.TLS1_2_VERSION
                     or ssl.get_tls1_version() == ssl.TLS1_3_VERSION),
            tostring(ssl.get_tls1_version_str()):sub(1, 4),
            select(2, pcall(ngx.say, "x")),
            select(2, pcall(function() return ngx.var.host end)),
            select(2, pcall(ngx.req.get_headers)),
            tostring(ssl.TLS1_2_VERSION), tostring(ssl.SSL3_VERSION),
        }, "|"))
    """

    def run(module):
        port = free_port()
        n = nginx(module=module, http="lua_shared_dict d 1m;\n"
                  + server(pki, port, code), server="""
            location /facts { content_by_lua_block {
                ngx.say(ngx.shared.d:get("facts")) } }""")
        assert handshake(port, "facts.test")[0] == "default.test"
        return n.get("/facts").text

    got = {m: run(m) for m in BOTH}
    strip = [__import__("re").sub(r"[^ |]*:\d+: ", "", got[m]) for m in BOTH]
    assert strip[0] == strip[1]
    assert strip[0].startswith("ssl_cert|facts.test|true|127.0.0.1|inet|")


@pytest.mark.parametrize("module", BOTH)
def test_errors_and_exit_decide_the_handshake(nginx, pki, module):
    port = free_port()
    code = r"""
        local ssl = require "ngx.ssl"
        local name = ssl.server_name()
        if name == "error.test" then error("boom") end
        if name == "exit.test" then return ngx.exit(ngx.ERROR) end
        if name == "ok.test" then return ngx.exit(ngx.OK) end
    """
    n = nginx(module=module, http=server(pki, port, code))
    assert handshake(port, "error.test")[0] == "failed"
    assert "boom" in n.read_log()
    assert handshake(port, "exit.test")[0] == "failed"
    assert handshake(port, "ok.test") == ("default.test", "ok ok.test\n")
    assert handshake(port, "plain.test") == ("default.test", "ok plain.test\n")


def test_bad_input_reports_without_key_material(nginx, pki):
    port = free_port()
    key = pem(pki, "a.test.key")
    body = key.splitlines()[1]   # a line of the base64 body
    code = r"""
        local ssl = require "ngx.ssl"
        local key = [==[%s]==]
        local broken = key:gsub("MII", "XYZ")
        local out = {}
        local function try(f, ...)
            local ok, a, b = pcall(f, ...)
            out[#out + 1] = tostring(ok) .. " " .. tostring(a) .. " "
                            .. tostring(b)
        end
        try(ssl.priv_key_pem_to_der, broken)
        try(ssl.parse_pem_priv_key, broken)
        try(ssl.parse_pem_priv_key, key:gsub("PRIVATE", "PUBLIC"))
        try(ssl.set_der_priv_key, broken)
        try(ssl.cert_pem_to_der, broken)
        try(ssl.set_der_cert, broken)
        ngx.shared.d:set("out", table.concat(out, "\n"))
    """ % key
    n = nginx(http="lua_shared_dict d 1m;\n" + server(pki, port, code),
              server="""location /out { content_by_lua_block {
                            ngx.say(ngx.shared.d:get("out")) } }""")
    assert handshake(port, "x.test")[0] == "default.test"
    out = n.get("/out").text
    assert body not in out and body[:16] not in out
    assert all(line.startswith("true nil ") for line in out.splitlines()), out
    assert body[:16] not in n.read_log()


# ---- luaguard's hardening ----

@pytest.mark.asan_fast
def test_runaway_handshake_code_is_stopped_not_the_worker(nginx, pki):
    port = free_port()
    code = r"""
        if require("ngx.ssl").server_name() == "spin.test" then
            while true do end
        end
    """
    n = nginx(http="lua_budget_slice 100ms;\n" + server(pki, port, code))
    before = n.worker_pids()
    assert handshake(port, "spin.test")[0] == "failed"
    assert "lua_budget_slice exceeded" in n.read_log()
    assert handshake(port, "ok.test") == ("default.test", "ok ok.test\n")
    assert n.worker_pids() == before


@pytest.mark.asan_fast
def test_client_gone_while_the_code_waits(nginx, pki):
    # The handshake times out while the code sleeps: the connection is
    # closed and the code's fake request ends with it; the worker goes
    # on serving.
    port = free_port()
    code = r"""
        local ssl = require "ngx.ssl"
        if ssl.server_name() == "slow.test" then
            ngx.sleep(30)
            ngx.log(ngx.ERR, "woke after the connection closed")
        end
    """
    n = nginx(http=server(pki, port, code, extra="client_header_timeout 1s;"))
    assert handshake(port, "slow.test")[0] == "failed"
    assert handshake(port, "ok.test") == ("default.test", "ok ok.test\n")
    n.wait_log("client timed out|timed out", timeout=10)
    assert "woke after the connection closed" not in n.read_log()


def test_directive_contexts(nginx_conf):
    n = nginx_conf(server="""
        location /x { ssl_certificate_by_lua_block { } }""")
    ok, out = n.test_config()
    assert not ok and "is not allowed here" in out
