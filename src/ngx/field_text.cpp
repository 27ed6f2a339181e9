// Header integrity: Lua text headed for a header line or a request line
// is escaped here, on its way into the request's pool.

#include <string>

#include "ngx/glue.hpp"
#include "runtime/codec.hpp"

namespace luaguard::glue {

namespace {

bool toPool(ngx_pool_t *pool, const char *s, size_t len, ngx_str_t *out)
{
    auto *p = static_cast<u_char *>(ngx_pnalloc(pool, len + 1));
    if (p == nullptr) {
        return false;
    }
    ngx_memcpy(p, s, len);
    p[len] = '\0';
    out->data = p;
    out->len = len;
    return true;
}

bool toPool(ngx_pool_t *pool, const std::string &text, ngx_str_t *out)
{
    return toPool(pool, text.data(), text.size(), out);
}

}  // namespace

bool copyHeaderName(ngx_pool_t *pool, const char *s, size_t len,
                    ngx_str_t *out)
{
    if (codec::headerNameClean(s, len) == len) {
        return toPool(pool, s, len, out);
    }
    return toPool(pool, codec::escapeHeaderName(s, len), out);
}

bool copyHeaderValue(ngx_pool_t *pool, const char *s, size_t len,
                     ngx_str_t *out)
{
    if (codec::headerValueClean(s, len) == len) {
        return toPool(pool, s, len, out);
    }
    return toPool(pool, codec::escapeHeaderValue(s, len), out);
}

bool copyVariableValue(ngx_pool_t *pool, const char *name, size_t nlen,
                       const char *s, size_t len, ngx_str_t *out)
{
    if (nlen == 4 && ngx_strncasecmp(reinterpret_cast<u_char *>(
                                         const_cast<char *>(name)),
                                     reinterpret_cast<u_char *>(
                                         const_cast<char *>("args")),
                                     4) == 0)
    {
        return toPool(pool, codec::escapeArgsString(s, len), out);
    }
    return copyHeaderValue(pool, s, len, out);
}

}  // namespace luaguard::glue
