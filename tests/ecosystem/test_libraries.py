"""Each library of the ecosystem folder used as its README shows, once on
luaguard and once on lua-nginx-module (the `module` parameter). The
`library` marker names the folder, the folders it needs on
lua_package_path and what the test exercises: scripts/ecosystem-matrix.py
turns the outcomes into docs/ecosystem.md."""

import base64
import hashlib
import hmac
import json
import re
import subprocess
import uuid

import pytest

from harness import Dns

library = pytest.mark.library


def lines(n, path, **kw):
    """The body's lines of a request that must succeed; otherwise the
    failure names the error the server logged."""
    r = n.request(path, **kw)
    if r.status != 200:
        # the message without pids and connection numbers: it goes into
        # docs/ecosystem.md
        errs = re.findall(r"\[error\] \d+#\d+: (?:\*\d+ )?(.*)",
                          n.read_log())
        raise AssertionError(f"{path}: HTTP {r.status}: "
                             + (errs[-1][:240] if errs else r.text[:240]))
    return r.text.splitlines()


def same(got, want):
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"line {i + 1}: got {g!r}, want {w!r}"
    assert len(got) == len(want), f"got {got[len(want):] or 'fewer'} lines"


# ---- lua-tablepool ----

@library("lua-tablepool", exercised=[
    "fetch/release: a released table comes back cleared",
    "release with no_clear keeps the contents"])
def test_tablepool(lib, serve):
    n = serve(server=r"""
        location /t { content_by_lua_block {
            local tablepool = require "tablepool"
            local t = tablepool.fetch("p", 2, 2)
            t[1] = "x"; t.a = 1
            tablepool.release("p", t)
            local t2 = tablepool.fetch("p", 2, 2)
            ngx.say(t2 == t, " ", next(t2) == nil)
            t2.b = 2
            tablepool.release("p", t2, true)
            local t3 = tablepool.fetch("p", 2, 2)
            ngx.say(t3 == t, " ", t3.b)
            ngx.say(tablepool.fetch("p", 0, 0) ~= t)
        } }
""")
    same(lines(n, "/t"), ["true true", "true 2", "true"])


# ---- lua-resty-string ----

def openssl_aes128_md5(key, data):
    return subprocess.run(
        ["openssl", "enc", "-aes-128-cbc", "-md", "md5", "-nosalt",
         "-pass", "pass:" + key], input=data, capture_output=True,
        check=True).stdout.hex()


@library("lua-resty-string", exercised=[
    "resty.md5/sha1/sha256/sha512 + resty.string.to_hex",
    "resty.aes: AES-128-CBC (MD5 key) as `openssl enc`, AES-256-CBC "
    "(SHA-512, salt, 5 rounds) round trip",
    "resty.random.bytes (weak and strong)"])
def test_string(lib, serve):
    n = serve(server=r"""
        location /t { content_by_lua_block {
            local str = require "resty.string"
            for _, name in ipairs{"md5", "sha1", "sha256", "sha512"} do
                local h = require("resty." .. name):new()
                h:update("hel")
                h:update("lo")
                ngx.say(name, " ", str.to_hex(h:final()))
            end
            local aes = require "resty.aes"
            local a = aes:new("AKeyForAES")
            local enc = a:encrypt("Secret message!")
            ngx.say("aes128 ", str.to_hex(enc), " ", a:decrypt(enc))
            local b = aes:new("AKeyForAES-256-CBC", "MySalt!!",
                              aes.cipher(256, "cbc"), aes.hash.sha512, 5)
            ngx.say("aes256 ", b:decrypt(b:encrypt("Secret message!")))
            local random = require "resty.random"
            ngx.say("random ", #random.bytes(16), " ",
                    #random.bytes(16, true))
        } }
""")
    want = [f"{h} {hashlib.new(h, b'hello').hexdigest()}"
            for h in ("md5", "sha1", "sha256", "sha512")]
    want += ["aes128 " + openssl_aes128_md5("AKeyForAES", b"Secret message!")
             + " Secret message!", "aes256 Secret message!", "random 16 16"]
    same(lines(n, "/t"), want)


# ---- lua-resty-hmac ----

@library("lua-resty-hmac", deps=["lua-resty-string"], exercised=[
    "HMAC-SHA1 with update() in pieces (the README's example)",
    "HMAC-SHA256 final(data, hex), reset() and reuse"])
def test_hmac(lib, serve):
    n = serve(server=r"""
        location /t { content_by_lua_block {
            local hmac = require "resty.hmac"
            local str = require "resty.string"
            local h = hmac:new("secret_key", hmac.ALGOS.SHA1)
            assert(h:update("he"))
            assert(h:update("llo"))
            ngx.say("sha1 ", str.to_hex(h:final()))
            local s = hmac:new("secret_key", hmac.ALGOS.SHA256)
            ngx.say("sha256 ", s:final("hello", true))
            assert(s:reset())
            ngx.say("sha256 ", s:final("world", true))
        } }
""")
    mac = lambda d, a: hmac.new(b"secret_key", d, a).hexdigest()  # noqa
    same(lines(n, "/t"), ["sha1 " + mac(b"hello", "sha1"),
                          "sha256 " + mac(b"hello", "sha256"),
                          "sha256 " + mac(b"world", "sha256")])


# ---- lua-resty-jwt ----

def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@library("lua-resty-jwt", deps=["lua-resty-hmac", "lua-resty-string",
                            "lua-resty-openssl"],
         exercised=[
             "jwt:sign HS256 (signature checked here with Python's hmac)",
             "jwt:verify of the README's token, of a forged one, of an "
             "expired one",
             "jwt:load_jwt"])
def test_jwt(lib, serve):
    n = serve(server=r"""
        location /sign { content_by_lua_block {
            local jwt = require "resty.jwt"
            ngx.say(jwt:sign("lua-resty-jwt", {
                header = { typ = "JWT", alg = "HS256" },
                payload = { foo = "bar" } }))
        } }
        location /verify { content_by_lua_block {
            local jwt = require "resty.jwt"
            local token = ngx.var.arg_t
            local obj = jwt:verify("lua-resty-jwt", token)
            ngx.say(tostring(obj.verified), " ", tostring(obj.payload and
                    obj.payload.foo), " ", tostring(obj.reason))
            local loaded = jwt:load_jwt(token)
            ngx.say(tostring(loaded.valid), " ", loaded.header.alg)
        } }
""")
    token = lines(n, "/sign")[0]
    head, payload, sig = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == \
        {"foo": "bar"}
    assert sig == b64url(hmac.new(b"lua-resty-jwt",
                                  f"{head}.{payload}".encode(),
                                  "sha256").digest())
    readme = ("eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJmb28iOiJiYXIifQ"
              ".VAoRL1IU0nOguxURF2ZcKR0SGKE1gCbqwyh8u2MLAyY")
    same(lines(n, "/verify?t=" + readme),
         ["true bar everything is awesome~ :p", "true HS256"])
    forged = readme[:-4] + "AAAA"
    out = lines(n, "/verify?t=" + forged)
    assert out[0].startswith("false bar ") and "signature" in out[0], out
    exp_payload = b64url(json.dumps({"foo": "bar", "exp": 1}).encode())
    exp_head = b64url(b'{"typ":"JWT","alg":"HS256"}')
    expired = f"{exp_head}.{exp_payload}"
    expired += "." + b64url(hmac.new(b"lua-resty-jwt", expired.encode(),
                                     "sha256").digest())
    out = lines(n, "/verify?t=" + expired)
    assert out[0].startswith("false bar ") and "expired" in out[0], out


# ---- lua-resty-openssl ----

@library("lua-resty-openssl", exercised=[
    "resty.openssl.digest (SHA-256), resty.openssl.hmac",
    "resty.openssl.pkey: EC P-256 key generation, sign/verify, PEM export",
    "resty.openssl.cipher AES-256-CBC round trip, resty.openssl.rand",
    "resty.openssl.x509: self-signed certificate built and read back"])
def test_openssl(lib, serve):
    n = serve(server=r"""
        location /t { content_by_lua_block {
            local openssl = require "resty.openssl"
            local str = require "resty.openssl.digest"
            local function hex(s)
                return (s:gsub(".", function(c)
                    return string.format("%02x", c:byte()) end))
            end
            local d = assert(require("resty.openssl.digest").new("sha256"))
            assert(d:update("hel"))
            ngx.say("digest ", hex(assert(d:final("lo"))))
            local h = assert(require("resty.openssl.hmac").new("k", "sha256"))
            ngx.say("hmac ", hex(assert(h:final("hello"))))
            local pkey = require "resty.openssl.pkey"
            local key = assert(pkey.new({ type = "EC",
                                          curve = "prime256v1" }))
            local sig = assert(key:sign("message"))
            ngx.say("verify ", tostring(key:verify(sig, "message")), " ",
                    tostring(key:verify(sig, "other")))
            local pem = assert(key:to_PEM("public"))
            ngx.say("pem ", pem:match("^%-%-%-%-%-BEGIN PUBLIC KEY") ~= nil)
            local c = assert(require("resty.openssl.cipher").new(
                "aes-256-cbc"))
            local k, iv = string.rep("k", 32), string.rep("i", 16)
            local enc = assert(c:encrypt(k, iv, "plain text"))
            ngx.say("cipher ", assert(c:decrypt(k, iv, enc)))
            ngx.say("rand ", #assert(require("resty.openssl.rand").bytes(8)))
            local x509 = require "resty.openssl.x509"
            local name = require("resty.openssl.x509.name").new()
            assert(name:add("CN", "example.test"))
            local cert = x509.new()
            assert(cert:set_pubkey(key))
            assert(cert:set_subject_name(name))
            assert(cert:set_issuer_name(name))
            assert(cert:set_not_before(ngx.time()))
            assert(cert:set_not_after(ngx.time() + 3600))
            assert(cert:sign(key))
            local back = assert(x509.new(cert:to_PEM()))
            ngx.say("x509 ", back:get_subject_name():find("CN").blob)
        } }
""")
    same(lines(n, "/t"), [
        "digest " + hashlib.sha256(b"hello").hexdigest(),
        "hmac " + hmac.new(b"k", b"hello", "sha256").hexdigest(),
        "verify true false", "pem true", "cipher plain text", "rand 8",
        "x509 example.test"])


# ---- lua-resty-session ----

@library("lua-resty-session", deps=["lua-resty-openssl"], exercised=[
    "the README's flow: init() in init_by_lua, new()/set_subject/set/save, "
    "start() on the next request with the cookie, modify, destroy",
    "a tampered cookie is refused"])
def test_session(lib, serve):
    http = r"""
        init_by_lua_block {
            require "resty.session".init({
                remember = true, audience = "demo",
                secret = "RaJKp8UQW1", storage = "cookie" })
        }
"""
    n = serve(http=http, server=r"""
        location /start { content_by_lua_block {
            local session = require "resty.session".new()
            session:set_subject("OpenResty Fan")
            session:set("quote", "The quick brown fox")
            local ok, err = session:save()
            ngx.say("saved ", tostring(ok), " ", tostring(err))
        } }
        location /started { content_by_lua_block {
            local session, err = require "resty.session".start()
            ngx.say(tostring(session:get_subject()), " | ",
                    tostring(session:get("quote")), " | ", tostring(err))
        } }
        location /modify { content_by_lua_block {
            local session = require "resty.session".start()
            session:set_subject("Lua Fan")
            session:set("quote", "Lorem ipsum")
            ngx.say("saved ", tostring((session:save())))
        } }
        location /destroy { content_by_lua_block {
            local ok, err = require "resty.session".destroy()
            ngx.say("destroyed ", tostring(ok), " ", tostring(err))
        } }
""")

    def cookies(r):
        sc = r.header("Set-Cookie") or []
        sc = [sc] if isinstance(sc, str) else sc
        return "; ".join(c.split(";", 1)[0] for c in sc)

    r = n.get("/start")
    assert (r.status, r.text) == (200, "saved true nil\n"), r
    jar = cookies(r)
    assert jar.startswith("session="), r.headers
    same(lines(n, "/started", headers={"Cookie": jar}),
         ["OpenResty Fan | The quick brown fox | nil"])
    r = n.get("/modify", headers={"Cookie": jar})
    assert r.text == "saved true\n", r
    jar2 = cookies(r)
    same(lines(n, "/started", headers={"Cookie": jar2}),
         ["Lua Fan | Lorem ipsum | nil"])
    # one byte changed in the middle of every cookie's value
    bad = "; ".join(
        f"{k}={v[:len(v) // 2]}{'A' if v[len(v) // 2] != 'A' else 'B'}"
        f"{v[len(v) // 2 + 1:]}"
        for k, v in (c.split("=", 1) for c in jar2.split("; ")))
    out = lines(n, "/started", headers={"Cookie": bad})
    assert out[0].startswith("nil | nil | "), out
    r = n.get("/destroy", headers={"Cookie": jar2})
    assert r.text == "destroyed true nil\n", r
    assert "Expires=Thu, 01 Jan 1970" in str(r.header("Set-Cookie")), r


# ---- lua-resty-lock ----

@library("lua-resty-lock", exercised=[
    "lock/unlock on a shared dict, a second lock timing out (timeout=0)",
    "a light thread waiting on the lock until the holder unlocks",
    "expire(), unlocking twice",
    "the README's cache-stampede pattern with a shared dict"])
def test_lock(lib, serve):
    n = serve(http="lua_shared_dict locks 1m; lua_shared_dict cache 1m;",
              server=r"""
        location /t { content_by_lua_block {
            local resty_lock = require "resty.lock"
            local lock = assert(resty_lock:new("locks"))
            ngx.say("lock ", assert(lock:lock("k")))
            local other = assert(resty_lock:new("locks", { timeout = 0 }))
            ngx.say("busy ", tostring(other:lock("k")), " ",
                    select(2, other:lock("k")))
            local waiter = ngx.thread.spawn(function()
                local l = assert(resty_lock:new("locks",
                                                { timeout = 5, step = 0.001 }))
                local elapsed, err = l:lock("k")
                return elapsed and elapsed > 0, err, l:unlock()
            end)
            -- spawn ran the waiter up to its first wait on the lock
            ngx.say("expire ", lock:expire(10))
            ngx.say("unlock ", lock:unlock())
            ngx.say("waiter ", tostring(select(2, ngx.thread.wait(waiter))),
                    " ", select(4, ngx.thread.wait(waiter)) or "")
            ngx.say("again ", tostring(lock:unlock()), " ",
                    select(2, lock:unlock()))
        } }
        location /cache { content_by_lua_block {
            local resty_lock = require "resty.lock"
            local cache = ngx.shared.cache
            local key = "my_key"
            local function get(key)
                local val = cache:get(key)
                if val then return val, "hit" end
                local lock = assert(resty_lock:new("locks"))
                local elapsed, err = lock:lock(key)
                if not elapsed then return nil, err end
                val = cache:get(key)
                if val then
                    assert(lock:unlock())
                    return val, "hit after lock"
                end
                val = "fetched"
                assert(cache:set(key, val))
                assert(lock:unlock())
                return val, "miss"
            end
            ngx.say(get(key))
            ngx.say(get(key))
        } }
""")
    same(lines(n, "/t"), ["lock 0", "busy nil timeout", "expire true",
                          "unlock 1", "waiter true ",
                          "again nil unlocked"])
    same(lines(n, "/cache"), ["fetchedmiss", "fetchedhit"])


# ---- lua-resty-mlcache ----

@library("lua-resty-mlcache", deps=["lua-resty-lock"], exercised=[
    "get() with an L3 callback: L1, L2 (shared dict) hit levels",
    "negative caching in shm_miss, callback errors, peek()",
    "set()/delete() broadcast over ipc_shm and update()",
    "a second instance with its own L1 reading L2"])
def test_mlcache(lib, serve):
    n = serve(http="""
        lua_shared_dict cache 1m; lua_shared_dict miss 1m;
        lua_shared_dict locks 1m; lua_shared_dict ipc 1m;
        init_by_lua_block {
            local mlcache = require "resty.mlcache"
            cache = assert(mlcache.new("my_cache", "cache", {
                lru_size = 500, ttl = 3600, neg_ttl = 30,
                shm_miss = "miss", shm_locks = "locks", ipc_shm = "ipc" }))
        }
""", server=r"""
        location /t { content_by_lua_block {
            local calls = 0
            local function fetch(v)
                calls = calls + 1
                return v
            end
            local v, err, hit = cache:get("a", nil, fetch, "va")
            ngx.say("a ", v, " ", hit)
            v, err, hit = cache:get("a", nil, fetch, "other")
            ngx.say("a ", v, " ", hit, " calls ", calls)
            v, err, hit = cache:get("none", nil, fetch, nil)
            ngx.say("none ", tostring(v), " ", hit)
            v, err, hit = cache:get("none", nil, fetch, "x")
            ngx.say("none ", tostring(v), " ", hit, " calls ", calls)
            v, err = cache:get("bad", nil, function() error("boom") end)
            ngx.say("error ", tostring(v), " ",
                    tostring(err and err:find("boom", 1, true) ~= nil))
            local ttl, perr, pv = cache:peek("a")
            ngx.say("peek ", ttl > 3500, " ", pv)
            assert(cache:set("b", nil, 42))
            ngx.say("set ", (cache:get("b")))
            assert(cache:delete("b"))
            v, err, hit = cache:get("b", nil, fetch, "refetched")
            ngx.say("deleted ", v, " ", hit)
            ngx.say("update ", tostring(cache:update()))
        } }
        location /l2 { content_by_lua_block {
            local mlcache = require "resty.mlcache"
            -- its own L1 (the lru option): the value comes from the shm
            local fresh = assert(mlcache.new("my_cache", "cache", {
                shm_miss = "miss", shm_locks = "locks", ipc_shm = "ipc",
                lru = require("resty.lrucache").new(10) }))
            local v, err, hit = fresh:get("a", nil, error)
            ngx.say("l2 ", v, " ", hit)
        } }
""")
    same(lines(n, "/t"), ["a va 3", "a va 1 calls 1", "none nil 3",
                          "none nil 1 calls 2", "error nil true",
                          "peek true va", "set 42", "deleted refetched 3",
                          "update true"])
    same(lines(n, "/l2"), ["l2 va 2"])


# ---- lua-resty-limit-traffic ----

@library("lua-resty-limit-traffic", exercised=[
    "resty.limit.req: delay within the burst, rejection above it",
    "resty.limit.count: remaining count, rejection, uncommitted checks",
    "resty.limit.conn: incoming/leaving, is_committed",
    "resty.limit.traffic.combine"])
def test_limit_traffic(lib, serve):
    n = serve(http="""
        lua_shared_dict req_store 1m; lua_shared_dict count_store 1m;
        lua_shared_dict conn_store 1m;
""", server=r"""
        location /t { content_by_lua_block {
            local limit_req = require "resty.limit.req"
            local limit_count = require "resty.limit.count"
            local limit_conn = require "resty.limit.conn"
            local limit_traffic = require "resty.limit.traffic"
            local function p(label, a, b)
                if type(a) == "number" then a = string.format("%.3f", a) end
                if type(b) == "number" then b = string.format("%.3f", b) end
                ngx.say(label, " ", tostring(a), " ", tostring(b))
            end
            local req = assert(limit_req.new("req_store", 1, 1))
            p("req", req:incoming("k", true))
            p("req", req:incoming("k", true))
            p("req", req:incoming("k", true))
            p("req uncommitted", req:incoming("other", false))
            p("req uncommitted", req:incoming("other", false))
            local cnt = assert(limit_count.new("count_store", 2, 60))
            p("count", cnt:incoming("k", true))
            p("count", cnt:incoming("k", true))
            p("count", cnt:incoming("k", true))
            local conn = assert(limit_conn.new("conn_store", 1, 0, 0.5))
            p("conn", conn:incoming("k", true))
            ngx.say("committed ", tostring(conn:is_committed()))
            p("conn", conn:incoming("k", true))
            p("leaving", conn:leaving("k", 0.2))
            p("conn", conn:incoming("k", true))
            local r2 = assert(limit_req.new("req_store", 100, 10))
            local c2 = assert(limit_conn.new("conn_store", 100, 10, 0.5))
            p("combine", limit_traffic.combine({ r2, c2 }, { "x", "y" }))
        } }
""")
    same(lines(n, "/t"), [
        "req 0.000 0.000", "req 1.000 1.000", "req nil rejected",
        "req uncommitted 0.000 0.000", "req uncommitted 0.000 0.000",
        "count 0.000 1.000", "count 0.000 0.000", "count nil rejected",
        "conn 0.000 1.000", "committed true", "conn nil rejected",
        "leaving 0.000 nil", "conn 0.000 1.000",
        "combine 0.000 nil"])


# ---- lua-resty-redis ----

REDIS = r"""
    location /t { content_by_lua_block {
        local redis = require "resty.redis"
        local red = redis:new()
        red:set_timeouts(2000, 2000, 2000)
        local ok, err = red:connect("127.0.0.1", @PORT@)
        if not ok then ngx.say("failed to connect: ", err) return end
        ngx.say("set ", (red:set("dog", "an animal")))
        ngx.say("get ", (red:get("dog")))
        ngx.say("missing ", tostring(red:get("cat") == ngx.null))
        red:init_pipeline()
        red:set("cat", "Marry")
        red:set("horse", "Bob")
        red:get("cat")
        red:get("horse")
        local results = assert(red:commit_pipeline())
        ngx.say("pipeline ", table.concat(results, ","))
        ngx.say("multi ", (red:multi()))
        ngx.say("queued ", (red:incr("n")))
        ngx.say("queued ", (red:incr("n")))
        ngx.say("exec ", table.concat(red:exec(), ","))
        red:hmset("h", "a", "1", "b", "2")
        local h = red:array_to_hash(red:hgetall("h"))
        ngx.say("hash ", h.a, h.b)
        local res, err = red:hget("dog", "x")
        ngx.say("wrongtype ", tostring(res), " ", err:sub(1, 9))
        ngx.say("eval ", (red:eval("return ARGV[1] .. KEYS[1]", 1, "k", "v")))
        ngx.say("reused ", red:get_reused_times())
        ngx.say("keepalive ", (red:set_keepalive(10000, 10)))
    } }
    location /again { content_by_lua_block {
        local redis = require "resty.redis"
        local red = redis:new()
        assert(red:connect("127.0.0.1", @PORT@))
        ngx.say("reused ", red:get_reused_times() > 0)
        ngx.say("get ", (red:get("dog")))
        red:close()
    } }
    location /timer { content_by_lua_block {
        -- the common pattern of writing to redis after the response
        assert(ngx.timer.at(0, function()
            local redis = require "resty.redis"
            local red = redis:new()
            assert(red:connect("127.0.0.1", @PORT@))
            ngx.log(ngx.WARN, "TIMER ", (red:incr("timer")), " ",
                    (red:get("dog")))
            red:set_keepalive()
        end))
        ngx.say("scheduled")
    } }
    location /pubsub { content_by_lua_block {
        local redis = require "resty.redis"
        local sub, pub = redis:new(), redis:new()
        assert(sub:connect("127.0.0.1", @PORT@))
        assert(pub:connect("127.0.0.1", @PORT@))
        local res = assert(sub:subscribe("ch"))
        ngx.say("subscribe ", table.concat(res, ","))
        ngx.say("publish ", (pub:publish("ch", "hello")))
        res = assert(sub:read_reply())
        ngx.say("message ", table.concat(res, ","))
        res = assert(sub:unsubscribe("ch"))
        ngx.say("unsubscribe ", table.concat(res, ","))
        sub:close()
        pub:close()
    } }
"""


@library("lua-resty-redis", exercised=[
    "connect, set/get, ngx.null for a missing key, error replies",
    "pipeline, MULTI/EXEC, hmset/hgetall + array_to_hash, EVAL",
    "set_keepalive and get_reused_times on the next request",
    "subscribe/publish/read_reply/unsubscribe",
    "a call from an ngx.timer.at callback"])
def test_redis(lib, serve, redis_server):
    n = serve(server=REDIS.replace("@PORT@", str(redis_server)))
    same(lines(n, "/t"), [
        "set OK", "get an animal", "missing true",
        "pipeline OK,OK,Marry,Bob", "multi OK", "queued QUEUED",
        "queued QUEUED", "exec 1,2", "hash 12", "wrongtype false WRONGTYPE",
        "eval vk", "reused 0", "keepalive 1"])
    same(lines(n, "/again"), ["reused true", "get an animal"])
    same(lines(n, "/timer"), ["scheduled"])
    n.wait_log(r"TIMER 1 an animal")
    same(lines(n, "/pubsub"), ["subscribe subscribe,ch,1", "publish 1",
                               "message message,ch,hello",
                               "unsubscribe unsubscribe,ch,0"])


# ---- lua-resty-memcached ----

MEMCACHED = r"""
    location /t { content_by_lua_block {
        local memcached = require "resty.memcached"
        local memc = assert(memcached:new())
        memc:set_timeout(2000)
        assert(memc:connect("127.0.0.1", @PORT@))
        ngx.say("flush ", (memc:flush_all()))
        ngx.say("set ", (memc:set("dog", 32)))
        local v, flags = memc:get("dog")
        ngx.say("get ", v, " ", flags)
        ngx.say("missing ", tostring(memc:get("cat")))
        ngx.say("add ", tostring(memc:add("dog", 1)), " ",
                select(2, memc:add("dog", 1)))
        assert(memc:set("n", 1, 0, 7))
        ngx.say("incr ", memc:incr("n", 41), " flags ",
                select(2, memc:get("n")))
        assert(memc:append("dog", "!"))
        assert(memc:prepend("dog", "<"))
        local res = memc:get({ "dog", "n", "none" })
        ngx.say("multi ", res.dog[1], " ", res.n[1], " ", tostring(res.none))
        local v2, _, cas = memc:gets("dog")
        ngx.say("cas ", (memc:cas("dog", "cased", cas)), " ",
                (memc:get("dog")))
        ngx.say("delete ", memc:delete("dog"), " ", tostring(memc:get("dog")))
        ngx.say("version ", (memc:version()):match("^%d+%.%d+") ~= nil)
        ngx.say("keepalive ", (memc:set_keepalive(10000, 10)))
    } }
    location /again { content_by_lua_block {
        local memcached = require "resty.memcached"
        local memc = assert(memcached:new())
        assert(memc:connect("127.0.0.1", @PORT@))
        ngx.say("reused ", memc:get_reused_times() > 0, " ", (memc:get("n")))
        memc:close()
    } }
"""


@library("lua-resty-memcached", exercised=[
    "connect, flush_all, set/get with flags, add on an existing key",
    "incr, append/prepend, multi-key get, gets/cas, delete, version",
    "set_keepalive and get_reused_times on the next request"])
def test_memcached(lib, serve, memcached_server):
    n = serve(server=MEMCACHED.replace("@PORT@", str(memcached_server)))
    same(lines(n, "/t"), [
        "flush 1", "set 1", "get 32 0", "missing nil", "add nil NOT_STORED",
        "incr 42 flags 7", "multi <32! 42 nil", "cas 1 cased",
        "delete 1 nil", "version true", "keepalive 1"])
    same(lines(n, "/again"), ["reused true 42"])


# ---- lua-resty-dns ----

@library("lua-resty-dns", exercised=[
    "resolver:new with a nameserver on loopback, query() for A records",
    "NXDOMAIN as answers.errcode/errstr, an empty AAAA answer",
    "the query the server received (name and type)"])
def test_dns(lib, serve):
    dns = Dns(lambda name: "192.0.2.7" if name == "www.example.test"
              else None)
    try:
        n = serve(server=r"""
            location /t { content_by_lua_block {
                local resolver = require "resty.dns.resolver"
                local r = assert(resolver:new{
                    nameservers = { { "127.0.0.1", @PORT@ } },
                    retrans = 2, timeout = 2000 })
                local answers = assert(r:query("www.example.test", nil, {}))
                for _, ans in ipairs(answers) do
                    ngx.say(ans.name, " ", ans.address, " type ", ans.type,
                            " class ", ans.class, " ttl ", ans.ttl)
                end
                answers = assert(r:query("missing.example.test"))
                ngx.say("nx ", answers.errcode, " ", answers.errstr)
                answers = assert(r:query("www.example.test",
                                         { qtype = r.TYPE_AAAA }))
                ngx.say("aaaa ", #answers, " ", tostring(answers.errcode))
            } }
""".replace("@PORT@", str(dns.port)))
        same(lines(n, "/t"), [
            "www.example.test 192.0.2.7 type 1 class 1 ttl 0",
            "nx 3 name error", "aaaa 0 nil"])
        assert dns.queries == [("www.example.test", 1),
                               ("missing.example.test", 1),
                               ("www.example.test", 28)]
    finally:
        dns.close()


# ---- lua-resty-http ----

HTTP = r"""
    location /up { content_by_lua_block {
        ngx.req.read_body()
        ngx.header["X-Up"] = "yes"
        ngx.print(ngx.req.get_method(), " ", ngx.var.args, " ",
                tostring(ngx.req.get_headers()["x-t"]), " ",
                tostring(ngx.req.get_body_data()))
    } }
    location /chunked { content_by_lua_block {
        for i = 1, 3 do
            ngx.print(string.rep(tostring(i), 1000))
            ngx.flush(true)
        end
    } }
    location /t { content_by_lua_block {
        local http = require "resty.http"
        local httpc = http.new()
        local res, err = httpc:request_uri(
            "http://127.0.0.1:{port}/up?x=1", {
                method = "POST", body = "abc",
                headers = { ["X-T"] = "v",
                            ["Content-Type"] = "text/plain" } })
        if not res then ngx.say("request_uri failed: ", err) return end
        ngx.say("uri ", res.status, " ", res.headers["X-Up"], " ", res.body)
        httpc = http.new()
        httpc:set_timeouts(2000, 2000, 2000)
        assert(httpc:connect({ scheme = "http", host = "127.0.0.1",
                               port = {port} }))
        res = assert(httpc:request({ path = "/chunked" }))
        ngx.say("stream ", res.status, " ",
                res.headers["Transfer-Encoding"])
        local reader, total, chunks = res.body_reader, 0, 0
        repeat
            local chunk, err = reader(700)
            if err then ngx.say("read failed: ", err) return end
            if chunk then
                total = total + #chunk
                chunks = chunks + 1
                assert(#chunk <= 700)
            end
        until not chunk
        ngx.say("body ", total, " in more than 3: ", chunks > 3)
        assert(httpc:set_keepalive())
        httpc = http.new()
        assert(httpc:connect({ scheme = "http", host = "127.0.0.1",
                               port = {port} }))
        ngx.say("reused ", httpc:get_reused_times() > 0)
        local responses = assert(httpc:request_pipeline({
            { path = "/up?p=1" }, { path = "/up?p=2" } }))
        for _, r in ipairs(responses) do
            ngx.say("pipeline ", r.status, " ", r:read_body())
        end
        httpc:close()
        local parsed = assert(httpc:parse_uri("http://example.test:81/a?b=c"))
        ngx.say("parse ", table.concat(parsed, " "))
    } }
"""


@library("lua-resty-http", deps=["lua-resty-string"], exercised=[
    "request_uri POST with headers and body to a loopback upstream",
    "connect/request with a streamed chunked body (body_reader)",
    "set_keepalive and get_reused_times, request_pipeline, parse_uri"])
def test_http(lib, serve):
    n = serve(server=HTTP)
    same(lines(n, "/t"), [
        "uri 200 yes POST x=1 v abc", "stream 200 chunked",
        "body 3000 in more than 3: true", "reused true",
        "pipeline 200 GET p=1 nil nil", "pipeline 200 GET p=2 nil nil",
        "parse http example.test 81 /a?b=c"])


# ---- lua-resty-websocket ----

WEBSOCKET = r"""
    location /ws {
        lua_socket_log_errors off;
        content_by_lua_block {
            local server = require "resty.websocket.server"
            local wb, err = server:new{ timeout = 5000,
                                        max_payload_len = 65535 }
            if not wb then
                ngx.log(ngx.ERR, "failed to new websocket: ", err)
                return ngx.exit(444)
            end
            while true do
                local data, typ, err = wb:recv_frame()
                if not data and not typ then
                    ngx.log(ngx.ERR, "failed to receive a frame: ", err)
                    return ngx.exit(444)
                end
                if typ == "close" then
                    wb:send_close(1000, "bye " .. tostring(err))
                    return
                elseif typ == "ping" then
                    assert(wb:send_pong(data))
                elseif typ == "text" then
                    assert(wb:send_text("echo " .. data))
                elseif typ == "binary" then
                    assert(wb:send_binary(data:reverse()))
                end
            end
        }
    }
    location /t { content_by_lua_block {
        local client = require "resty.websocket.client"
        local wb = assert(client:new{ timeout = 5000 })
        local ok, err = wb:connect("ws://127.0.0.1:{port}/ws")
        if not ok then ngx.say("failed to connect: ", err) return end
        assert(wb:send_text("hello"))
        ngx.say(table.concat({ wb:recv_frame() }, " "))
        assert(wb:send_binary("\1\2\3"))
        local data, typ = wb:recv_frame()
        ngx.say(typ, " ", data:byte(1, -1))
        local big = string.rep("x", 70000)
        assert(wb:send_text(big:sub(1, 1000)))
        data, typ = wb:recv_frame()
        ngx.say(typ, " ", #data)
        assert(wb:send_ping("p1"))
        ngx.say(table.concat({ wb:recv_frame() }, " "))
        assert(wb:send_close(1000, "done"))
        local data, typ, code = wb:recv_frame()
        ngx.say(typ, " ", data, " ", code)
    } }
"""


@library("lua-resty-websocket", exercised=[
    "resty.websocket.server echo endpoint and resty.websocket.client "
    "talking to it over loopback",
    "text and binary frames, ping/pong, close with code and reason"])
def test_websocket(lib, serve):
    n = serve(server=WEBSOCKET)
    same(lines(n, "/t"), ["echo hello text", "binary 321", "text 1005",
                          "p1 pong", "close bye 1000 1000"])


# ---- lua-resty-upload ----

@library("lua-resty-upload", exercised=[
    "a multipart/form-data POST read with form:read() in 5-byte chunks",
    "header, body, part_end and eof events; a file part and a field"])
def test_upload(lib, serve):
    n = serve(server=r"""
        location /t { content_by_lua_block {
            local upload = require "resty.upload"
            local cjson = require "cjson"
            local form, err = upload:new(5)
            if not form then ngx.say("failed to new upload: ", err) return end
            form:set_timeout(2000)
            while true do
                local typ, res, err = form:read()
                if not typ then ngx.say("failed to read: ", err) return end
                ngx.say("read: ", cjson.encode({ typ, res }))
                if typ == "eof" then break end
            end
        } }
""")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file1"; '
            'filename="a.txt"\r\nContent-Type: text/plain\r\n\r\n'
            "Hello, world, this is a file\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="test"\r\n\r\n'
            "value\r\n"
            f"--{boundary}--\r\n").encode()
    out = lines(n, "/t", method="POST", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}"})
    events = [json.loads(ln[len("read: "):]) for ln in out]
    parts, cur = [], None
    for ev in events:
        typ, res = (ev + [None])[:2]
        if typ == "header":
            cur = cur or {"headers": [], "body": ""}
            cur["headers"].append(res)
        elif typ == "body":
            assert len(res) <= 5, res
            cur["body"] += res
        elif typ == "part_end":
            parts.append(cur)
            cur = None
        else:
            assert typ == "eof" and res is None, (typ, res)
    assert events[-1][0] == "eof"
    assert parts == [
        {"headers": [["Content-Disposition",
                      'form-data; name="file1"; filename="a.txt"',
                      'Content-Disposition: form-data; name="file1"; '
                      'filename="a.txt"'],
                     ["Content-Type", "text/plain",
                      "Content-Type: text/plain"]],
         "body": "Hello, world, this is a file"},
        {"headers": [["Content-Disposition", 'form-data; name="test"',
                      'Content-Disposition: form-data; name="test"']],
         "body": "value"}], parts


# ---- lua-resty-signal ----

@library("lua-resty-signal", exercised=[
    "signum() for names, kill(pid, 'NONE') as a liveness probe",
    "kill(pid, 'TERM') ending a process started here, kill of a pid "
    "that does not exist"])
def test_signal(lib, serve, restysignal):
    # nginx's workers run as nobody: so does the process they signal
    victim = subprocess.Popen(["sleep", "60"], user="nobody")
    try:
        n = serve(cpath=restysignal, server=r"""
            location /t { content_by_lua_block {
                local signal = require "resty.signal"
                local pid = tonumber(ngx.var.arg_pid)
                ngx.say("signum ", signal.signum("TERM"), " ",
                        signal.signum("KILL"), " ",
                        tostring(signal.signum("NOPE")))
                ngx.say("alive ", tostring(signal.kill(pid, "NONE")))
                ngx.say("term ", tostring(signal.kill(pid, "TERM")))
                ngx.say("none ", tostring(signal.kill(2147483647, "NONE")),
                        " ", select(2, signal.kill(2147483647, "NONE")))
            } }
""")
        same(lines(n, f"/t?pid={victim.pid}"), [
            "signum 15 9 nil", "alive true", "term true",
            "none nil No such process"])
        assert victim.wait(10) == -15
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()


# ---- lua-resty-shell ----

@library("lua-resty-shell", deps=["lua-resty-signal", "lua-tablepool"],
         exercised=[
             "shell.run of a command line: stdout, stderr, exit status",
             "stdin fed to the command, the timeout killing a sleeper"])
def test_shell(lib, serve, restysignal):
    n = serve(cpath=restysignal, server=r"""
        location /t { content_by_lua_block {
            local shell = require "resty.shell"
            local ok, stdout, stderr, reason, status = shell.run(
                [[echo hello; echo oops >&2; exit 3]], nil, 5000, 4096)
            ngx.say(tostring(ok), " ", stdout:gsub("\n", "\\n"), " ",
                    stderr:gsub("\n", "\\n"), " ", reason, " ", status)
            ok, stdout = shell.run({ "cat" }, "fed via stdin", 5000)
            ngx.say(tostring(ok), " ", stdout)
            ok, stdout, stderr, reason = shell.run("sleep 10", nil, 100)
            ngx.say(tostring(ok), " ", reason)
        } }
""")
    same(lines(n, "/t"), ["false hello\\n oops\\n exit 3",
                          "true fed via stdin",
                          # shell.lua returns nil (not false) here
                          "nil failed to wait for process: timeout"])
