#include "runtime/code.hpp"

#include <unordered_map>
#include <utility>
#include <vector>

namespace luaguard {

namespace {

// Three pieces fed to lua_load without copying the source. The prefix stays
// on the first line so Lua's line numbers match the user's code.
struct Pieces {
    const char *part[3];
    size_t      len[3];
    int         next;
};

const char *readPieces(lua_State *, void *ud, size_t *size)
{
    auto *p = static_cast<Pieces *>(ud);
    while (p->next < 3) {
        int i = p->next++;
        if (p->len[i]) {
            *size = p->len[i];
            return p->part[i];
        }
    }
    *size = 0;
    return nullptr;
}

// Factory of a binary chunk: loads it again on every call. The chunk is
// the handler itself, so this is how each run gets a closure of its own
// (a shared one would have its environment switched under a suspended
// request).
int loadUpvalue(lua_State *L)
{
    size_t len;
    const char *code = lua_tolstring(L, lua_upvalueindex(1), &len);
    const char *name = lua_tostring(L, lua_upvalueindex(2));
    if (luaL_loadbuffer(L, code, len, name) != 0) {
        return lua_error(L);
    }
    return 1;
}

}  // namespace

bool isBytecode(const char *code, size_t len)
{
    return len > 0 && code[0] == LUA_SIGNATURE[0];
}

bool compileFactory(lua_State *L, const char *code, size_t len,
                    const char *chunkname, std::string *err)
{
    static const char prefix[] = "return function(...) ";
    static const char suffix[] = "\nend";
    bool bytecode = isBytecode(code, len);

    Pieces p{};
    if (bytecode) {
        p.part[1] = code;
        p.len[1] = len;
    } else {
        p = Pieces{{prefix, code, suffix}, {sizeof(prefix) - 1, len,
                                            sizeof(suffix) - 1}, 0};
    }

    if (lua_load(L, readPieces, &p, chunkname) != 0) {
        *err = lua_tostring(L, -1) ? lua_tostring(L, -1) : "unknown error";
        lua_pop(L, 1);
        return false;
    }

    if (bytecode) {
        // Validated; callers get the same factory shape, as a C function
        // (which is how the sandbox tells binary handlers apart).
        lua_pop(L, 1);
        lua_pushlstring(L, code, len);
        lua_pushstring(L, chunkname);
        lua_pushcclosure(L, loadUpvalue, 2);
    }
    return true;
}

void instantiate(lua_State *L, int index)
{
    lua_pushvalue(L, index);
    lua_call(L, 0, 1);
}

namespace {

// A closure per slot, held by at most one run at a time. Creating a
// closure per run (a call into the factory, an allocation and its later
// collection) cost 0.45k-0.85k instructions per phase.
struct Slot {
    int         ref = LUA_NOREF;   // registry anchor of the closure
    const void *fn = nullptr;
    bool        held = false;
    bool        escaped = false;
};

struct Pool {
    int               factory_ref = LUA_NOREF;  // keeps the key alive
    int               idle_env_ref = LUA_NOREF; // see release()
    std::vector<Slot> slots;
};

// As many runs of one handler as are suspended at once in a busy worker;
// past that, runs get fresh closures.
constexpr size_t kPoolSize = 64;

std::vector<Pool> g_pools;
std::unordered_map<const void *, int> g_pool_of;     // factory -> pool
std::unordered_map<const void *, std::pair<int, int>> g_slot_of;  // fn

void fill(lua_State *L, int pool, int slot, int index)
{
    instantiate(L, index);
    lua_pushvalue(L, -1);
    Slot &s = g_pools[pool].slots[slot];
    s.ref = luaL_ref(L, LUA_REGISTRYINDEX);
    s.fn = lua_topointer(L, -1);
    s.held = true;
    s.escaped = false;
    g_slot_of[s.fn] = {pool, slot};
}

}  // namespace

void instantiatePooled(lua_State *L, int index, Lease *lease)
{
    if (index < 0) {
        index = lua_gettop(L) + index + 1;
    }
    const void *key = lua_topointer(L, index);
    auto it = g_pool_of.find(key);
    int pool;
    if (it == g_pool_of.end()) {
        lua_pushvalue(L, index);
        int ref = luaL_ref(L, LUA_REGISTRYINDEX);
        lua_newtable(L);
        int idle = luaL_ref(L, LUA_REGISTRYINDEX);
        pool = static_cast<int>(g_pools.size());
        g_pools.emplace_back();
        g_pools.back().factory_ref = ref;
        g_pools.back().idle_env_ref = idle;
        g_pool_of.emplace(key, pool);
    } else {
        pool = it->second;
    }
    std::vector<Slot> &slots = g_pools[pool].slots;
    for (size_t i = 0; i < slots.size(); i++) {
        Slot &s = slots[i];
        if (!s.held) {
            if (s.ref == LUA_NOREF) {
                fill(L, pool, static_cast<int>(i), index);  // dropped
            } else {
                s.held = true;
                lua_rawgeti(L, LUA_REGISTRYINDEX, s.ref);
            }
            *lease = Lease{pool + 1, static_cast<int>(i)};
            return;
        }
    }
    if (slots.size() >= kPoolSize) {
        instantiate(L, index);
        *lease = Lease{};
        return;
    }
    slots.emplace_back();
    int slot = static_cast<int>(slots.size() - 1);
    fill(L, pool, slot, index);
    *lease = Lease{pool + 1, slot};
}

void release(lua_State *L, Lease *lease, bool returned)
{
    if (lease->pool == 0) {
        return;
    }
    Pool &pool = g_pools[lease->pool - 1];
    Slot &s = pool.slots[lease->slot];
    *lease = Lease{};
    if (s.escaped || !returned) {
        // Whoever kept it keeps the environment it had; the slot gets a
        // closure of its own when next needed.
        g_slot_of.erase(s.fn);
        luaL_unref(L, LUA_REGISTRYINDEX, s.ref);
        s = Slot{};
        return;
    }
    // An idle closure must not keep the request whose environment it had
    // alive (its globals, the patches it made) until the next run: it
    // waits with an empty table, shared by the pool, as its environment.
    // Neither call allocates: nothing here raises.
    lua_rawgeti(L, LUA_REGISTRYINDEX, s.ref);
    lua_rawgeti(L, LUA_REGISTRYINDEX, pool.idle_env_ref);
    lua_setfenv(L, -2);
    lua_pop(L, 1);
    s.held = false;
}

void escaped(const void *f)
{
    auto it = g_slot_of.find(f);
    if (it != g_slot_of.end()) {
        g_pools[it->second.first].slots[it->second.second].escaped = true;
    }
}

}  // namespace luaguard
