#include "runtime/code.hpp"

#include "runtime/vm.hpp"

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
    // A function of fixed arity first: LuaJIT starts no trace at the
    // entry of a vararg function, so a handler that is one never runs
    // compiled (about 150-600 instructions more per request). Code that
    // uses `...` (legal at the top of lua-nginx-module's chunks, where it
    // is empty) fails that compile and gets the vararg form.
    static const char fixed[] = "return function() ";
    static const char vararg[] = "return function(...) ";
    static const char suffix[] = "\nend";
    bool bytecode = isBytecode(code, len);

    Pieces p{};
    int rc;
    if (bytecode) {
        p.part[1] = code;
        p.len[1] = len;
        rc = lua_load(L, readPieces, &p, chunkname);
    } else {
        p = Pieces{{fixed, code, suffix}, {sizeof(fixed) - 1, len,
                                           sizeof(suffix) - 1}, 0};
        rc = lua_load(L, readPieces, &p, chunkname);
        if (rc == LUA_ERRSYNTAX) {
            lua_pop(L, 1);
            p = Pieces{{vararg, code, suffix}, {sizeof(vararg) - 1, len,
                                                sizeof(suffix) - 1}, 0};
            rc = lua_load(L, readPieces, &p, chunkname);
        }
    }

    if (rc != 0) {
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

// Creating a closure per run (a call into the factory, an allocation and
// its collection) cost 0.45k-0.85k instructions per phase.
constexpr size_t kMaxIdle = 64;  // per handler and VM; past it, collected

// Escape marks (Vm::kEscapedKey) are looked up only once one was ever
// made: debug.getinfo's func is rare in handlers.
unsigned g_escape_marks = 0;

bool escaped(lua_State *L, Vm *vm, int cell)
{
    if (g_escape_marks == 0) {
        return false;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, Vm::kEscapedKey);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);  // not a VM of ours (unit tests)
        return false;
    }
    vm->pushHeld(L, cell);
    lua_rawget(L, -2);
    bool marked = lua_toboolean(L, -1);
    lua_pop(L, 2);
    return marked;
}

}  // namespace

std::vector<int> *closurePool(Vm *vm, const void *factory)
{
    std::vector<int> &idle = vm->closurePool(factory);
    if (idle.capacity() == 0) {
        idle.reserve(kMaxIdle);  // giveClosure's push_back never allocates
    }
    return &idle;
}

void takeClosure(lua_State *L, Vm *vm, int index, std::vector<int> *idle,
                 Lease *lease, int env)
{
    if (!idle->empty()) {
        int cell = idle->back();
        idle->pop_back();
        *lease = Lease{idle, cell};
        vm->pushHeld(L, cell);
    } else {
        instantiate(L, index);
        lua_pushvalue(L, -1);
        int cell = vm->hold(L);  // raising here leaves a closure nobody holds
        *lease = Lease{idle, cell};
    }
    if (env != 0) {
        vm->setFenvHeld(L, env);
    }
}

void giveClosure(lua_State *L, Vm *vm, Lease *lease, bool reusable)
{
    Lease l = *lease;
    *lease = Lease{};
    if (l.cell == 0) {
        return;
    }
    if (!reusable || l.idle->size() >= kMaxIdle || escaped(L, vm, l.cell)) {
        vm->release(L, l.cell);
        return;
    }
    // An idle closure must not keep the finished request's globals alive
    // until its next run: it waits with an empty environment.
    vm->setFenvOfHeld(L, l.cell, Vm::kIdleEnvCell);
    l.idle->push_back(l.cell);
}

void unbindClosures(lua_State *L, Vm *vm, EnvClosures *b)
{
    for (int i = 0; i < b->n; i++) {
        Lease lease{b->pool[i], b->cell[i]};
        giveClosure(L, vm, &lease, true);
    }
    b->n = 0;
}

void parkClosures(lua_State *L, Vm *vm, EnvClosures *b)
{
    for (int i = 0; i < b->n;) {
        if (escaped(L, vm, b->cell[i])) {
            vm->release(L, b->cell[i]);
            b->drop(i);
            continue;
        }
        vm->setFenvOfHeld(L, b->cell[i], Vm::kIdleEnvCell);
        i++;
    }
}

void rebindClosures(lua_State *L, Vm *vm, const EnvClosures &b, int env)
{
    for (int i = 0; i < b.n; i++) {
        vm->setFenvOfHeld(L, b.cell[i], env);
    }
}

void markEscaped(lua_State *L, int index)
{
    if (index < 0) {
        index = lua_gettop(L) + index + 1;
    }
    lua_getfield(L, LUA_REGISTRYINDEX, Vm::kEscapedKey);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;  // not a VM of ours: nothing there is pooled
    }
    lua_pushvalue(L, index);
    lua_pushboolean(L, 1);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    g_escape_marks++;
}

}  // namespace luaguard
