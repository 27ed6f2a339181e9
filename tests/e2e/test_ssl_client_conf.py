"""lua_ssl_crl and lua_ssl_conf_command: the cosockets' TLS client context,
differential against lua-nginx-module. The CA, a revoked server
certificate and its CRL are made by openssl at test time."""
import subprocess

import pytest

from harness import free_port
from test_cosocket import make_ca

BOTH = ["luaguard", "reference"]


def revoke(d):
    """Revokes srv.crt with the test CA and writes ca.crl."""
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(f"""
[ca]
default_ca = test
[test]
database = {d}/index.txt
crlnumber = {d}/crlnumber
default_md = sha256
default_crl_days = 2
""")

    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True,
                       capture_output=True)
    run("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.crt",
        "-revoke", "srv.crt")
    run("ca", "-config", "ca.cnf", "-keyfile", "ca.key", "-cert", "ca.crt",
        "-gencrl", "-out", "ca.crl")


FETCH = r"""
    local s = ngx.socket.tcp()
    assert(s:connect("127.0.0.1", %d))
    local sess, err = s:sslhandshake(nil, "tls.test", true)
    if not sess then ngx.say("handshake: ", err) return end
    s:send("GET / HTTP/1.0\r\nHost: tls.test\r\n\r\n")
    ngx.say((s:receive("*a")):match("proto [^\n]*"))
"""


def tls_server(d, port):
    return f"""
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {d}/srv.crt;
            ssl_certificate_key {d}/srv.key;
            ssl_protocols TLSv1.2 TLSv1.3;
            location / {{ return 200 "proto $ssl_protocol\\n"; }}
        }}"""


@pytest.mark.parametrize("module", BOTH)
def test_crl_refuses_a_revoked_peer(nginx, tmp_path, module):
    make_ca(tmp_path)
    revoke(tmp_path)
    port = free_port()
    n = nginx(module=module, http=tls_server(tmp_path, port), server=f"""
        lua_ssl_trusted_certificate {tmp_path}/ca.crt;
        lua_ssl_verify_depth 2;
        location /plain {{ content_by_lua_block {{ {FETCH % port} }} }}
        location /crl {{
            lua_ssl_crl {tmp_path}/ca.crl;
            content_by_lua_block {{ {FETCH % port} }}
        }}""")
    assert n.get("/plain").text.startswith("proto TLSv1.")
    assert n.get("/crl").text == "handshake: 23: certificate revoked\n"


@pytest.mark.parametrize("module", BOTH)
def test_conf_command_reaches_openssl(nginx, nginx_conf, tmp_path, module):
    make_ca(tmp_path)
    port = free_port()
    n = nginx(module=module, http=tls_server(tmp_path, port), server=f"""
        lua_ssl_trusted_certificate {tmp_path}/ca.crt;
        lua_ssl_verify_depth 2;
        lua_ssl_protocols TLSv1.2 TLSv1.3;
        location /default {{ content_by_lua_block {{ {FETCH % port} }} }}
        location /tls12 {{
            lua_ssl_conf_command MaxProtocol TLSv1.2;
            content_by_lua_block {{ {FETCH % port} }}
        }}""")
    assert n.get("/default").text == "proto TLSv1.3\n"
    assert n.get("/tls12").text == "proto TLSv1.2\n"
    bad = nginx_conf(module=module, server="""
        lua_ssl_conf_command NoSuchCommand on;
        location / { content_by_lua_block { } }""")
    ok, out = bad.test_config()
    if module == "luaguard":
        # luaguard builds the context while reading the configuration.
        assert not ok and "SSL_CONF_cmd" in out
