// Helpers the util and req areas share.
#pragma once

#include <string>

#include "api/ffi_abi.hpp"
#include "runtime/lua.hpp"

struct ngx_http_request_s;   // ngx_http_request_t

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

// The request an FFI fast path of the request API serves (lua/req_ffi.lua),
// or null when the C function must answer instead, with its own error:
// no request, a phase without one, a negative max.
ngx_http_request_s *ffiRequest(int max);

// The table of get_headers, get_uri_args & co., pushed by the constructor
// and sized for `expected` keys. A key met for the first time costs one
// rawset: repeats are found in a set of the interned key strings kept on
// the C stack, not by reading the table back for every key.
class MultiTable {
public:
    MultiTable(lua_State *L, size_t expected);
    // With a key and a value on top of the stack: stores them (a repeated
    // key's values become an array) and pops both.
    void add();
    int index() const { return t_; }

private:
    static constexpr unsigned kSlots = 256;
    lua_State *L_;
    int t_;
    unsigned mask_;
    unsigned left_;  // keys the set still takes; then addMultiValue
    const void *seen_[kSlots];
};

// Whether the list handed in by lua/req_ffi.lua has room for `kv` pairs and
// `buf` bytes; if not, records the needs for the Lua side to grow it.
bool kvRoom(luaguard_kv_list_t *l, size_t kv, size_t buf);

// Pushes `s` lower-cased (ASCII), as get_headers names headers; with
// `dashes`, '_' becomes '-' too (get_headers' __index: h.content_type).
void pushLower(lua_State *L, const char *s, size_t len, bool dashes = false);

}  // namespace luaguard::api
