"""docs/directives.md against the modules themselves.

Names and contexts come from the directive tables the .so files register
(ngx_commands.py), for luaguard and for the reference lua-nginx-module.
Each default the page gives in backticks is checked against what luaguard
does when the directive is absent: by behaviour (start nginx without the
directive, with the documented value and with another value: the first
two must answer alike, the third differently) where one request shows
it, otherwise by the value the module's configuration code merges in
(src/ngx/module.cpp). A default that neither check covers fails the test,
so a new directive comes with a way to check its default."""

import re

import pytest

import ngx_commands
from harness import MODULE, REFERENCE_MODULES, REPO, free_port

PAGE = REPO / "docs" / "directives.md"
MODULE_CPP = REPO / "src" / "ngx" / "module.cpp"
REFERENCE = REFERENCE_MODULES[-1]
STATUSES = {"same", "differs", "not yet", "luaguard"}

ROW = re.compile(r"^\| `([a-z0-9_]+)` \|([^|]*)\|([^|]*)\|([^|]*)\|")


def page_rows():
    rows = {}
    for line in PAGE.read_text().splitlines():
        m = ROW.match(line)
        if not m:
            continue
        name = m.group(1)
        assert name not in rows, f"{name} is listed twice"
        default = m.group(3).strip()
        dm = re.fullmatch(r"`([^`]+)`", default)
        rows[name] = dict(
            contexts=[c.strip() for c in m.group(2).split(",")],
            default=dm.group(1) if dm else None,
            default_text=default,
            status=m.group(4).strip())
    return rows


@pytest.fixture(scope="module")
def rows():
    return page_rows()


@pytest.fixture(scope="module")
def ours():
    return ngx_commands.module_commands(MODULE)


def test_every_registered_directive_is_on_the_page(rows, ours):
    assert len(ours) > 50, "the command table was not found"
    missing = sorted(set(ours) - set(rows))
    assert not missing, f"directives missing from docs/directives.md: {missing}"
    for name, bits in ours.items():
        row = rows[name]
        assert row["status"] in STATUSES - {"not yet"}, (
            f"{name} is registered but the page says {row['status']!r}")
        assert row["contexts"] == ngx_commands.contexts(bits), (
            f"{name}: the page says {row['contexts']}, the module "
            f"accepts {ngx_commands.contexts(bits)}")


def test_every_reference_directive_is_on_the_page(rows, ours):
    ref = ngx_commands.module_commands(REFERENCE)
    assert len(ref) > 50, "the reference's command table was not found"
    missing = sorted(set(ref) - set(rows))
    assert not missing, (
        f"lua-nginx-module directives missing from the page: {missing}")
    for name, row in rows.items():
        assert row["status"] in STATUSES, f"{name}: status {row['status']!r}"
        if row["status"] == "luaguard":
            assert name not in ref, f"{name} is lua-nginx-module's too"
        else:
            assert name in ref, f"{name} is not lua-nginx-module's"
        if row["status"] == "not yet":
            assert name not in ours, f"{name} exists now: update its row"
            # Contexts of what luaguard lacks are the reference's.
            assert row["contexts"] == ngx_commands.contexts(ref[name]), name


# ---- defaults, by behaviour ----------------------------------------------

# Each probe: the directive, a value other than its default, the location
# body, and how to observe the answer (a function of nginx and the path).
def _get_text(n, path):
    return n.get(path).text


def _post_text(n, path):
    return n.request(path, method="POST", body=b"abc").text


def _content_type(n, path):
    return n.get(path).header("Content-Type")


def _header_names(n, path):
    return sorted(k.lower() for k, _ in n.get(path).headers
                  if "foo" in k.lower())


def _status(n, path):
    return n.get(path).status


def _http10_length(n, path):
    return n.get(path, version="1.0").header("Content-Length") is not None


def _twice(n, path):
    return (n.get(path).text, n.get(path).text)


def _log_lines_about(pattern):
    def observe(n, path):
        n.new_log()
        n.get(path)
        return len(re.findall(pattern, n.new_log()))
    return observe


def _code_cache(n, path):
    script = n.prefix / _script(path)
    script.write_text('ngx.say("one")')
    first = n.get(path).text
    script.write_text('ngx.say("two")')
    return (first, n.get(path).text)


CLOSED = free_port()   # bound and released: nothing listens there

LOC_PROBES = [
    ("lua_use_default_type", "off", 'content_by_lua_block { ngx.say("x") }',
     _content_type),
    ("lua_transform_underscores_in_response_headers", "off",
     'content_by_lua_block { ngx.header.foo_bar = "1" ngx.say("x") }',
     _header_names),
    ("lua_check_client_abort", "on",
     "content_by_lua_block { local ok, err = ngx.on_abort(function() end)"
     " ngx.say(tostring(ok), ' ', tostring(err)) }", _get_text),
    ("lua_need_request_body", "on",
     "content_by_lua_block { ngx.say(tostring(ngx.req.get_body_data())) }",
     _post_text),
    ("lua_http10_buffering", "off", 'content_by_lua_block { ngx.say("x") }',
     _http10_length),
    ("lua_sandbox", "off",
     "content_by_lua_block { probe_global = (probe_global or 0) + 1"
     " ngx.say(probe_global) }", _twice),
    ("lua_budget_status", "503",
     "lua_budget_memory 1m; content_by_lua_block {"
     " local t = {} for i = 1, 1e7 do t[i] = {} end ngx.say(#t) }",
     _status),
    ("lua_egress_default", "deny",
     "content_by_lua_block { local s = ngx.socket.tcp()"
     f" local ok, err = s:connect('127.0.0.1', {CLOSED}) ngx.say(err) }}",
     _get_text),
    ("lua_socket_log_errors", "off",
     "content_by_lua_block { local s = ngx.socket.tcp()"
     f" s:connect('127.0.0.1', {CLOSED}) ngx.say('done') }}",
     _log_lines_about(r"\[error\].*connect\(\) (?:to \S+ )?failed")),
    ("lua_socket_max_per_request", "3",
     "content_by_lua_block { local n, keep = 0, {} for i = 1, 200 do"
     " local s = ngx.socket.tcp() local ok, err = s:connect('127.0.0.1',"
     " {port}) if not ok then ngx.say(n, ' ', err) return end n = n + 1"
     " keep[n] = s end ngx.say(n) }", _get_text),
    ("lua_max_pending_timers_per_location", "5",
     "content_by_lua_block { local n = 0 for i = 1, 2000 do"
     " local ok, err = ngx.timer.at(3600, function() end)"
     " if not ok then ngx.say(n, ' ', err) return end n = n + 1 end"
     " ngx.say(n) }", _get_text),
    ("lua_file_check_writable", "off", "content_by_lua_file WRITABLE;",
     _get_text),
    ("lua_code_cache", "off", "content_by_lua_file PATH;", _code_cache),
]

# Directives of the http level: one nginx per value.
MAIN_PROBES = [
    ("lua_max_pending_timers", "10",
     "lua_max_pending_timers_per_location 100000; content_by_lua_block {"
     " local n = 0 for i = 1, 3000 do"
     " local ok, err = ngx.timer.at(3600, function() end)"
     " if not ok then ngx.say(n, ' ', err) return end n = n + 1 end"
     " ngx.say(n) }", _get_text),
    ("rewrite_by_lua_no_postpone", "on",
     'set $x "set"; rewrite_by_lua_block { ngx.var.x = ngx.var.x .. "+lua" }'
     " content_by_lua_block { ngx.say(ngx.var.x) }", _get_text),
    ("access_by_lua_no_postpone", "on",
     "deny all; access_by_lua_block { ngx.exit(418) }"
     " content_by_lua_block { ngx.say('in') }", _status),
    # The first subject length at which ^(a|aa)*$ runs out of match steps
    # on "aa...ab": it moves with the limit.
    ("lua_regex_match_limit", "100",
     "content_by_lua_block { for n = 5, 60 do local m, err ="
     " ngx.re.match(string.rep('a', n) .. 'b', '^(a|aa)*$') if err then"
     " ngx.say(n, ' ', err) return end end ngx.say('none') }", _get_text),
    ("lua_regex_cache_max_entries", "10",
     "content_by_lua_block { for i = 1, 1100 do"
     " ngx.re.match('x', 'x' .. i .. '|x', 'o') end ngx.say('done') }",
     lambda n, path: (n.get(path).text, re.findall(
         r"regex cache max entries \((\d+)\)", n.read_log()))),
]

PROBED = {p[0] for p in LOC_PROBES + MAIN_PROBES}


def _variants(rows, name, alt):
    default = rows[name]["default"]
    assert default is not None, f"{name}: the page gives no default"
    return [("unset", ""), ("doc", f"{name} {default};"),
            ("alt", f"{name} {alt};")]


def _script(path):
    return "html/" + path.strip("/").replace("/", "_") + ".lua"


def _body(body, path, files, writable):
    """The location body, with PATH or WRITABLE replaced by a script of
    its own (added to `files`; WRITABLE ones listed in `writable`)."""
    for word in ("PATH", "WRITABLE"):
        if word + ";" in body:
            files[_script(path)] = 'ngx.say("ran")'
            if word == "WRITABLE":
                writable.append(_script(path))
            body = body.replace(word + ";", _script(path) + ";")
    return body


def _check(name, answers):
    unset, doc, alt = answers
    assert unset == doc, (
        f"{name}: the documented default answers {doc!r}, the module "
        f"without the directive {unset!r}")
    assert alt != unset, (
        f"{name}: the probe cannot tell the default from another value "
        f"({alt!r})")


def test_documented_defaults_by_behaviour(nginx, rows):
    locations, files, writable = [], {}, []
    for name, alt, body, _ in LOC_PROBES:
        for variant, setting in _variants(rows, name, alt):
            path = f"/{name}/{variant}"
            locations.append(f"location = {path} {{ {setting} "
                             f"{_body(body, path, files, writable)} }}")
    # pytest's directories are root-only: the workers read scripts there.
    n = nginx(main="user root;", files=files, server="\n".join(locations))
    for script in writable:
        # What lua_file_check_writable's default refuses.
        (n.prefix / script).chmod(0o666)
    for name, alt, body, observe in LOC_PROBES:
        _check(name, [observe(n, f"/{name}/{v}")
                      for v, _ in _variants(rows, name, alt)])


@pytest.mark.parametrize("probe", MAIN_PROBES, ids=lambda p: p[0])
def test_documented_http_level_defaults_by_behaviour(nginx, rows, probe):
    name, alt, body, observe = probe
    answers = []
    for _, setting in _variants(rows, name, alt):
        n = nginx(http=setting, server=f"location = /p {{ {body} }}")
        answers.append(observe(n, "/p"))
        n.stop()
    _check(name, answers)


# ---- defaults, by what the configuration code merges in --------------------

UNITS_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}
UNITS_B = {"k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}
PAGE_SIZE = 4096
SSL = {"NGX_SSL_TLSv1": "TLSv1", "NGX_SSL_TLSv1_1": "TLSv1.1",
       "NGX_SSL_TLSv1_2": "TLSv1.2", "NGX_SSL_TLSv1_3": "TLSv1.3",
       "NGX_SSL_SSLv3": "SSLv3", "NGX_SSL_SSLv2": "SSLv2"}


def _c_value(expr, resolve):
    """A C default expression of module.cpp as a Python value; `resolve`
    gives the value of a name it uses (a main-conf field, a local)."""
    expr = " ".join(expr.split())
    m = re.fullmatch(r'"(.*)"', expr)
    if m:
        return m.group(1)
    if "NGX_CONF_BITMASK_SET" in expr:
        return {SSL[t] for t in re.findall(r"NGX_SSL_\w+", expr)}
    expr = expr.replace("ngx_pagesize", str(PAGE_SIZE))
    expr = expr.replace("NGX_HTTP_INTERNAL_SERVER_ERROR", "500")
    expr = re.sub(r"mcf->(\w+)", lambda m: str(resolve(m.group(1))), expr)
    expr = re.sub(r"\b([a-z_]+)\b", lambda m: str(resolve(m.group(1))),
                  expr)
    expr = re.sub(r"(\S+) \? (.+) : (.+)", r"(\2) if \1 else (\3)", expr)
    expr = expr.replace("/", "//")
    return eval(expr, {"__builtins__": {}})


def _enum_value(text, table):
    """The number an ngx_conf_enum_t table of module.cpp gives `text`."""
    src = MODULE_CPP.read_text()
    body = re.search(r"ngx_conf_enum_t %s\[\] = \{(.*?)\};" % table, src,
                     re.S).group(1)
    values = dict(re.findall(r'ngx_string\("(\w+)"\), (\d+)', body))
    return int(values[text])


def _page_value(text, setter):
    if setter.startswith("enum:"):
        return _enum_value(text, setter[5:])
    if setter in ("ngx_conf_set_flag_slot",):
        return {"on": 1, "off": 0}[text]
    if setter in ("ngx_conf_set_msec_slot", "setBudgetTime"):
        m = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
        return int(m.group(1)) * UNITS_MS[m.group(2)]
    if setter in ("ngx_conf_set_size_slot", "setBudgetSize"):
        m = re.fullmatch(r"(\d+)([kmg]?)", text)
        return int(m.group(1)) * UNITS_B.get(m.group(2), 1)
    if setter == "ngx_conf_set_bitmask_slot":
        return set(text.split())
    if setter == "ngx_conf_set_str_slot":
        return text
    return int(text)


def merged_defaults():
    """{directive: (setter, value)} from the command table and the
    ngx_conf_merge/init calls (and the locals and plain assignments of the
    merge helpers) in src/ngx/module.cpp."""
    src = MODULE_CPP.read_text()
    cmds = {}
    for m in re.finditer(r'LG_CMD\("(\w+)",(.*?)\),\n', src, re.S):
        args = " ".join(m.group(2).split())
        setter = re.search(r"(\b(?:ngx_conf_set_\w+|set\w+))\b", args)
        field = re.search(r"LG_(?:LOC|MAIN)_OFF\((\w+)", args)
        # The enum table is the last argument, past the \),\n the
        # pattern above may stop at.
        table = re.search(r'LG_CMD\("%s",(?:(?!LG_CMD).)*?\b(k\w+Enum)\b'
                          % m.group(1), src, re.S)
        if setter and field:
            kind = setter.group(1)
            if kind == "ngx_conf_set_enum_slot" and table:
                kind = "enum:" + table.group(1)
            cmds[m.group(1)] = (kind, field.group(1))
    exprs = {}
    for m in re.finditer(
            r"ngx_conf_(?:merge|init)(?:_\w+)?_value\(\s*(?:conf|mcf)->(\w+),"
            r"(?:\s*prev->\w+,)?\s*(.*?)\);", src, re.S):
        exprs[m.group(1)] = m.group(2)
    for m in re.finditer(r"conf->(\w+) = (\d+);", src):
        exprs.setdefault(m.group(1), m.group(2))
    locals_ = {m.group(1): m.group(2) for m in re.finditer(
        r"\n    (?:ngx_uint_t|off_t) (\w+) = (.*?);", src, re.S)}

    def resolve(name):
        if name in ("if", "else"):
            return name
        return _c_value(exprs.get(name) or locals_[name], resolve)

    return {name: (setter, lambda f=field: resolve(f))
            for name, (setter, field) in cmds.items() if field in exprs}


def test_documented_defaults_by_merged_value(rows, ours):
    merged = merged_defaults()
    # lua_timer_cpu_per_location's two values live in two fields.
    src = MODULE_CPP.read_text()
    cpu = re.search(r"conf->timer_cpu = (\d+);\s*conf->timer_cpu_interval"
                    r" = (\d+);\s*}\s*}", src)
    unchecked = []
    for name in ours:
        doc = rows.get(name, {}).get("default")
        if doc is None or name in PROBED:
            continue
        if name == "lua_timer_cpu_per_location":
            got = [_page_value(v, "setBudgetTime") for v in doc.split()]
            assert got == [int(cpu.group(1)), int(cpu.group(2))], name
            continue
        if name not in merged:
            unchecked.append(name)
            continue
        setter, value = merged[name][0], merged[name][1]()
        assert _page_value(doc, setter) == value, (
            f"{name}: the page says {doc}, module.cpp merges in {value}")
    assert not unchecked, (
        f"no check for the documented default of {unchecked}: add a probe")
