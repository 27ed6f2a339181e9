// ngx.shared.DICT: the Lua side of lua_shared_dict zones.
//
// A dictionary object is a table holding its Zone as a light userdata at
// [1], with a shared metatable whose __index holds the methods, as in
// lua-nginx-module. Methods check that [1] is one of this configuration's
// zones, so a forged table cannot make them touch arbitrary memory.
//
// The hot path (get/set/incr) allocates nothing: keys are read in place,
// values are copied out of the zone into one per-process buffer while the
// lock is held, and only pushed to Lua once it is released (a Lua memory
// error must never unwind past a held shared-memory lock).

#include <cmath>
#include <cstring>

#include "api/api.hpp"
#include "api/ffi_abi.hpp"
#include "security/sandbox.hpp"
#include "shdict/zone.hpp"

namespace luaguard::api {

namespace {

using shdict::Status;
using shdict::StoreOp;
using shdict::Value;
using shdict::VType;

char kMetaKey;
// Per thread: the VMs of ngx.run_worker_thread use dictionaries from the
// threads of nginx's pools while the worker uses them too.
thread_local shdict::Buffer g_buf;

// `p` when it is one of this configuration's initialised zones, else null.
shdict::Zone *knownZone(void *p)
{
    MainConf *mcf = mainConf();
    shdict::Zones *zs = mcf ? shdict::zones(mcf) : nullptr;
    if (p == nullptr || zs == nullptr) {
        return nullptr;
    }
    auto **elts = static_cast<shdict::Zone **>(zs->list.elts);
    for (ngx_uint_t i = 0; i < zs->list.nelts; i++) {
        if (elts[i] == p) {
            return elts[i]->ready ? elts[i] : nullptr;
        }
    }
    return nullptr;
}

// A dict object is a userdata holding its zone pointer: unlike a table it
// cannot be changed by one request under the feet of the others, and the
// sandbox hands it out as it is.
shdict::Zone *checkZone(lua_State *L, bool write)
{
    if (lua_type(L, 1) == LUA_TUSERDATA && lua_getmetatable(L, 1)) {
        lua_pushlightuserdata(L, &kMetaKey);
        lua_rawget(L, LUA_REGISTRYINDEX);
        bool ours = lua_rawequal(L, -1, -2);
        lua_pop(L, 2);
        if (ours) {
            auto *z = knownZone(*static_cast<void **>(lua_touserdata(L, 1)));
            if (z != nullptr) {
                // The location's lua_sandbox may limit which dicts its code
                // uses, and how.
                sandbox::requireShared(
                    L, std::string_view(reinterpret_cast<char *>(z->name.data),
                                        z->name.len),
                    write);
                return z;
            }
        }
    }
    luaL_error(L, "bad \"zone\" argument");
    return nullptr;
}

// Reads the key argument (index 2). Returns null with *err set for the
// documented "nil key" / "empty key" / "key too long" results. Other types
// are converted as tostring() would.
const char *keyArg(lua_State *L, size_t *len, const char **err)
{
    const char *k;
    switch (lua_type(L, 2)) {
    case LUA_TSTRING:
        k = lua_tolstring(L, 2, len);
        break;
    case LUA_TNIL:
    case LUA_TNONE:
        *err = "nil key";
        return nullptr;
    case LUA_TNUMBER:
        k = lua_tolstring(L, 2, len);    // converts the slot in place
        break;
    case LUA_TBOOLEAN:
        k = lua_toboolean(L, 2) ? "true" : "false";
        *len = std::strlen(k);
        break;
    default:
        if (!luaL_callmeta(L, 2, "__tostring")) {
            lua_pushfstring(L, "%s: %p", luaL_typename(L, 2),
                            lua_topointer(L, 2));
        }
        lua_replace(L, 2);
        k = lua_tolstring(L, 2, len);
        if (k == nullptr) {
            *err = "bad key";
            return nullptr;
        }
        break;
    }
    if (*len == 0) {
        *err = "empty key";
        return nullptr;
    }
    if (*len > shdict::kMaxKeyLen) {
        *err = "key too long";
        return nullptr;
    }
    return k;
}

// The list methods, get_keys and flush_expired check their argument count
// first, with lua-nginx-module's messages.
void checkArgs(lua_State *L, int n)
{
    int got = lua_gettop(L);
    if (got != n) {
        luaL_error(L, "expecting %d arguments, but only seen %d", n, got);
    }
}

void checkArgs12(lua_State *L)
{
    int got = lua_gettop(L);
    if (got < 1 || got > 2) {
        luaL_error(L, "expecting 1 or 2 argument(s), but saw %d", got);
    }
}

int nilErr(lua_State *L, const char *err)
{
    lua_pushnil(L);
    lua_pushstring(L, err);
    return 2;
}

#define LG_KEY(L, k, klen)                                  \
    size_t klen;                                            \
    const char *key_err_ = nullptr;                         \
    const char *k = keyArg(L, &klen, &key_err_);            \
    if (k == nullptr) {                                     \
        return nilErr(L, key_err_);                         \
    }

// A relative expiry in seconds -> absolute milliseconds (0: never).
uint64_t absExpiry(double sec, uint64_t now)
{
    if (!(sec > 0)) {
        return 0;
    }
    double ms = sec * 1000;
    if (ms >= 9.0e15) {
        return UINT64_MAX;
    }
    auto rel = static_cast<uint64_t>(ms);
    return rel == 0 ? 0 : now + rel;
}

// Flags are a C int in lua-nginx-module: keep the low 32 bits.
int32_t toFlags(double d)
{
    if (!(d > -9.0e18 && d < 9.0e18)) {
        return 0;
    }
    return static_cast<int32_t>(static_cast<uint32_t>(static_cast<int64_t>(d)));
}

void pushValue(lua_State *L, const Value &v)
{
    switch (v.type) {
    case VType::Boolean:
        lua_pushboolean(L, v.boolean);
        break;
    case VType::Number:
        lua_pushnumber(L, v.number);
        break;
    case VType::String:
        lua_pushlstring(L, v.str, v.len);
        break;
    default:
        lua_pushnil(L);
        break;
    }
}

// Reads a value argument; false for types a dictionary cannot hold.
bool valueArg(lua_State *L, int idx, Value *v, bool allow_bool_nil)
{
    switch (lua_type(L, idx)) {
    case LUA_TSTRING:
        v->type = VType::String;
        v->str = lua_tolstring(L, idx, &v->len);
        return true;
    case LUA_TNUMBER:
        v->type = VType::Number;
        v->number = lua_tonumber(L, idx);
        return true;
    case LUA_TBOOLEAN:
        v->type = VType::Boolean;
        v->boolean = lua_toboolean(L, idx);
        return allow_bool_nil;
    case LUA_TNIL:
    case LUA_TNONE:
        v->type = VType::None;
        return allow_bool_nil;
    default:
        return false;
    }
}

int getCommon(lua_State *L, bool stale_ok)
{
    shdict::Zone *z = checkZone(L, false);
    LG_KEY(L, k, klen);
    Value v;
    int32_t flags = 0;
    bool stale = false;
    Status s = z->store.get(k, klen, shdict::nowMs(), stale_ok, &v, &flags,
                            &stale, &g_buf);
    if (s == Status::NotFound) {
        lua_pushnil(L);
        return 1;
    }
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    pushValue(L, v);
    if (!stale_ok) {
        if (flags == 0) {
            return 1;
        }
        lua_pushinteger(L, flags);
        return 2;
    }
    if (flags) {
        lua_pushinteger(L, flags);
    } else {
        lua_pushnil(L);
    }
    lua_pushboolean(L, stale);
    return 3;
}

int dictGet(lua_State *L)
{
    return getCommon(L, false);
}

int dictGetStale(lua_State *L)
{
    return getCommon(L, true);
}

int storeCommon(lua_State *L, StoreOp op, bool safe)
{
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    Value v;
    if (!valueArg(L, 3, &v, true)) {
        return nilErr(L, "bad value type");
    }
    double exptime = 0;
    int t = lua_type(L, 4);
    if (t != LUA_TNONE && t != LUA_TNIL) {
        if (t != LUA_TNUMBER || lua_tonumber(L, 4) < 0) {
            return luaL_error(L, "bad \"exptime\" argument");
        }
        exptime = lua_tonumber(L, 4);
    }
    int32_t flags = 0;
    t = lua_type(L, 5);
    if (t != LUA_TNONE && t != LUA_TNIL) {
        if (t != LUA_TNUMBER) {
            return luaL_error(L, "bad \"flags\" argument");
        }
        flags = toFlags(lua_tonumber(L, 5));
    }
    if (v.type == VType::None && op != StoreOp::Set) {
        lua_pushboolean(L, 0);
        lua_pushliteral(L, "attempt to add or replace nil values");
        lua_pushboolean(L, 0);
        return 3;
    }

    uint64_t now = shdict::nowMs();
    bool forcible = false;
    Status s = z->store.store(op, k, klen, v, absExpiry(exptime, now), flags,
                              safe, now, &forcible);
    if (s == Status::Ok) {
        lua_pushboolean(L, 1);
        lua_pushnil(L);
    } else {
        lua_pushboolean(L, 0);
        lua_pushstring(L, shdict::statusText(s));
    }
    lua_pushboolean(L, forcible);
    return 3;
}

int dictSet(lua_State *L)
{
    return storeCommon(L, StoreOp::Set, false);
}

int dictSafeSet(lua_State *L)
{
    return storeCommon(L, StoreOp::Set, true);
}

int dictAdd(lua_State *L)
{
    return storeCommon(L, StoreOp::Add, false);
}

int dictSafeAdd(lua_State *L)
{
    return storeCommon(L, StoreOp::Add, true);
}

int dictReplace(lua_State *L)
{
    return storeCommon(L, StoreOp::Replace, false);
}

int dictDelete(lua_State *L)
{
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    z->store.remove(k, klen);
    // Same results as set(key, nil).
    lua_pushboolean(L, 1);
    lua_pushnil(L);
    lua_pushboolean(L, 0);
    return 3;
}

int dictIncr(lua_State *L)
{
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    if (!lua_isnumber(L, 3)) {
        return luaL_error(L, "bad \"value\" argument: number expected, "
                          "got %s", luaL_typename(L, 3));
    }
    double delta = lua_tonumber(L, 3);

    bool has_init = false;
    double init = 0;
    int t = lua_type(L, 4);
    if (t != LUA_TNONE && t != LUA_TNIL) {
        if (t != LUA_TNUMBER) {
            return luaL_error(L, "bad init arg: number expected, got %s",
                              luaL_typename(L, 4));
        }
        has_init = true;
        init = lua_tonumber(L, 4);
    }
    double init_ttl = 0;
    t = lua_type(L, 5);
    if (t != LUA_TNONE && t != LUA_TNIL) {
        if (!has_init) {
            return luaL_error(L, "must provide \"init\" when providing "
                              "\"init_ttl\"");
        }
        if (t != LUA_TNUMBER) {
            return luaL_error(L, "bad init_ttl arg: number expected, got %s",
                              luaL_typename(L, 5));
        }
        init_ttl = lua_tonumber(L, 5);
        if (init_ttl < 0) {
            return luaL_error(L, "bad \"init_ttl\" argument");
        }
    }

    uint64_t now = shdict::nowMs();
    bool forcible = false;
    double out = 0;
    Status s = z->store.incr(k, klen, delta, has_init, init,
                             absExpiry(init_ttl, now), now, &out, &forcible);
    if (s != Status::Ok) {
        lua_pushnil(L);
        lua_pushstring(L, shdict::statusText(s));
        if (s != Status::NoMemory) {
            return 2;
        }
        lua_pushboolean(L, forcible);
        return 3;
    }
    lua_pushnumber(L, out);
    if (!has_init) {
        return 1;
    }
    lua_pushnil(L);
    lua_pushboolean(L, forcible);
    return 3;
}

int pushCommon(lua_State *L, bool left)
{
    checkArgs(L, 3);
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    Value v;
    if (!valueArg(L, 3, &v, false)) {
        return nilErr(L, "bad value type");
    }
    uint64_t len = 0;
    Status s = z->store.push(k, klen, left, v, shdict::nowMs(), &len);
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    lua_pushnumber(L, static_cast<lua_Number>(len));
    return 1;
}

int dictLpush(lua_State *L)
{
    return pushCommon(L, true);
}

int dictRpush(lua_State *L)
{
    return pushCommon(L, false);
}

int popCommon(lua_State *L, bool left)
{
    checkArgs(L, 2);
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    Value v;
    Status s = z->store.pop(k, klen, left, shdict::nowMs(), &v, &g_buf);
    if (s == Status::NotFound) {
        lua_pushnil(L);
        return 1;
    }
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    pushValue(L, v);
    return 1;
}

int dictLpop(lua_State *L)
{
    return popCommon(L, true);
}

int dictRpop(lua_State *L)
{
    return popCommon(L, false);
}

int dictLlen(lua_State *L)
{
    checkArgs(L, 2);
    shdict::Zone *z = checkZone(L, false);
    LG_KEY(L, k, klen);
    uint64_t len = 0;
    Status s = z->store.llen(k, klen, shdict::nowMs(), &len);
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    lua_pushnumber(L, static_cast<lua_Number>(len));
    return 1;
}

int dictTtl(lua_State *L)
{
    shdict::Zone *z = checkZone(L, false);
    LG_KEY(L, k, klen);
    int64_t ms = 0;
    Status s = z->store.ttl(k, klen, shdict::nowMs(), &ms);
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    lua_pushnumber(L, static_cast<lua_Number>(ms) / 1000);
    return 1;
}

int dictExpire(lua_State *L)
{
    shdict::Zone *z = checkZone(L, true);
    LG_KEY(L, k, klen);
    if (lua_type(L, 3) != LUA_TNUMBER) {
        return luaL_error(L, "bad \"exptime\" argument");
    }
    // A negative or zero exptime removes the expiry, as the reference
    // implementation does.
    uint64_t now = shdict::nowMs();
    Status s = z->store.expire(k, klen, absExpiry(lua_tonumber(L, 3), now));
    if (s != Status::Ok) {
        return nilErr(L, shdict::statusText(s));
    }
    lua_pushboolean(L, 1);
    return 1;
}

int dictFlushAll(lua_State *L)
{
    shdict::Zone *z = checkZone(L, true);
    z->store.flushAll();
    return 0;
}

int dictFlushExpired(lua_State *L)
{
    checkArgs12(L);
    shdict::Zone *z = checkZone(L, true);
    lua_Integer max = luaL_optinteger(L, 2, 0);
    uint64_t n = z->store.flushExpired(
        shdict::nowMs(), max > 0 ? static_cast<uint64_t>(max) : 0);
    lua_pushnumber(L, static_cast<lua_Number>(n));
    return 1;
}

int dictGetKeys(lua_State *L)
{
    checkArgs12(L);
    shdict::Zone *z = checkZone(L, false);
    lua_Integer max = luaL_optinteger(L, 2, 1024);
    uint64_t n = 0;
    if (!z->store.keys(shdict::nowMs(), max > 0 ? static_cast<uint64_t>(max)
                                                : 0, &g_buf, &n))
    {
        return luaL_error(L, "no memory");
    }
    lua_createtable(L, static_cast<int>(n < 1u << 24 ? n : 1u << 24), 0);
    const char *p = g_buf.data();
    for (uint64_t i = 0; i < n; i++) {
        uint16_t len;
        std::memcpy(&len, p, sizeof(len));
        p += sizeof(len);
        lua_pushlstring(L, p, len);
        lua_rawseti(L, -2, static_cast<int>(i + 1));
        p += len;
    }
    return 1;
}

int dictCapacity(lua_State *L)
{
    shdict::Zone *z = checkZone(L, false);
    lua_pushnumber(L, static_cast<lua_Number>(z->shm_zone->shm.size));
    return 1;
}

int dictFreeSpace(lua_State *L)
{
    shdict::Zone *z = checkZone(L, false);
    lua_pushnumber(L, static_cast<lua_Number>(z->store.freeSpace()));
    return 1;
}

const luaL_Reg kMethods[] = {
    {"get", dictGet},
    {"get_stale", dictGetStale},
    {"set", dictSet},
    {"safe_set", dictSafeSet},
    {"add", dictAdd},
    {"safe_add", dictSafeAdd},
    {"replace", dictReplace},
    {"delete", dictDelete},
    {"incr", dictIncr},
    {"lpush", dictLpush},
    {"rpush", dictRpush},
    {"lpop", dictLpop},
    {"rpop", dictRpop},
    {"llen", dictLlen},
    {"ttl", dictTtl},
    {"expire", dictExpire},
    {"flush_all", dictFlushAll},
    {"flush_expired", dictFlushExpired},
    {"get_keys", dictGetKeys},
    {"capacity", dictCapacity},
    {"free_space", dictFreeSpace},
    {nullptr, nullptr},
};

}  // namespace


bool openShared(lua_State *L, std::string *err)
{
    subTable(L, "shared");
    lua_pop(L, 1);

    lua_pushlightuserdata(L, &kMetaKey);
    lua_createtable(L, 0, 2);
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");  // getmetatable() gives nothing away
    lua_createtable(L, 0, 24);
    setFuncs(L, kMethods);

    // The hot methods' FFI versions replace the C ones; failing to load
    // them is a start-up error, not a silent fall back to the slow path.
    lua_pushvalue(L, -1);
    lua_pushstring(L, kShdictCdef);
    if (!runEmbedded(L, kLua_shdict_ffi, kLua_shdict_ffi_len,
                     "=luaguard.shdict", 2, 0, err)) {
        lua_pop(L, 3);
        return false;
    }

    lua_setfield(L, -2, "__index");
    lua_rawset(L, LUA_REGISTRYINDEX);
    return true;
}

void bindSharedDicts(lua_State *L, MainConf *mcf)
{
    shdict::Zones *zs = shdict::zones(mcf);
    if (zs == nullptr) {
        return;
    }
    lua_getglobal(L, "ngx");
    subTable(L, "shared");
    auto **elts = static_cast<shdict::Zone **>(zs->list.elts);
    for (ngx_uint_t i = 0; i < zs->list.nelts; i++) {
        shdict::Zone *z = elts[i];
        lua_pushlstring(L, reinterpret_cast<char *>(z->name.data),
                        z->name.len);
        *static_cast<void **>(lua_newuserdata(L, sizeof(void *))) = z;
        lua_pushlightuserdata(L, &kMetaKey);
        lua_rawget(L, LUA_REGISTRYINDEX);
        lua_setmetatable(L, -2);
        lua_rawset(L, -3);
    }
    lua_pop(L, 2);
}

}  // namespace luaguard::api

// ---- the FFI entry points of the fast path ----
// They never raise: a bad zone is -1, a dict the running location may not
// use (lua_sandbox) is -2 (the Lua side then calls the C method, which
// raises the refusal), otherwise a shdict::Status. Values come back in
// `out`, strings pointing into the per-process buffer.

namespace luaguard::api {

shdict::Zone *usableZone(void *zone, bool write)
{
    shdict::Zone *z = knownZone(zone);
    if (z && !sandbox::sharedAllowed(
                 std::string_view(reinterpret_cast<char *>(z->name.data),
                                  z->name.len),
                 write))
    {
        return reinterpret_cast<shdict::Zone *>(-2);
    }
    return z;
}

}  // namespace luaguard::api

extern "C" {

LUAGUARD_FFI_EXPORT
int luaguard_shdict_get(void *zone, const char *key, size_t klen,
                        int stale, luaguard_shdict_out *out)
{
    using namespace luaguard;
    shdict::Zone *z = api::usableZone(zone, false);
    if (z == nullptr || z == reinterpret_cast<shdict::Zone *>(-2)) {
        return z ? -2 : -1;
    }
    shdict::Value v;
    int32_t flags = 0;
    bool is_stale = false;
    shdict::Status s = z->store.get(key, klen, shdict::nowMs(), stale != 0,
                                    &v, &flags, &is_stale, &api::g_buf);
    if (s != shdict::Status::Ok) {
        return static_cast<int>(s);
    }
    out->type = static_cast<int>(v.type);
    out->num = v.type == shdict::VType::Boolean ? (v.boolean ? 1 : 0)
                                                : v.number;
    out->str = v.str;
    out->len = v.len;
    out->flags = flags;
    out->stale = is_stale;
    return 0;
}

LUAGUARD_FFI_EXPORT
int luaguard_shdict_store(void *zone, int op, int safe, const char *key,
                          size_t klen, int vtype, const char *str, size_t len,
                          double num, double exptime, double flags,
                          luaguard_shdict_out *out)
{
    using namespace luaguard;
    shdict::Zone *z = api::usableZone(zone, true);
    if (z == reinterpret_cast<shdict::Zone *>(-2)) {
        return -2;
    }
    if (z == nullptr || op < 0 || op > 2) {
        return -1;
    }
    shdict::Value v;
    switch (vtype) {
    case 1:
        v.type = shdict::VType::Boolean;
        v.boolean = num != 0;
        break;
    case 3:
        v.type = shdict::VType::Number;
        v.number = num;
        break;
    case 4:
        v.type = shdict::VType::String;
        v.str = str;
        v.len = len;
        break;
    default:
        v.type = shdict::VType::None;
        break;
    }
    uint64_t now = shdict::nowMs();
    bool forcible = false;
    shdict::Status s = z->store.store(
        static_cast<shdict::StoreOp>(op), key, klen, v,
        api::absExpiry(exptime, now), api::toFlags(flags), safe != 0, now,
        &forcible);
    out->forcible = forcible;
    return static_cast<int>(s);
}

LUAGUARD_FFI_EXPORT
int luaguard_shdict_incr(void *zone, const char *key, size_t klen,
                         double delta, int has_init, double init,
                         double init_ttl, luaguard_shdict_out *out)
{
    using namespace luaguard;
    shdict::Zone *z = api::usableZone(zone, true);
    if (z == nullptr || z == reinterpret_cast<shdict::Zone *>(-2)) {
        return z ? -2 : -1;
    }
    uint64_t now = shdict::nowMs();
    bool forcible = false;
    double val = 0;
    shdict::Status s = z->store.incr(key, klen, delta, has_init != 0, init,
                                     api::absExpiry(init_ttl, now), now,
                                     &val, &forcible);
    out->num = val;
    out->forcible = forcible;
    return static_cast<int>(s);
}

}  // extern "C"
