"""tcpsock:setclientcert against an nginx TLS server that requires a
client certificate from a test CA (made by openssl in the test): the
certificate and key as PEM strings (luaguard's extension) or as the
objects of ngx.ssl.parse_pem_cert/parse_pem_priv_key."""

import subprocess

import pytest

from harness import free_port
from test_cosocket import make_ca


def make_client(d):
    def run(*a):
        subprocess.run(["openssl", *a], cwd=d, check=True,
                       capture_output=True)
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "cli.key",
        "-out", "cli.csr", "-subj", "/CN=luaguard client")
    run("x509", "-req", "-in", "cli.csr", "-CA", "ca.crt", "-CAkey",
        "ca.key", "-CAcreateserial", "-out", "cli.crt", "-days", "2")


@pytest.mark.asan_fast
def test_setclientcert(nginx, tmp_path):
    make_ca(tmp_path)
    make_client(tmp_path)
    tls = free_port()
    http = r"""
        server {
            listen 127.0.0.1:%d ssl;
            ssl_certificate %s/srv.crt;
            ssl_certificate_key %s/srv.key;
            ssl_client_certificate %s/ca.crt;
            ssl_verify_client on;
            location / { return 200 "hello $ssl_client_s_dn\n"; }
        }""" % (tls, tmp_path, tmp_path, tmp_path)
    code = r"""
        local cert = [==[%s]==]
        local key = [==[%s]==]
        local function fetch(c, k, clear)
            local s = ngx.socket.tcp()
            assert(s:connect("127.0.0.1", %d))
            if c then assert(s:setclientcert(c, k)) end
            if clear then assert(s:setclientcert(nil, nil)) end
            local sess, err = s:sslhandshake(false, "tls.test", true)
            if sess == nil then s:close() return "handshake: " .. err end
            s:send("GET / HTTP/1.0\r\nHost: tls.test\r\n\r\n")
            local status = s:receive("*l")
            local body = s:receive("*a")
            s:close()
            return status .. " " .. (body:match("hello [^\n]*")
                or body:match("No required SSL certificate was sent")
                or "?")
        end
        ngx.say(fetch(cert, key))
        ngx.say(fetch(nil))
        ngx.say(fetch(cert, key, true))
        local s = ngx.socket.tcp()
        ngx.say(s:setclientcert("junk", key))
        ngx.say(s:setclientcert(cert, "junk"))
        ngx.say(pcall(s.setclientcert, s, cert, nil))
        ngx.say(pcall(s.setclientcert, s, {}, key))
        local ssl = require "ngx.ssl"
        ngx.say(fetch(ssl.parse_pem_cert(cert), ssl.parse_pem_priv_key(key)))
    """ % ((tmp_path / "cli.crt").read_text(),
           (tmp_path / "cli.key").read_text(), tls)
    n = nginx(http=http, server=r"""
        lua_ssl_trusted_certificate %s/ca.crt;
        location /t { content_by_lua_block {%s} }""" % (tmp_path, code))
    lines = n.get("/t").text.splitlines()
    assert lines[0] == "HTTP/1.1 200 OK hello CN=luaguard client"
    # Without the certificate the server refuses the request.
    assert lines[1] == ("HTTP/1.1 400 Bad Request "
                        "No required SSL certificate was sent")
    assert lines[2] == lines[1]
    assert lines[3] == "nilPEM_read_bio_X509_AUX() failed"
    assert lines[4] == "nilPEM_read_bio_PrivateKey() failed"
    assert lines[5] == ("falseclient certificate must be supplied with "
                        "corresponding private key")
    assert lines[6].startswith("falsebad cert arg: PEM string or ngx.ssl "
                               "certificate expected")
    assert lines[7] == lines[0]
