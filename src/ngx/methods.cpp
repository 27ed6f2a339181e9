#include "ngx/glue.hpp"

namespace luaguard::glue {

namespace {

const HttpMethod kMethods[] = {
    {NGX_HTTP_GET, "GET"}, {NGX_HTTP_HEAD, "HEAD"}, {NGX_HTTP_POST, "POST"},
    {NGX_HTTP_PUT, "PUT"}, {NGX_HTTP_DELETE, "DELETE"},
    {NGX_HTTP_MKCOL, "MKCOL"}, {NGX_HTTP_COPY, "COPY"},
    {NGX_HTTP_MOVE, "MOVE"}, {NGX_HTTP_OPTIONS, "OPTIONS"},
    {NGX_HTTP_PROPFIND, "PROPFIND"}, {NGX_HTTP_PROPPATCH, "PROPPATCH"},
    {NGX_HTTP_LOCK, "LOCK"}, {NGX_HTTP_UNLOCK, "UNLOCK"},
    {NGX_HTTP_PATCH, "PATCH"}, {NGX_HTTP_TRACE, "TRACE"},
};

}  // namespace

const HttpMethod kHttpGet = {NGX_HTTP_GET, "GET"};

const HttpMethod *httpMethod(lua_Integer id)
{
    for (const HttpMethod &m : kMethods) {
        if (static_cast<lua_Integer>(m.id) == id) {
            return &m;
        }
    }
    return nullptr;
}

}  // namespace luaguard::glue
