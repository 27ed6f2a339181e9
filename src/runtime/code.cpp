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

int returnUpvalue(lua_State *L)
{
    lua_pushvalue(L, lua_upvalueindex(1));
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
        // A binary chunk is the handler itself; wrap it so callers see the
        // same factory shape. Its environment is then shared by requests.
        lua_pushcclosure(L, returnUpvalue, 1);
    }
    return true;
}

void instantiate(lua_State *L, int index)
{
    lua_pushvalue(L, index);
    lua_call(L, 0, 1);
}

}  // namespace luaguard
