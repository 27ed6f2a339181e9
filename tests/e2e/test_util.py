"""ngx.escape_uri and the other encoding / hashing helpers, mostly
differential against lua-nginx-module (same Lua, same output)."""

import base64
import hashlib
import hmac
import zlib

import pytest

# Deterministic outputs only (no pairs() order, no table addresses).
DIFF_LUA = r"""
local function p(...)
    local t = {}
    for i = 1, select("#", ...) do t[i] = tostring((select(i, ...))) end
    ngx.say(table.concat(t, " | "))
end
local function dump(t)
    local ks = {}
    for k, v in pairs(t) do
        ks[#ks + 1] = k .. "=" .. (type(v) == "table"
            and "[" .. table.concat((function() local o = {}
                for i, x in ipairs(v) do o[i] = tostring(x) end
                return o end)(), ",") .. "]" or tostring(v))
    end
    table.sort(ks)
    return table.concat(ks, ";")
end
local s = "a b/c?d=e&f+g~h_i.j-k!*'();:@$,[]#%\0\127\128\255\t\r\n"
p(ngx.escape_uri(s))
p(ngx.escape_uri(s, 0))
p(ngx.escape_uri(s, 2))
p(ngx.escape_uri(nil), ngx.escape_uri(12))
p(ngx.unescape_uri("a%20b+c%zz%4%e4%%%41%4a%4A"))
p(#ngx.unescape_uri("%00x"))
p(ngx.unescape_uri(nil), ngx.unescape_uri(12))
p(ngx.encode_args({a = "x y&z"}))
p(ngx.encode_args({a = true, b = false}))
p(ngx.encode_args({a = {"1", "2", true, false}}))
p(ngx.encode_args({["k y"] = 1.5}))
p(ngx.encode_args({}))
p(dump(ngx.decode_args("a=1&b&c=&a=2&%41=%zz&=x&&d=a+b&e=%00", 0)))
local t, e = ngx.decode_args("a=1&b=2&c=3", 2)
p(dump(t), e)
p(select("#", ngx.decode_args("a=1&b=2", 2)))
p(dump(ngx.decode_args("")))
p(ngx.encode_base64("hello!?"), ngx.encode_base64("hi", true),
  ngx.encode_base64(""), ngx.encode_base64(nil), ngx.encode_base64(12))
p(ngx.decode_base64("aGk="), ngx.decode_base64("aGk"), ngx.decode_base64(""),
  ngx.decode_base64("a!Gk="), ngx.decode_base64("a"))
p(ngx.md5("x"), ngx.md5(""), ngx.md5(nil), ngx.md5(12))
p(ngx.encode_base64(ngx.md5_bin("x")), ngx.encode_base64(ngx.sha1_bin("x")))
p(ngx.encode_base64(ngx.hmac_sha1("k", "d")), ngx.encode_base64(ngx.hmac_sha1("", "")))
p(ngx.crc32_short("hello"), ngx.crc32_long("hello"), ngx.crc32_short(""))
p(ngx.quote_sql_str("a'b\"c\\d\0e\n\r\t\26\b"), ngx.quote_sql_str(""))
p(pcall(ngx.decode_base64, nil))
p(pcall(ngx.decode_base64, 12))
p(pcall(ngx.hmac_sha1, "k"))
p(pcall(ngx.quote_sql_str))
p(pcall(ngx.encode_args))
p(pcall(ngx.encode_args, {[1] = "x"}))
p(pcall(ngx.encode_args, {a = function() end}))
p(pcall(ngx.encode_args, {a = {{}}}))
p(pcall(ngx.encode_base64, "x", "y"))
local b64 = require "ngx.base64"
p(b64.encode_base64url("\255\254\253 hi?"), b64.decode_base64url("__79IGhpPw"),
  b64.decode_base64url("!!"))
"""


def run(nginx, module, lua):
    n = nginx(module=module, server="location /t { content_by_lua_block {\n"
              + lua + "\n} }")
    r = n.get("/t")
    assert r.status == 200, n.read_log()
    return r.text


@pytest.mark.asan_fast
def test_util_matches_reference(nginx):
    ours = run(nginx, "luaguard", DIFF_LUA)
    ref = run(nginx, "reference", DIFF_LUA)
    assert ours == ref
    assert "hello" not in ours  # sanity: outputs are encoded forms


def test_util_values_are_right(nginx):
    out = run(nginx, "luaguard", r"""
        ngx.say(ngx.md5("abc"))
        ngx.say(ngx.encode_base64(ngx.sha1_bin("abc")))
        ngx.say(ngx.encode_base64(ngx.hmac_sha1("key", "msg")))
        ngx.say(ngx.crc32_long(string.rep("x", 100000)))
        ngx.say(ngx.escape_uri("\226\130\172 /"))
    """).splitlines()
    assert out[0] == hashlib.md5(b"abc").hexdigest()
    assert out[1] == base64.b64encode(hashlib.sha1(b"abc").digest()).decode()
    assert out[2] == base64.b64encode(
        hmac.new(b"key", b"msg", hashlib.sha1).digest()).decode()
    assert int(out[3]) == zlib.crc32(b"x" * 100000)
    assert out[4] == "%E2%82%AC%20%2F"


@pytest.mark.asan_fast
def test_escape_html(nginx):
    out = run(nginx, "luaguard", r"""
        ngx.say(ngx.escape_html([[<script a="b" c='d'>&amp;</script>]]))
        ngx.say(ngx.escape_html("plain"), "|", ngx.escape_html(nil), "|",
                ngx.escape_html(5))
        ngx.say(pcall(ngx.escape_html, {}))
    """).splitlines()
    assert out[0] == ("&lt;script a=&quot;b&quot; c=&#39;d&#39;&gt;&amp;amp;"
                      "&lt;/script&gt;")
    assert out[1] == "plain||5"
    assert out[2].startswith("falsebad argument #1 to ")
    assert "string expected, got table" in out[2]


def test_bad_arguments_raise_not_crash(nginx):
    out = run(nginx, "luaguard", r"""
        local calls = {
            {"md5", {}}, {"md5_bin", {}}, {"sha1_bin", true},
            {"crc32_short", {}}, {"crc32_long", print},
            {"encode_base64", {}}, {"escape_uri", {}}, {"unescape_uri", {}},
            {"decode_args", nil}, {"decode_args", {}},
        }
        for _, c in ipairs(calls) do
            local ok, err = pcall(ngx[c[1]], c[2])
            ngx.say(c[1], " ", tostring(ok), " ", err)
        end
        ngx.say(pcall(ngx.escape_uri, "x", 7))
        ngx.say(pcall(ngx.escape_uri, "x", "2"))
        ngx.say(pcall(ngx.decode_args, "a=1", "x"))
        ngx.say(pcall(ngx.hmac_sha1, {}, "x"))
    """).splitlines()
    for line in out[:10]:
        name, ok, err = line.split(" ", 2)
        assert ok == "false", line
        assert err.startswith("bad argument #1 to "), line
    assert out[10] == 'false"type" 7 out of range'
    assert out[11] == 'false"type" is not a number'
    assert out[12].startswith("falsebad argument #2 to ")
    assert out[13].startswith("falsebad argument #1 to ")


def test_utils_outside_requests(nginx):
    n = nginx(http="""
        init_by_lua_block {
            UTIL = ngx.md5("x") .. " " .. ngx.encode_base64("x") .. " "
                   .. ngx.escape_uri("a b")
        }
    """, server="location /t { content_by_lua_block { ngx.say(UTIL) } }")
    assert n.get("/t").text == ("9dd4e461268c8034f5c8564e155c67a6 eA== "
                                "a%20b\n")
