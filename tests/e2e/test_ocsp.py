"""ngx.ocsp: OCSP stapling from ssl_certificate_by_lua. The PKI (a CA, a
good and a revoked leaf with an OCSP URL in their AIA extension) is made
at test time; the responder is `openssl ocsp` run by the test for each
request it receives over plain HTTP on loopback (`openssl ocsp -port`
would listen on every interface). The Lua code finds the responder in the
certificate, fetches the response with a cosocket, validates it and
staples it; `openssl s_client -status` checks it from the client side.
Behaviour is compared with lua-nginx-module where both work."""
import base64
import re
import subprocess
import tempfile
import threading
from datetime import datetime, timezone

import pytest

from harness import TcpServer, free_port

BOTH = ["luaguard", "reference"]

# The responder's own loopback address, which a deny rule can name
# without touching anything else the test uses.
RESPONDER_HOST = "127.0.0.2"

# The time format of `openssl ocsp -index` (that of `openssl ca`).
INDEX_TIME = "%y%m%d%H%M%SZ"


class Responder(TcpServer):
    """HTTP POST of a DER OCSP request in, `openssl ocsp`'s DER response
    out (signed by the CA, answering from its index). `requests` counts
    the OCSP requests answered."""

    def __init__(self):
        super().__init__(host=RESPONDER_HOST)
        self.pki = None
        self.requests = 0
        self.lock = threading.Lock()

    def serve(self, conn):
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            want = int(m.group(1)) if m else 0
            while len(body) < want:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                body += chunk
            resp = self.answer(body[:want])
            conn.sendall(b"HTTP/1.1 200 OK\r\n"
                         b"Content-Type: application/ocsp-response\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                         % len(resp) + resp)

    def answer(self, req):
        d = self.pki
        with tempfile.TemporaryDirectory(dir=d) as t:
            with open(f"{t}/req.der", "wb") as f:
                f.write(req)
            subprocess.run(
                ["openssl", "ocsp", "-index", "index.txt", "-CA", "ca.crt",
                 "-rsigner", "ca.crt", "-rkey", "ca.key", "-reqin",
                 f"{t}/req.der", "-respout", f"{t}/resp.der"],
                cwd=d, check=True, capture_output=True)
            with open(f"{t}/resp.der", "rb") as f:
                resp = f.read()
        with self.lock:
            self.requests += 1
        return resp


@pytest.fixture(scope="module")
def responder():
    r = Responder()
    yield r
    r.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory, responder):
    """A CA; leaves good.test and revoked.test whose AIA names the
    responder, unknown.test (same) missing from the responder's index,
    noaia.test without an AIA; a self-signed rogue signer."""
    d = tmp_path_factory.mktemp("ocsp-pki")

    def run(*a):
        return subprocess.run(["openssl", *a], cwd=d, check=True,
                              capture_output=True, text=True).stdout

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
        "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test CA")
    url = f"http://{RESPONDER_HOST}:{responder.port}/ocsp"
    index = []
    for serial, name, aia, status in ((0x1001, "good.test", True, "V"),
                                      (0x1002, "revoked.test", True, "R"),
                                      (0x1003, "noaia.test", False, "V"),
                                      (0x1004, "unknown.test", True, None)):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        ext = f"subjectAltName=DNS:{name}\n"
        if aia:
            ext += f"authorityInfoAccess=OCSP;URI:{url}\n"
        (d / f"{name}.ext").write_text(ext)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey",
            "ca.key", "-set_serial", str(serial), "-out", f"{name}.crt",
            "-days", "2", "-extfile", f"{name}.ext")
        end = run("x509", "-in", f"{name}.crt", "-noout", "-enddate")
        expiry = datetime.strptime(end.split("=", 1)[1].strip(),
                                   "%b %d %H:%M:%S %Y GMT")
        revoked = (datetime.now(timezone.utc).strftime(INDEX_TIME)
                   if status == "R" else "")
        if status:
            index.append("\t".join([status, expiry.strftime(INDEX_TIME),
                                    revoked, f"{serial:X}", "unknown",
                                    f"/CN={name}"]) + "\n")
        # the leaf followed by its issuer, as servers send it
        (d / f"{name}.chain").write_text(
            (d / f"{name}.crt").read_text() + (d / "ca.crt").read_text())
    (d / "index.txt").write_text("".join(index))
    # a key the CA never authorized to sign OCSP responses
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
        "rogue.key", "-out", "rogue.crt", "-days", "2", "-subj", "/CN=rogue")
    responder.pki = d
    return d


def pem(pki, name):
    return (pki / name).read_text()


def offline_response(pki, name, signer="ca"):
    """The responder's DER answer for `name`'s chain, signed by `signer`
    (made without the HTTP front)."""
    with tempfile.TemporaryDirectory(dir=pki) as t:
        subprocess.run(["openssl", "ocsp", "-issuer", "ca.crt", "-cert",
                        f"{name}.crt", "-no_nonce", "-reqout", f"{t}/req.der"],
                       cwd=pki, check=True, capture_output=True)
        subprocess.run(["openssl", "ocsp", "-index", "index.txt", "-CA",
                        "ca.crt", "-rsigner", f"{signer}.crt", "-rkey",
                        f"{signer}.key", "-reqin", f"{t}/req.der",
                        "-respout", f"{t}/resp.der"],
                       cwd=pki, check=True, capture_output=True)
        with open(f"{t}/resp.der", "rb") as f:
            return f.read()


# The certificates as a Lua module (too long for an inline block) with
# the HTTP POST to the responder, done by hand over a cosocket.
PKI_LUA = r"""
local _M = { pem = {} }
%(pems)s
function _M.fetch(url, req)
    local host, port, path = url:match("^http://([^:/]+):(%%d+)(/.*)$")
    local s = ngx.socket.tcp()
    s:settimeout(10000)
    local ok, err = s:connect(host, tonumber(port))
    if not ok then return nil, err end
    assert(s:send("POST " .. path .. " HTTP/1.0\r\nHost: " .. host
                  .. "\r\nContent-Type: application/ocsp-request"
                  .. "\r\nContent-Length: " .. #req .. "\r\n\r\n" .. req))
    local len
    while true do
        local line = assert(s:receive("*l"))
        if line == "" then break end
        len = tonumber(line:match("^[Cc]ontent%%-[Ll]ength:%%s*(%%d+)")) or len
    end
    local body = assert(s:receive(len))
    s:close()
    return body
end
function _M.show(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
    return table.concat(t, " ")
end
return _M
"""


def pki_files(pki):
    names = ["ca.crt"] + [f"{n}.{ext}" for n in ("good.test", "revoked.test",
                                                 "unknown.test", "noaia.test")
                          for ext in ("chain", "crt", "key")]
    pems = "\n".join(f'_M.pem["{n}"] = [==[{pem(pki, n)}]==]' for n in names)
    return {"lua/ocsp_pki.lua": PKI_LUA % dict(pems=pems)}


def start(nginx, pki, module, http="", server="", **kw):
    return nginx(module=module, main="user root;", files=pki_files(pki),
                 http='lua_package_path "{prefix}/lua/?.lua;;";\n'
                      "lua_shared_dict d 1m;\n" + http,
                 server=server, **kw)


# ssl_certificate_by_lua: serve the SNI name's chain and staple what its
# responder says, recording each step in the shared dict under the name.
STAPLE = r"""
    local ssl = require "ngx.ssl"
    local ocsp = require "ngx.ocsp"
    local pki = require "ocsp_pki"
    local name = ssl.server_name()
    local chain_pem = pki.pem[name .. ".chain"]
    if not chain_pem then return end
    local log = {}
    local function step(...) log[#log + 1] = pki.show(...) end
    local chain = assert(ssl.cert_pem_to_der(chain_pem))
    assert(ssl.clear_certs())
    assert(ssl.set_der_cert(chain))
    assert(ssl.set_der_priv_key(assert(ssl.priv_key_pem_to_der(
        pki.pem[name .. ".key"]))))
    local function go()
        local url, err = ocsp.get_ocsp_responder_from_der_chain(chain)
        step("responder", url, err)
        if not url then return end
        local req, err = ocsp.create_ocsp_request(chain)
        step("request", req and #req, err)
        local resp, err = pki.fetch(url, req)
        step("fetch", resp and #resp, err)
        if not resp then return end
        local ok, err = ocsp.validate_ocsp_response(resp, chain)
        step("validate", ok, err)
        if not ok then return end
        step("set", ocsp.set_ocsp_status_resp(resp))
    end
    go()
    ngx.shared.d:set(name, table.concat(log, "\n"))
"""


def tls_server(port, pki, code, extra=""):
    return f"""
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki}/noaia.test.crt;
        ssl_certificate_key {pki}/noaia.test.key;
        {extra}
        ssl_certificate_by_lua_block {{ {code} }}
        location / {{ return 200 "ok\\n"; }}
    }}
"""


LOG = """location /log { content_by_lua_block {
    ngx.print(ngx.shared.d:get(ngx.var.arg_n)) } }"""


def content(code):
    return "location /t { content_by_lua_block { " + code + " } }"


def s_client(port, name, status=True):
    """openssl s_client's report of the handshake for `name`."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
            "-servername", name]
    if status:
        args.append("-status")
    r = subprocess.run(args, input=b"", capture_output=True, timeout=30)
    return r.stdout.decode(errors="replace")


@pytest.mark.asan_fast
@pytest.mark.parametrize("module", BOTH)
def test_stapled_response_reaches_the_client(nginx, pki, responder, module):
    port = free_port()
    n = start(nginx, pki, module, http=tls_server(port, pki, STAPLE),
              server=LOG)
    before = responder.requests
    out = s_client(port, "good.test")
    assert "OCSP Response Status: successful" in out, out
    assert "Cert Status: good" in out
    assert "Serial Number: 1001" in out
    assert "subject=CN = good.test" in out
    assert responder.requests == before + 1
    url = f"http://{RESPONDER_HOST}:{responder.port}/ocsp"
    assert n.get("/log?n=good.test").text == (
        f"responder {url} nil\nrequest 69 nil\n"
        f"fetch {len(offline_response(pki, 'good.test'))} nil\n"
        "validate true nil\nset true")

    # A client that asks for no status gets none; the call says so.
    out = s_client(port, "good.test", status=False)
    assert "OCSP response" not in out
    assert n.get("/log?n=good.test").text.endswith(
        "set true no status req")


@pytest.mark.parametrize("module", BOTH)
def test_revoked_and_unknown_leaves_fail_validation(nginx, pki, responder,
                                                    module):
    port = free_port()
    n = start(nginx, pki, module, http=tls_server(port, pki, STAPLE),
              server=LOG)
    for name, status in (("revoked.test", "revoked"),
                         ("unknown.test", "unknown")):
        out = s_client(port, name)
        assert "OCSP response: no response sent" in out, out
        assert f"subject=CN = {name}" in out
        assert n.get(f"/log?n={name}").text.splitlines()[-1] == (
            f'validate nil certificate status "{status}" in the OCSP '
            "response")
    # no AIA: no responder, nothing fetched, no error
    before = responder.requests
    s_client(port, "noaia.test")
    assert n.get("/log?n=noaia.test").text == "responder nil nil"
    assert responder.requests == before


# Every documented result shape away from the handshake ("context: any"):
# edge and garbage input, truncation, the error strings.
INPUTS = r"""
    local ssl = require "ngx.ssl"
    local ocsp = require "ngx.ocsp"
    local pki = require "ocsp_pki"
    local der = {}
    for _, n in ipairs({"good.test.chain", "revoked.test.chain",
                        "noaia.test.chain", "good.test.crt", "ca.crt"}) do
        der[n] = assert(ssl.cert_pem_to_der(pki.pem[n]))
    end
    local good, rev = der["good.test.chain"], der["revoked.test.chain"]
    local leaf = der["good.test.crt"]
    local out = {}
    local function try(label, f, ...)
        out[#out + 1] = label .. ": " .. pki.show(f(...))
    end
    local R = ocsp.get_ocsp_responder_from_der_chain
    try("url", R, good)
    try("url max 5", R, good, 5)
    try("url max 0", R, good, 0)
    try("url leaf only", R, leaf)
    try("url no aia", R, der["noaia.test.chain"])
    try("url ca only", R, der["ca.crt"])
    try("url garbage", R, "garbage")
    try("url empty", R, "")
    try("url trailing bytes", R, good .. "xx")
    try("url leaf + garbage", R, leaf .. "garbage")
    local Q = ocsp.create_ocsp_request
    local req = assert(Q(good))
    out[#out + 1] = "request: " .. ngx.encode_base64(req)
    try("req max 10", Q, good, 10)
    try("req max 0", Q, good, 0)
    try("req leaf only", Q, leaf)
    try("req ca only", Q, der["ca.crt"])
    try("req garbage", Q, "garbage")
    try("req empty", Q, "")
    try("req trailing bytes", function() return #Q(good .. "xx") end)
    local V = ocsp.validate_ocsp_response
    local url = R(good)
    local resp = assert(pki.fetch(url, req))
    local rresp = assert(pki.fetch(url, assert(Q(rev))))
    try("val", V, resp, good)
    try("val max 0", V, resp, good, 0)
    try("val revoked", V, rresp, rev)
    try("val revoked max 10", V, rresp, rev, 10)
    try("val revoked max 0", V, rresp, rev, 0)
    try("val other leaf", V, resp, rev)
    try("val other leaf max 5", V, resp, rev, 5)
    try("val leaf only", V, resp, leaf)
    try("val garbage", V, "garbage", good)
    try("val empty", V, "", good)
    try("val truncated", V, resp:sub(1, 100), good)
    try("val chain garbage", V, resp, "garbage")
    try("val swapped", V, good, resp)
    try("val malformedrequest", V, "\48\3\10\1\1", good)
    try("val trylater", V, "\48\3\10\1\3", good)
    try("val unauthorized", V, "\48\3\10\1\6", good)
    for _, f in ipairs({R, Q}) do
        out[#out + 1] = "nil raises: " .. tostring(not pcall(f, nil))
    end
    out[#out + 1] = "nil raises: " .. tostring(not pcall(V, nil, good))
    out[#out + 1] = "nil raises: " .. tostring(not pcall(V, resp, nil))
    out[#out + 1] = "nil raises: "
                    .. tostring(not pcall(ocsp.set_ocsp_status_resp, nil))
    -- not in a handshake, no TLS connection
    try("set", ocsp.set_ocsp_status_resp, resp)
    out[#out + 1] = "version: " .. ocsp.version
    ngx.say(table.concat(out, "\n"))
"""


def test_results_and_errors_match(nginx, pki, responder):
    got = {}
    for module in BOTH:
        n = start(nginx, pki, module, server=content(INPUTS))
        r = n.get("/t")
        assert r.status == 200, n.read_log()
        got[module] = r.text
    assert got["luaguard"] == got["reference"]
    url = f"http://{RESPONDER_HOST}:{responder.port}/ocsp"
    lines = dict(line.split(": ", 1) for line in got["luaguard"].splitlines()
                 if not line.startswith("nil raises"))
    assert lines["url"] == url
    assert lines["url max 5"] == "http: truncated"
    assert lines["url leaf only"] == "nil no issuer certificate in chain"
    assert lines["url no aia"] == "nil"
    assert lines["url garbage"] == "nil d2i_X509_bio() failed"
    assert lines["req max 10"] == "nil output buffer too small: 69 > 10"
    assert lines["val"] == "true"
    assert lines["val revoked"] == (
        'nil certificate status "revoked" in the OCSP response')
    assert lines["val revoked max 10"] == "nil certificat"
    assert lines["val other leaf"] == (
        "nil certificate status not found in the OCSP response")
    assert lines["val garbage"] == "nil d2i_OCSP_RESPONSE() failed"
    assert lines["val trylater"] == (
        "nil OCSP response not successful (3: trylater)")
    assert lines["set"] == "nil bad request"
    assert got["luaguard"].count("nil raises: true") == 5
    # The request is the leaf's CertID (SHA-1), without a nonce.
    der = base64.b64decode(lines["request"])
    text = subprocess.run(["openssl", "ocsp", "-reqin", "/dev/stdin",
                           "-req_text"], input=der, capture_output=True,
                          check=True).stdout.decode()
    assert "Serial Number: 1001" in text and "Nonce" not in text


@pytest.mark.parametrize("module", BOTH)
def test_set_status_resp_outside_a_handshake(nginx, pki, module):
    n = start(nginx, pki, module, server="""
        location /t { content_by_lua_block {
            local ocsp = require "ngx.ocsp"
            local function show(...)
                return select("#", ...) .. " " .. tostring(select(1, ...))
                       .. " " .. tostring(select(2, ...))
            end
            ngx.say("request: ", show(ocsp.set_ocsp_status_resp("x")))
            local sema = require("ngx.semaphore").new()
            local from_timer
            ngx.timer.at(0, function()
                from_timer = show(ocsp.set_ocsp_status_resp("x"))
                sema:post()
            end)
            assert(sema:wait(10))
            ngx.say("timer: ", from_timer)
        } }""")
    assert n.get("/t").text == ("request: 2 nil bad request\n"
                                "timer: 2 nil bad request\n")


# ---- luaguard's own ----

def test_response_from_a_signer_the_issuer_never_named_is_refused(
        nginx, pki):
    # A response saying "good", signed by a key the CA never certified:
    # the reference accepts it (it checks the signature against the
    # certificate the response carries); luaguard wants the issuer or a
    # responder the issuer delegated to.
    rogue = offline_response(pki, "good.test", signer="rogue")
    genuine = offline_response(pki, "good.test")
    code = r"""
        local ssl = require "ngx.ssl"
        local ocsp = require "ngx.ocsp"
        local pki = require "ocsp_pki"
        local chain = ssl.cert_pem_to_der(pki.pem["good.test.chain"])
        ngx.say("rogue: ", pki.show(ocsp.validate_ocsp_response(
            ngx.decode_base64("%s"), chain)))
        ngx.say("genuine: ", pki.show(ocsp.validate_ocsp_response(
            ngx.decode_base64("%s"), chain)))
    """ % tuple(base64.b64encode(x).decode()
                for x in (rogue, genuine))
    got = {}
    for module in BOTH:
        n = start(nginx, pki, module, server=content(code))
        got[module] = n.get("/t").text
    assert got["luaguard"] == (
        "rogue: nil OCSP_basic_verify() failed\ngenuine: true\n")
    assert got["reference"] == "rogue: true\ngenuine: true\n"


def test_egress_policy_covers_the_responder_fetch(nginx, pki, responder):
    port = free_port()
    n = start(nginx, pki, "luaguard", http=tls_server(
        port, pki, STAPLE, extra=f"lua_egress deny {RESPONDER_HOST};"),
        server=LOG)
    before = responder.requests
    out = s_client(port, "good.test")
    assert "OCSP response: no response sent" in out, out
    assert "subject=CN = good.test" in out
    log = n.get("/log?n=good.test").text
    assert log.splitlines()[-1] == (
        "fetch nil destination not allowed by policy"), log
    assert responder.requests == before
    n.wait_log(r"refused by the egress policy \(lua_egress deny "
               + re.escape(RESPONDER_HOST) + r"\)")


@pytest.mark.parametrize("module", BOTH)
def test_nginx_stapling_still_answers_when_lua_sets_none(nginx, pki,
                                                         responder, module):
    # With ssl_stapling, nginx's own staple goes out for a handshake whose
    # Lua code staples nothing; Lua's goes out where it set one.
    staple = pki / "nginx-staple.der"
    staple.write_bytes(offline_response(pki, "revoked.test"))
    port = free_port()
    n = start(nginx, pki, module, http=tls_server(
        port, pki, STAPLE,
        extra=f"ssl_stapling on; ssl_stapling_file {staple};"),
        server=LOG)
    out = s_client(port, "plain.test")
    assert "Cert Status: revoked" in out and "Serial Number: 1002" in out
    out = s_client(port, "good.test")
    assert "Cert Status: good" in out and "Serial Number: 1001" in out
