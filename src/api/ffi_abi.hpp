// The C types and functions that the Lua fast paths (lua/shdict_ffi.lua,
// lua/regex_ffi.lua, lua/req_ffi.lua) call through LuaJIT's FFI.
//
// Each declaration is written once, in a macro that is both compiled here
// as C++ and handed to ffi.cdef as its text. A field added on one side only,
// or a parameter whose type changed, cannot happen: the compiler checks the
// definitions in shdict.cpp / regex.cpp against these declarations, and
// LuaJIT parses the very same declarations. The fast-path files hold no
// cdef of their own.
#pragma once

#include <cstddef>
#include <cstdint>

// API is the visibility attribute in C++ and nothing in the ffi.cdef text.
#define LUAGUARD_SHDICT_ABI(API)                                             \
    struct luaguard_shdict_out {                                             \
        double num;                                                          \
        const char *str;                                                     \
        size_t len;                                                          \
        int type;                                                            \
        int flags;                                                           \
        int stale;                                                           \
        int forcible;                                                        \
    };                                                                       \
    API int luaguard_shdict_get(void *zone, const char *key, size_t klen,    \
                                int stale, struct luaguard_shdict_out *out); \
    API int luaguard_shdict_store(void *zone, int op, int safe,              \
                                  const char *key, size_t klen, int vtype,   \
                                  const char *str, size_t len, double num,   \
                                  double exptime, double flags,              \
                                  struct luaguard_shdict_out *out);          \
    API int luaguard_shdict_incr(void *zone, const char *key, size_t klen,   \
                                 double delta, int has_init, double init,    \
                                 double init_ttl,                            \
                                 struct luaguard_shdict_out *out);

// `re` is the pattern behind the last exec (a Regex *), for
// luaguard_re_name until the next exec.
#define LUAGUARD_REGEX_ABI(API)                                              \
    typedef struct luaguard_re_result {                                      \
        int *ov;                                                             \
        int ncap;                                                            \
        int nnames;                                                          \
        int dupnames;                                                        \
        int serial;                                                          \
        int utf;                                                             \
        void *re;                                                            \
        const char *out;                                                     \
        size_t outlen;                                                       \
        int gen;                                                             \
    } luaguard_re_result_t;                                                  \
    API luaguard_re_result_t *luaguard_re_result(void);                      \
    API int luaguard_re_exec(void *hint, const char *pat, size_t plen,       \
                             const char *opts, size_t olen,                  \
                             const char *subj, size_t len, size_t off,       \
                             int no_utf_check);                              \
    API int luaguard_re_subst(void *hint, const char *pat, size_t plen,      \
                              const char *opts, size_t olen,                 \
                              const char *subj, size_t len, const char *tpl, \
                              size_t tlen, int global);                      \
    API int luaguard_re_split(void *hint, const char *pat, size_t plen,      \
                              const char *opts, size_t olen,                 \
                              const char *subj, size_t len, size_t pos,      \
                              int64_t max);                                  \
    API const char *luaguard_re_name(void *re, int i, int *group);

// ngx.req.get_headers, get_uri_args, get_post_args and ngx.resp.get_headers:
// the C side lists the pairs as pointers (into nginx's memory or `buf`) and
// Lua builds the table, in a trace. The arrays belong to the Lua side (a
// finalizer that asks again while a table is being built gets arrays of
// its own). Returns the number of pairs; -2 when they need more room than
// kv_cap / buf_cap (need_kv / need_buf say how much); -1 when the C
// function must answer. A null value is an argument without '=' (true).
// `which` is 0 for the URI, 1 for the body.
#define LUAGUARD_REQ_ABI(API)                                                \
    typedef struct luaguard_kv {                                             \
        const char *key;                                                     \
        size_t klen;                                                         \
        const char *value;                                                   \
        size_t vlen;                                                         \
    } luaguard_kv_t;                                                         \
    typedef struct luaguard_kv_list {                                        \
        luaguard_kv_t *kv;                                                   \
        char *buf;                                                           \
        size_t kv_cap;                                                       \
        size_t buf_cap;                                                      \
        size_t need_kv;                                                      \
        size_t need_buf;                                                     \
        int truncated;                                                       \
    } luaguard_kv_list_t;                                                    \
    API int luaguard_req_get_headers(luaguard_kv_list_t *l, int max,         \
                                     int raw);                               \
    API int luaguard_req_get_args(luaguard_kv_list_t *l, int which,          \
                                  int max);                                  \
    API int luaguard_resp_get_headers(luaguard_kv_list_t *l, int max,        \
                                      int raw);

// ngx.ctx: the Vm cell of the running request's table when the running
// request belongs to VM `vm` (its cells' address) and has one, else 0.
// ngx.var.NAME: 1 with the value in *out (nginx's memory, valid until the
// request ends or the variable changes), 0 for nil, -1 when the C __index
// must answer (not a request phase, another VM, a long name).
#define LUAGUARD_INDEX_ABI(API)                                              \
    typedef struct luaguard_var_value {                                      \
        const char *data;                                                    \
        size_t len;                                                          \
    } luaguard_var_value_t;                                                  \
    API int luaguard_ctx_cell(const void *vm);                               \
    API int luaguard_var_get(const void *vm, const char *name, size_t len,   \
                             luaguard_var_value_t *out);

#define LUAGUARD_FFI_EXPORT __attribute__((visibility("default")))
#define LUAGUARD_FFI_TEXT_(...) #__VA_ARGS__
#define LUAGUARD_FFI_TEXT(...) LUAGUARD_FFI_TEXT_(__VA_ARGS__)

extern "C" {
LUAGUARD_SHDICT_ABI(LUAGUARD_FFI_EXPORT)
LUAGUARD_REGEX_ABI(LUAGUARD_FFI_EXPORT)
LUAGUARD_REQ_ABI(LUAGUARD_FFI_EXPORT)
LUAGUARD_INDEX_ABI(LUAGUARD_FFI_EXPORT)
}

namespace luaguard::api {

inline constexpr char kShdictCdef[] = LUAGUARD_FFI_TEXT(LUAGUARD_SHDICT_ABI());
inline constexpr char kRegexCdef[] = LUAGUARD_FFI_TEXT(LUAGUARD_REGEX_ABI());
inline constexpr char kReqCdef[] = LUAGUARD_FFI_TEXT(LUAGUARD_REQ_ABI());
inline constexpr char kIndexCdef[] = LUAGUARD_FFI_TEXT(LUAGUARD_INDEX_ABI());

}  // namespace luaguard::api
