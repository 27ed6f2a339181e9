#include "runtime/embedded.hpp"

namespace luaguard {

bool runEmbedded(lua_State *L, const char *code, size_t len,
                 const char *name, int nargs, int nresults, std::string *err)
{
    int rc = luaL_loadbuffer(L, code, len, name);
    lua_insert(L, -(nargs + 1));
    if (rc == 0) {
        rc = lua_pcall(L, nargs, nresults, 0);
    } else {
        lua_pop(L, nargs);
    }
    if (rc != 0) {
        const char *msg = lua_tostring(L, -1);  // names the chunk
        *err = msg ? msg : std::string(name + 1) + ": error object";
        lua_pop(L, 1);
        return false;
    }
    return true;
}

}  // namespace luaguard
