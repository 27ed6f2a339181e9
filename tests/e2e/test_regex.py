"""ngx.re.* and require "ngx.re": differential against lua-nginx-module
(module="reference") where both must agree, plus luaguard-only checks for
the match limit, the compile-once cache, UTF-8 safety and error formats.

Known, intended differences from the reference (not compared here):
- PCRE2 wording of compile errors ("missing closing parenthesis" where
  PCRE1 said "missing )"); the format around it is the same.
- Empty matches with "u" step over a whole character (the reference
  steps one byte and fails with "pcre_exec() failed: -11").
- "U" still validates UTF-8 (bad input gives -10 instead of undefined
  behaviour inside PCRE).
- ngx.re.split follows Perl for empty matches and captures where the
  reference's lua-resty-core produces garbled fields.
"""

import re

import pytest

from harness import Nginx

# Prints any value deterministically (sorted keys, nested tables).
DUMP = r"""
local function dump(v)
    if type(v) ~= "table" then
        return tostring(v)
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b)
        if type(a) == type(b) then return a < b end
        return type(a) == "number"
    end)
    local out = {}
    for _, k in ipairs(keys) do
        out[#out + 1] = tostring(k) .. "=" .. dump(v[k])
    end
    return "{" .. table.concat(out, ",") .. "}"
end
local function say(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = dump((select(i, ...))) end
    ngx.say(table.concat(t, " "))
end
"""

# name -> Lua body. Each runs in its own location on both modules; the
# outputs must be identical (after dropping error position prefixes).
CASES = {
    "match_basic": r"""
        say(ngx.re.match("hello 1234", "([a-z]+) (?<num>\\d+)(x)?"))
        say(ngx.re.match("hello", "x"))
        say(ngx.re.match("", "^$"))
        say(ngx.re.match("a", "(a)(?:x)?(b)?(c)?"))
    """,
    "match_options": r"""
        say(ngx.re.match("AB", "a", "i"))
        say(ngx.re.match("a\nb", "^b", "m"))
        say(ngx.re.match("a\nb", "a.b", "s"))
        say(ngx.re.match("a\nb", "a.b"))
        say(ngx.re.match("xab", "ab", "a"))
        say(ngx.re.match("abx", "ab", "a"))
        say(ngx.re.match(" a b", "a\\ b  # comment", "x"))
        say(ngx.re.match("aaa", "a+", "j"))
        say(ngx.re.match("aaa", "a+?", "J"))
        say(ngx.re.match("xAy", "\\u0041", "J"))
        say(ngx.re.match("ab", "a[]|b", "J"))
        say(ngx.re.match("ab", "(a)|\\1b", "J"))
        say(ngx.re.match("hello", "l+", "d"))
        say(ngx.re.match("hello", "(l)(l)", "d"))
        say(ngx.re.match("abc", "(?<x>.)(?<y>.)", "d"))
        say(ngx.re.match("héllo", "^\\w(.)", "u"))
        say(ngx.re.match("ÉCOLE", "école", "iu"))
        say(ngx.re.match("héllo", "^h(.)", "U"))
        say(ngx.re.match("abc", "B", "ijo"))
        say(ngx.re.match("abc", "B", "ijo"))
        say(ngx.re.match("a.b", "a\\.b", "joxsmi"))
    """,
    "match_named": r"""
        say(ngx.re.match("ab", "(?<first>a)(b)"))
        say(ngx.re.match("b", "(?<first>a)?(b)"))
        say(ngx.re.match("hello", "(?<a>h)(?<a>e)", "D"))
        say(ngx.re.match("hello", "(?<a>h)|(?<a>e)", "D"))
        say(ngx.re.match("ello", "(?<a>h)|(?<a>e)", "D"))
        say(ngx.re.match("hello", "(?<a>x)?(?<a>y)?", "D"))
        say(ngx.re.match("hello", "(?<a>h)(?<b>x)?(?<a>e)", "D"))
        say(ngx.re.match("hello", "(?<a>h)(?<b>x)?(?<a>e)", "Djo"))
        say(ngx.re.match("hello", "(?<w>l+)", "jo"))
        say(ngx.re.match("hello", "(?<w>l+)", "jo"))
    """,
    "match_ctx_pos": r"""
        local ctx = {pos = 2}
        say(ngx.re.match("hello", "l", "", ctx), ctx.pos)
        say(ngx.re.match("hello", "l", "jo", ctx), ctx.pos)
        say(ngx.re.match("hello", "l", "jo", ctx), ctx.pos)
        ctx = {pos = 10}
        say(ngx.re.match("hello", "l", "", ctx), ctx.pos)
        ctx = {}
        say(ngx.re.find("hello", "l", "", ctx), ctx.pos)
        ctx = {pos = 0}
        say(ngx.re.find("hello", "h", "", ctx), ctx.pos)
        ctx = {pos = -1}
        say(ngx.re.find("hello", "h", "jo", ctx), ctx.pos)
        ctx = {pos = 6}
        say(ngx.re.find("hello", "$", "", ctx), ctx.pos)
        ctx = {pos = 3}
        say(ngx.re.find("abc", "b", "a", ctx), ctx.pos)
        ctx = {pos = 2}
        say(ngx.re.find("abc", "b", "a", ctx), ctx.pos)
    """,
    "match_res_table": r"""
        local res = {9, 9, 9, 9, x = 1}
        local m = ngx.re.match("ab", "(a)(b)?(c)?", "", nil, res)
        say(m == res, res)
        m = ngx.re.match("ab", "(a)(b)?(c)?", "jo", nil, res)
        say(m == res, res)
        res = {n = "old", [3] = "x"}
        say(ngx.re.match("abc", "a(?<n>b)?", "", nil, res))
        say(ngx.re.match("abc", "x(?<n>b)?", "", nil, {n = "old"}))
        say(ngx.re.match("abc", "a", "d", nil, {}))
    """,
    "find_nth": r"""
        say(ngx.re.find("hello 1234", "([0-9])([0-9]+)", "jo", nil, 2))
        say(ngx.re.find("hello 1234", "([0-9])([0-9]+)", "", nil, 1))
        say(ngx.re.find("hello", "(l)(o)", "", nil, 5))
        say(ngx.re.find("hello", "(l)(o)?", "", nil, 2))
        say(ngx.re.find("hello", "(l)(o)", "", nil, 2))
        say(ngx.re.find("hello", "(l)(o)", "", nil, 0))
        say(ngx.re.find("hello", "(l)(o)", "d", nil, 1))
        say(ngx.re.find("hello", "x"))
        say(ngx.re.find("", "^$"))
        say(ngx.re.find("hello", "h", "", nil, -1))
        say(ngx.re.find("hello", "l+", "d"))
    """,
    "sub_templates": r"""
        say(ngx.re.sub("hello", "(l)", "${1}$1$$ $2x"))
        say(ngx.re.sub("hello", "(l)", "[$10]"))
        say(ngx.re.sub("hello", "(l)", "[${01}]"))
        say(ngx.re.sub("hello", "(l)", "[${123456789012}]"))
        say(ngx.re.sub("hello", "x", "y"))
        say(ngx.re.sub("abc", "$", "-"))
        say(ngx.re.sub("abc", "b", "[$0]", "d"))
        say(ngx.re.sub("abc", "(b)", "[$1]", "d"))
        say(ngx.re.sub("hello world", "(\\w+) (\\w+)", "$2 $1", "jo"))
        say(ngx.re.sub("hello", "l", 12))
        for _, t in ipairs({"$", "${", "${1", "${n}", "$a", "${1x}",
                            "$10 ${01} $", "[${}]", "[$ ]", "[${ 1}]"}) do
            say(t, ngx.re.sub("hello", "(?<n>l)", t))
            say(t, ngx.re.gsub("hello", "(?<n>l)", t, "jo"))
        end
    """,
    "gsub": r"""
        say(ngx.re.gsub("hello", "", "-"))
        say(ngx.re.gsub("hello", "l*", "-"))
        say(ngx.re.gsub("hello", "l|", "-"))
        say(ngx.re.gsub("abc", "x*", "-"))
        say(ngx.re.gsub("abc", "x*|b", "-"))
        say(ngx.re.gsub("", "x*", "-"))
        say(ngx.re.gsub("a\nb\n", "^", ">", "m"))
        say(ngx.re.gsub("a\nb\n", "$", "<", "m"))
        say(ngx.re.gsub("aaa", "a", "b", "a"))
        say(ngx.re.gsub("hello world", "o", "0", "jo"))
        say(ngx.re.gsub("hello world", "o", "0", "jo"))
        say(ngx.re.gsub("a1b22c333", "(\\d+)", "<$1:$0>", "jo"))
        say(ngx.re.gsub("héllo wörld", "ö|é", "_", "u"))
    """,
    "gsub_function": r"""
        say(ngx.re.gsub("hello", "l", function(m) return m[0]:upper() end))
        say(ngx.re.gsub("aXbXc", "X", function(m) return "<" .. m[0] .. ">" end, "o"))
        say(ngx.re.gsub("k1=v1;k2=v2", "(?<k>\\w+)=(\\w+)",
                        function(m) return m.k .. ":" .. m[2] end, "jo"))
        say(ngx.re.gsub("hello", "l", function(m) return 12 end))
        say(ngx.re.gsub("hello", "l", function(m) return nil end))
        say(ngx.re.sub("hello", "(l)(x)?", function(m) return tostring(m[2]) end))
        -- a callback may itself use ngx.re with the same pattern
        say(ngx.re.gsub("a1b2", "\\d", function(m)
            return ngx.re.gsub(m[0], "\\d", "#", "jo")
        end, "jo"))
    """,
    "gmatch": r"""
        local function all(it)
            local out = {}
            while true do
                local m, err = it()
                if not m then
                    out[#out + 1] = "end:" .. tostring(err)
                    break
                end
                out[#out + 1] = dump(m)
            end
            return table.concat(out, " ")
        end
        say(all(ngx.re.gmatch("a1b22", "\\d*")))
        say(all(ngx.re.gmatch("a1b22", "\\d*", "jo")))
        say(all(ngx.re.gmatch("hello", "l*")))
        say(all(ngx.re.gmatch("hello", "l|", "o")))
        say(all(ngx.re.gmatch("abab", "(a)(?<x>b)")))
        say(all(ngx.re.gmatch("abab", "(a)(?<x>b)", "jo")))
        say(all(ngx.re.gmatch("{foobarbaz}", "(?<=foo)bar|(?<=bar)baz")))
        say(all(ngx.re.gmatch("ABC", "b", "io")))
        say(all(ngx.re.gmatch("", "x*", "o")))
        local it = ngx.re.gmatch("ab", ".")
        it() it()
        say(it(), it(), it())
        -- (compile error texts differ: PCRE2 wording)
        say(select("#", ngx.re.gmatch("a", "(")), (ngx.re.gmatch("a", "(")))
        say(select("#", ngx.re.gmatch("a", "(", "jo")),
            (ngx.re.gmatch("a", "(", "jo")))
    """,
    "split": r"""
        local ngx_re = require "ngx.re"
        local function p(t, e)
            if not t then return "nil " .. tostring(e) end
            return #t .. ":" .. table.concat(t, "|")
        end
        say(p(ngx_re.split("a,b,,c,", ",")))
        say(p(ngx_re.split("a,b,,c,", ",", nil, nil, 2)))
        say(p(ngx_re.split("a,b,,c,", ",", nil, nil, 0)))
        say(p(ngx_re.split("a,b,,c,", ",", nil, nil, -1)))
        say(p(ngx_re.split("a1b2c", "(\\d)")))
        say(p(ngx_re.split("a1b", "(\\d)|(x)")))
        say(p(ngx_re.split("abc", "")))
        say(p(ngx_re.split("abc", "x*|b")))
        say(p(ngx_re.split(",a,b", ",")))
        say(p(ngx_re.split(",,a", ",")))
        say(p(ngx_re.split("abc", "x")))
        say(p(ngx_re.split("", ",")))
        say(p(ngx_re.split("a,b,c,d", ",", "jo", {pos = 3})))
        say(p(ngx_re.split("a,b,c,d", ",", nil, {pos = 2}, 2)))
        say(p(ngx_re.split("a,b,", ",", nil, nil, 3)))
        say(p(ngx_re.split("a,b,,,", ",", nil, nil, 10)))
        say(p(ngx_re.split("a;,b;,c;,d;e", ";,")))
        local res = {"x", "y", "z"}
        local t = ngx_re.split("a,b", ",", nil, nil, nil, res)
        say(t == res, t[1], t[2], t[3])
        say(pcall(ngx_re.split, "a", ",", nil, nil, nil, "x"))
        say(type(ngx_re.opt))
    """,
    "errors": r"""
        say(pcall(ngx.re.match, "abc", "a", "ojxyz"))
        say(pcall(ngx.re.find, "abc", "a", "Q"))
        say(pcall(ngx.re.gsub, "abc", "a", "b", "z"))
        say(pcall(ngx.re.gmatch, "abc", "a", "k"))
        say(ngx.re.match(("a"):rep(30) .. "b", "(a+)+$"))
        say(ngx.re.find(("a"):rep(30) .. "b", "(a+)+$"))
        say(ngx.re.gsub(("a"):rep(30) .. "b", "(a+)+$", ""))
        say(ngx.re.match("\xff\xfe", "a", "u"))
        say(ngx.re.find("\xff\xfe", ".", "ujo"))
        say(ngx.re.gsub("\xff\xfe", ".", "", "u"))
        local it = ngx.re.gmatch(("a"):rep(30) .. "b", "(a+)+$")
        say(it())
        say(it())
        say(ngx.re.match(nil, "n"))
        say(ngx.re.gsub(nil, "a", "b"))
    """,
}

HTTP = "lua_regex_match_limit 100000;"


def normalize(text):
    text = re.sub(r"(?m)(ERROR: |false )?[^ \n]*\.lua:\d+: ", r"\1", text)
    return re.sub(r"0x[0-9a-f]+", "0x", text)


def case_server():
    server = []
    for name, body in CASES.items():
        code = (DUMP + "local ok, e = pcall(function()\n" + body
                + "\nend)\nif not ok then ngx.say('ERROR: ', e) end\n")
        server.append(f"location = /{name} {{ content_by_lua_block {{\n"
                      f"{code}\n}} }}")
    return "\n".join(server)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    server = case_server()
    servers = {}
    for module in ("reference", "luaguard"):
        prefix = tmp_path_factory.mktemp(module)
        servers[module] = Nginx(prefix, module=module, server=server,
                                http=HTTP).start()
    yield servers
    problems = []
    for n in servers.values():
        n.stop()
        problems += n.fatal_lines()
    assert not problems, problems


@pytest.mark.parametrize("name", sorted(CASES))
def test_differential(pair, name):
    ref = pair["reference"].get("/" + name)
    ours = pair["luaguard"].get("/" + name)
    assert ref.status == 200 and ours.status == 200
    assert "ERROR:" not in ref.text, ref.text
    assert normalize(ours.text) == normalize(ref.text)


# ---- luaguard only ----

def lua_location(path, code, extra=""):
    return (f"location = {path} {{ {extra} content_by_lua_block {{\n{code}\n"
            "} }\n")


@pytest.mark.asan_fast
def test_fast_path_is_active_and_cache_hits(nginx):
    n = nginx(server=lua_location("/t", r"""
        ngx.say(debug.getinfo(ngx.re.match).what, " ",
                debug.getinfo(ngx.re.find).what, " ",
                debug.getinfo(ngx.re.gsub).what)
        local subj = "GET /users/12345/profile"
        local m
        for i = 1, 20000 do
            m = ngx.re.match(subj, "/users/(\\d+)/(?<what>\\w+)", "jo")
        end
        ngx.say(m[1], " ", m.what, " ", m[0])
    """))
    assert n.get("/t").text == "Lua Lua Lua\n12345 profile /users/12345/profile\n"


@pytest.mark.asan_fast
def test_compile_error_format(nginx):
    n = nginx(server=lua_location("/t", r"""
        ngx.say(ngx.re.match("abc", "(", "o"))
        ngx.say(ngx.re.find("abc", "a(?<x>b)(?<x>c)"))
        ngx.say(select("#", ngx.re.sub("abc", "[", "")), " ",
                select(3, ngx.re.sub("abc", "[", "")))
        ngx.say(require("ngx.re").split("abc", "*"))
    """))
    assert n.get("/t").text == (
        'nilpcre_compile() failed: missing closing parenthesis in "("\n'
        'nilnilpcre_compile() failed: two named subpatterns have the same '
        'name (PCRE2_DUPNAMES not set) in "a(?<x>b)(?<x>c)" at "c)"\n'
        '3 pcre_compile() failed: missing terminating ] for character '
        'class in "["\n'
        'nilpcre_compile() failed: quantifier does not follow a repeatable '
        'item in "*" at "*"\n')


REDOS = r"""
    local subj = ("a"):rep(tonumber(ngx.var.arg_n or 30000)) .. "b"
    local m, err = ngx.re.match(subj, "(a+)+$", ngx.var.arg_o or "")
    ngx.say(tostring(m), " ", tostring(err))
"""


@pytest.mark.asan_fast
@pytest.mark.parametrize("opts", ["", "j", "jo", "d"])
def test_redos_fails_fast_and_worker_keeps_serving(nginx, opts):
    # No lua_regex_match_limit: the hardened default applies.
    n = nginx(server=lua_location("/redos", REDOS)
              + lua_location("/ok", 'ngx.say("ok")'))
    r = n.get("/redos?o=" + opts, timeout=30)
    if opts == "d":
        # DFA does not backtrack; it runs out of workspace instead (the
        # reference gives the same -19, PCRE_ERROR_DFA_WSSIZE).
        assert r.text == "nil pcre_exec() failed: -19\n"
    else:
        assert r.text == "nil pcre_exec() failed: -8\n"
    # The match limit ended the search (-8): the worker serves on.
    assert n.get("/ok", timeout=5).text == "ok\n"


def test_match_limit_directive(nginx):
    code = r"""
        local subj = ("a"):rep(18) .. "b"
        ngx.say(ngx.re.match(subj, "(a+)+$", "o"))
        ngx.say(ngx.re.match("aaa", "a+$", "o")[0])
    """
    low = nginx(http="lua_regex_match_limit 1000;",
                server=lua_location("/t", code))
    assert low.get("/t").text == "nilpcre_exec() failed: -8\naaa\n"
    high = nginx(http="lua_regex_match_limit 0;",  # PCRE2's own default
                 server=lua_location("/t", code))
    assert high.get("/t").text == "nil\naaa\n"


def test_cache_limit_warns_once_and_stays_correct(nginx):
    n = nginx(http="lua_regex_cache_max_entries 2;",
              server=lua_location("/t", r"""
        local out = {}
        for round = 1, 3 do
            for i = 1, 5 do
                local m = ngx.re.match("x" .. i .. "y", "x(" .. i .. ")y", "jo")
                out[#out + 1] = m and m[1] or "nil"
            end
        end
        -- an iterator keeps its pattern even after eviction
        local it = ngx.re.gmatch("a1a2a3", "a(\\d)", "o")
        local first = it()[1]
        for i = 1, 10 do ngx.re.find("z", "z" .. i, "o") end
        local second = it()[1]
        collectgarbage()
        local third = it()[1]
        ngx.say(table.concat(out), " ", first, second, third, " ",
                tostring(it()))
    """))
    assert n.get("/t").text == "123451234512345 123 nil\n"
    assert n.get("/t").text == "123451234512345 123 nil\n"
    n.wait_log(r"\[warn\].*lua exceeding regex cache max entries \(2\)")
    assert len(re.findall("exceeding regex cache", n.read_log())) == 1


def test_cache_disabled(nginx):
    n = nginx(http="lua_regex_cache_max_entries 0;",
              server=lua_location("/t", r"""
        local it = ngx.re.gmatch("a1a2", "a(\\d)", "jo")
        local a = it()[1]
        collectgarbage()
        ngx.say(a, it()[1], ngx.re.sub("ab", "b", "$0$0", "o"),
                ngx.re.match("q", "q", "o")[0])
    """))
    assert n.get("/t").text == "12abbq\n"
    assert "exceeding regex cache" not in n.read_log()


@pytest.mark.asan_fast
def test_bad_utf8_is_an_error_not_a_crash(nginx):
    n = nginx(server=lua_location("/t", r"""
        local bad = "ab\xff\xfecd\xc3"
        ngx.say(ngx.re.match(bad, "c", "u"))
        ngx.say(ngx.re.match(bad, "c", "U"))
        ngx.say(ngx.re.find(bad, ".", "ujo"))
        ngx.say(ngx.re.gsub(bad, "", "-", "u"))
        ngx.say(ngx.re.gmatch(bad, ".", "uo")())
        ngx.say(ngx.re.gmatch(bad, ".", "u")())
        ngx.say(require("ngx.re").split(bad, ",", "u"))
        ngx.say(ngx.re.match("\xff", "\xff", "u") == nil)
        -- a start offset inside a character
        ngx.say(ngx.re.match("é", ".", "u", {pos = 2}))
        -- empty matches step over whole characters
        ngx.say(ngx.re.gsub("héllo", "", "-", "u"))
        local n = 0
        for m in ngx.re.gmatch("héllo", "", "uo") do n = n + 1 end
        for m in ngx.re.gmatch("héllo", "", "u") do n = n + 1 end
        ngx.say(n, " ", table.concat(require("ngx.re").split("héllo", "", "u"), "|"))
    """))
    assert n.get("/t").text == (
        "nilpcre_exec() failed: -10\n"
        "nilpcre_exec() failed: -10\n"
        "nilnilpcre_exec() failed: -10\n"
        "nilnilpcre_exec() failed: -10\n"
        "nilpcre_exec() failed: -10\n"
        "nilpcre_exec() failed: -10\n"
        "nilpcre_exec() failed: -10\n"
        "true\n"
        "nilpcre_exec() failed: -11\n"
        "-h-é-l-l-o-6\n"
        "12 h|é|l|l|o\n")


def test_gmatch_iterator_outlives_gc(nginx):
    n = nginx(server=lua_location("/t", r"""
        local its = {}
        for i = 1, 50 do
            its[i] = ngx.re.gmatch("x1x2x3", "x(\\d)", i % 2 == 0 and "jo" or "")
        end
        collectgarbage()
        collectgarbage()
        local out = {}
        for i = 1, 50 do
            local a, b, c, d = its[i](), its[i](), its[i](), its[i]()
            out[#out + 1] = a[1] .. b[1] .. c[1] .. tostring(d)
        end
        its = nil
        collectgarbage()
        ngx.say(out[1], " ", out[2], " ", #out)
    """))
    assert n.get("/t").text == "123nil 123nil 50\n"


def test_callback_error_and_reentrancy(nginx):
    n = nginx(server=lua_location("/boom", r"""
        ngx.re.gsub("abc", "b", function() error("cb failed") end, "jo")
    """) + lua_location("/t", r"""
        ngx.say(ngx.re.gsub("abc", "b", "X", "jo"))
        ngx.say(pcall(ngx.re.gsub, "abc", "b", function() error("x", 0) end))
        ngx.say(ngx.re.gsub("abcb", "b", function(m)
            return ngx.re.sub(m[0], "b", "[$0]", "jo")
        end, "jo"))
    """))
    for _ in range(3):
        assert n.get("/boom").status == 500
    n.wait_log(r"cb failed")
    assert n.get("/t").text == "aXc1\nfalsex\na[b]c[b]2\n"


def test_opt_and_module(nginx):
    n = nginx(server=lua_location("/t", r"""
        local ngx_re = require "ngx.re"
        ngx.say(pcall(ngx_re.opt, "jit_stack_size", 128 * 1024))
        ngx.say(pcall(ngx_re.opt, "foo", 1))
        ngx.say(ngx.re.match(("ab"):rep(1000), "(?:a|b)*$", "j")[0]:len())
        ngx.say(ngx_re.version, " ", require("ngx.re") == ngx_re)
    """))
    assert n.get("/t").text == (
        "true\nfalseunrecognized option name\n2000\n0.1.25 true\n")


def test_regex_in_init_and_set_phases(nginx):
    n = nginx(http=r"""
        init_by_lua_block {
            local m = ngx.re.match("init 42", "(\\d+)", "jo")
            INIT_VALUE = m[1]
        }""", server=r"""
        location = /t {
            set_by_lua_block $v { return ngx.re.sub("a-b", "-", "+", "jo") }
            content_by_lua_block { ngx.say(INIT_VALUE, " ", ngx.var.v) }
        }""")
    assert n.get("/t").text == "42 a+b\n"


def test_directives_config(nginx_conf):
    ok, out = nginx_conf(http="lua_regex_cache_max_entries 10;\n"
                              "lua_regex_match_limit 5000;").test_config()
    assert ok, out
    ok, out = nginx_conf(http="lua_regex_match_limit abc;").test_config()
    assert not ok and "invalid number" in out
    ok, out = nginx_conf(
        server="location /x { lua_regex_cache_max_entries 1; }").test_config()
    assert not ok and "not allowed here" in out


@pytest.mark.asan_fast
def test_evictions_through_both_paths_invalidate_handles(nginx):
    # One cache entry: the FFI path (match/find/gmatch, string templates)
    # and the C path (function replacements) evict each other's patterns;
    # a stale handle must never be used (ASan would see it).
    n = nginx(http="lua_regex_cache_max_entries 1;",
              server=lua_location("/t", r"""
        local out
        for i = 1, 50 do
            local m1 = ngx.re.match("xay", "a", "o")
            local s = ngx.re.gsub("xby", "b", function(m) return "B" end, "o")
            local from = ngx.re.find("xcy", "c", "jo")
            local it = ngx.re.gmatch("d1d2", "d(\\d)", "jo")
            local g1 = it()[1]
            local t = ngx.re.sub("xay", "a", "[$0]", "o")
            local g2 = it()[1]
            local parts = require("ngx.re").split("p,q", ",", "o")
            out = m1[0] .. s .. from .. g1 .. t .. g2 .. #parts
        end
        ngx.say(out)
    """))
    assert n.get("/t").text == "axBy21x[a]y22\n"
    assert n.get("/t").text == "axBy21x[a]y22\n"
