"""Issue 19, items 18 and 20: `satisfy any` with access_by_lua, the core
codes given to ngx.exit, ngx.exit in header_filter_by_lua, and
ngx.redirect with CR/LF, run on Debian's lua-nginx-module
(`module="reference"`) and on luaguard and compared."""

import re

import pytest

MODULES = ["luaguard", "reference"]


def both(nginx, **kw):
    return {m: nginx(module=m, **kw) for m in MODULES}


def answer(n, path, **kw):
    """(status, body) of a request, or "closed" when nginx closed the
    connection without a response."""
    try:
        r = n.get(path, **kw)
    except (ConnectionError, OSError):
        return "closed"
    return r.status, r.text


def errors(log):
    """The [error] messages of a log, without time, pid and line numbers."""
    out = []
    for m in re.finditer(r"\[error\] \d+#\d+: (?:\*\d+ )?([^\n]*)", log):
        text = re.sub(r", client: .*", "", m.group(1))
        out.append(re.sub(r"nginx\.conf:\d+", "nginx.conf:N", text))
    return out


# ---- 18. satisfy any ----

SATISFY_CODES = {
    "none": "",
    "ok": "ngx.exit(ngx.OK)",
    "forbidden": "ngx.exit(ngx.HTTP_FORBIDDEN)",
    "unauthorized": "ngx.exit(ngx.HTTP_UNAUTHORIZED)",
    "http_ok": "ngx.exit(ngx.HTTP_OK)",
    "error": "ngx.exit(ngx.ERROR)",
    "declined": "ngx.exit(ngx.DECLINED)",
    "say": "ngx.say('from access') ngx.exit(ngx.HTTP_OK)",
    "teapot": "ngx.exit(418)",
    "throw": "error('boom')",
    "sleep": "ngx.sleep(0.001)",
    "sleep_forbidden": "ngx.sleep(0.001) ngx.exit(ngx.HTTP_FORBIDDEN)",
    "sleep_declined": "ngx.sleep(0.001) ngx.exit(ngx.DECLINED)",
}


def satisfy_server():
    out = []
    for rule in ("allow", "deny"):
        for name, code in SATISFY_CODES.items():
            out.append(f"""
        location /{rule}/{name} {{
            satisfy any;
            {rule} all;
            access_by_lua_block {{ {code} }}
            content_by_lua_block {{ ngx.say("content") }}
        }}""")
    return "\n".join(out)


def test_satisfy_any(nginx):
    got = {}
    for m, n in both(nginx, server=satisfy_server()).items():
        got[m] = {f"/{rule}/{name}": answer(n, f"/{rule}/{name}")
                  for rule in ("allow", "deny") for name in SATISFY_CODES}
    assert got["luaguard"] == got["reference"], got


# ---- 18. ngx.exit(ngx.AGAIN), ngx.exit(ngx.DONE) ----

def core_exit_server():
    out = []
    for phase in ("rewrite", "access", "content"):
        for name in ("AGAIN", "DONE"):
            for said in ("", "ngx.say('before') "):
                tag = "said" if said else "quiet"
                tail = ("" if phase == "content" else
                        'content_by_lua_block { ngx.say("content") }')
                out.append(f"""
        location /{phase}/{name}/{tag} {{
            {phase}_by_lua_block {{
                {said}ngx.exit(ngx.{name})
                ngx.say("after exit")
            }}
            {tail}
        }}""")
    return "\n".join(out)


def test_exit_again_done(nginx):
    got = {}
    for m, n in both(nginx, server=core_exit_server()).items():
        got[m] = {path: answer(n, path, timeout=3)
                  for phase in ("rewrite", "access", "content")
                  for name in ("AGAIN", "DONE")
                  for tag in ("quiet", "said")
                  for path in [f"/{phase}/{name}/{tag}"]}
        got[m]["log"] = errors(n.read_log())
    assert got["luaguard"] == got["reference"], got


# ---- 18. ngx.exit in header_filter_by_lua ----

HF_CODES = ["ngx.HTTP_FORBIDDEN", "ngx.HTTP_OK", "ngx.ERROR", "302", "ngx.OK",
            "ngx.HTTP_NO_CONTENT", "ngx.HTTP_CREATED", "201",
            "ngx.HTTP_INTERNAL_SERVER_ERROR"]


def header_filter_server():
    out = []
    for i, code in enumerate(HF_CODES):
        for src in ("lua", "static"):
            content = ('content_by_lua_block { ngx.say("content") }'
                       if src == "lua" else "")
            out.append(f"""
        location /{src}/{i} {{
            {content}
            header_filter_by_lua_block {{
                ngx.header["X-Before"] = (ngx.header["X-Before"] or "") .. "1"
                ngx.exit({code})
                ngx.header["X-After"] = "1"
            }}
        }}""")
    return "\n".join(out)


def test_exit_in_header_filter(nginx):
    got = {}
    files = {f"html/static/{i}": "static\n" for i in range(len(HF_CODES))}
    for m, n in both(nginx, server=header_filter_server(), files=files,
                     main="user root;").items():
        got[m] = {}
        for i in range(len(HF_CODES)):
            for src in ("lua", "static"):
                raw = n.raw(f"GET /{src}/{i} HTTP/1.0\r\n\r\n".encode(),
                            timeout=3)
                raw = re.sub(rb"(Date|Server|Last-Modified|ETag): [^\r]*\r\n",
                             b"", raw)
                got[m][f"{src} {HF_CODES[i]}"] = raw
        got[m]["log"] = errors(n.read_log())
    assert got["luaguard"] == got["reference"], got


# ---- 20. the trap of an inherited handler that never runs ----

def test_unused_inherited_handler_must_compile(nginx_conf):
    """docs/compatibility.md, `nginx -t`: the reference never compiles a
    server-level handler every location overrides; luaguard does, so
    invalid Lua there stops the configuration."""
    server = r"""
        rewrite_by_lua_block { this is not lua }
        location / {
            rewrite_by_lua_block { ngx.say("ok") }
        }
    """
    ok, out = nginx_conf(module="reference", server=server).test_config()
    assert ok, out
    ok, out = nginx_conf(server=server).test_config()
    assert not ok
    assert re.search(r"rewrite_by_lua\(nginx\.conf:\d+\):1: '=' expected "
                     r"near 'is' in \S+nginx\.conf:\d+", out), out
