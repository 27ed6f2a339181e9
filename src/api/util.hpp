// Helpers the util and req areas share.
#pragma once

#include <string>

#include "runtime/lua.hpp"

namespace luaguard::api {

// ngx.encode_args' encoding of the table at `idx` into *out. On a value
// with no query form returns false with the error message pushed.
bool encodeArgsTable(lua_State *L, int idx, std::string *out);

// Pushes a table of the query string's arguments (repeated keys as arrays,
// keys without '=' as true). Returns true when more than `max_args`
// (non-zero) arguments were present and the rest were left out.
bool pushArgsTable(lua_State *L, const char *s, size_t len, size_t max_args);

// With a key and a value on top of the stack, stores them in the table at
// `t` (absolute index), collecting the values of a repeated key in an
// array. Pops both.
void addMultiValue(lua_State *L, int t);

}  // namespace luaguard::api
