#include "runtime/code.hpp"

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

}  // namespace luaguard
