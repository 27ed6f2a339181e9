// header_filter_by_lua and body_filter_by_lua.

#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/subrequest.hpp"

namespace luaguard::glue {

namespace {

ngx_http_output_header_filter_pt g_next_header = nullptr;
ngx_http_output_body_filter_pt g_next_body = nullptr;

// A captured subrequest is a background one (so that several run at
// once), and nginx's buffered upstream writes only to the connection's
// active request: its response would be spooled to proxy_temp_path until
// complete, and with no temp file allowed it would stall for good. The
// capture keeps the body in memory anyway, so the upstream hands it over
// as it arrives. Cached or stored responses keep their buffering, which
// the cache needs.
void unbufferCapture(ngx_http_request_t *r)
{
    ngx_http_upstream_t *u = r->upstream;
    if (u == nullptr || !u->buffering || u->store
        || subreq::captureOf(r) == nullptr)
    {
        return;
    }
#if (NGX_HTTP_CACHE)
    if (u->cacheable) {
        return;
    }
#endif
    u->buffering = 0;
}

ngx_int_t headerFilter(ngx_http_request_t *r)
{
    if (r != r->main) {
        unbufferCapture(r);
    } else if (g_run == nullptr) {
        // A response that no Lua code sends, while Lua waits for the body:
        // nginx's own error page for a body it refused.
        RequestCtx *ctx = getCtx(r);
        if (ctx != nullptr && ctx->req_body_waiter != nullptr) {
            bodyWaitAbandoned(ctx);
        }
    }
    auto *llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    if (llcf->body_filter) {
        // body_filter_by_lua sees data, not file regions.
        r->filter_need_in_memory = 1;
    }
    if (llcf->header_filter == nullptr) {
        return g_next_header(r);
    }
    RequestCtx *ctx = r->filter_finalize ? getCtx(r) : glue::ensureCtx(r);
    if (r->filter_finalize
        && (ctx == nullptr || !ctx->header_filter_exited))
    {
        // The response is now nginx's error page standing in for one a
        // filter failed on; it passes untouched.
        return g_next_header(r);
    }
    if (ctx == nullptr) {
        return NGX_ERROR;
    }
    if (r->filter_finalize) {
        // nginx's page for an ngx.exit of this filter: the filter sees it
        // too (its headers go out with it), as with lua-nginx-module, and
        // an ngx.exit there changes nothing.
        ctx->header_filter_exited = false;
        ngx_int_t rc = runSync(ctx, Phase::HeaderFilter, llcf->header_filter,
                               r->connection->log, 0);
        ctx->exited = true;
        ctx->exit_code = NGX_ERROR;
        return rc == NGX_OK ? g_next_header(r) : NGX_ERROR;
    }
    ctx->exited = false;
    if (runSync(ctx, Phase::HeaderFilter, llcf->header_filter,
                r->connection->log, 0) != NGX_OK)
    {
        // Nothing is written yet: the client gets nginx's plain 500 page
        // and the connection closes. Lua still running for this request
        // sees its output refused and ends the request with an error.
        ctx->eof = true;
        ctx->exited = true;
        ctx->exit_code = NGX_ERROR;
        return ngx_http_filter_finalize_request(
            r, &ngx_http_luaguard_module, NGX_HTTP_INTERNAL_SERVER_ERROR);
    }
    if (ctx->exited && ctx->exit_code == NGX_ERROR) {
        return NGX_ERROR;
    }
    if (ctx->exited && ctx->exit_code >= NGX_HTTP_OK) {
        // ngx.exit(status): nginx's page for that status (an empty one
        // for a 2xx) replaces the response, as in lua-nginx-module.
        ngx_int_t status = ctx->exit_code;
        ctx->eof = true;
        ctx->exit_code = NGX_ERROR;
        ctx->header_filter_exited = true;
        return ngx_http_filter_finalize_request(r, &ngx_http_luaguard_module,
                                                status);
    }
    return g_next_header(r);
}

// What the filter passes on: a captured subrequest's output goes to its
// capture record (ngx.location.capture) instead of the postpone filter.
ngx_int_t passOn(ngx_http_request_t *r, ngx_chain_t *in)
{
    if (subreq::captureOf(r)) {
        return in ? subreq::collect(r, in) : NGX_OK;
    }
    return g_next_body(r, in);
}

bool chainIsLast(ngx_http_request_t *r, ngx_chain_t *in)
{
    for (ngx_chain_t *cl = in; cl; cl = cl->next) {
        if (cl->buf->last_buf || (r != r->main && cl->buf->last_in_chain)) {
            return true;
        }
    }
    return false;
}

ngx_int_t bodyFilter(ngx_http_request_t *r, ngx_chain_t *in)
{
    auto *llcf = static_cast<LocConf *>(
        ngx_http_get_module_loc_conf(r, ngx_http_luaguard_module));
    if (llcf->body_filter == nullptr || in == nullptr) {
        return passOn(r, in);
    }
    RequestCtx *ctx = glue::ensureCtx(r);
    if (ctx == nullptr) {
        return NGX_ERROR;
    }
    if (ctx->filter_eof) {
        // ngx.arg[2] = true ended the body earlier: drop what follows.
        for (ngx_chain_t *cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            if (cl->buf->in_file) {
                cl->buf->file_pos = cl->buf->file_last;
            }
        }
        return NGX_OK;
    }

    ctx->filter_in = in;
    ctx->filter_out = in;
    ctx->filter_replaced = false;
    ctx->exited = false;
    bool was_last = chainIsLast(r, in);
    ctx->filter_eof = false;

    ngx_int_t rc = runSync(ctx, Phase::BodyFilter, llcf->body_filter,
                           r->connection->log, 0);
    ngx_chain_t *out = ctx->filter_out;
    bool eof_set = ctx->filter_eof;
    ctx->filter_in = ctx->filter_out = nullptr;
    if (!eof_set) {
        ctx->filter_eof = false;
    }
    if (rc != NGX_OK || (ctx->exited && ctx->exit_code == NGX_ERROR)) {
        return NGX_ERROR;
    }
    if (ctx->filter_replaced) {
        // The original buffers are consumed: their producers may reuse them.
        for (ngx_chain_t *cl = in; cl; cl = cl->next) {
            cl->buf->pos = cl->buf->last;
            if (cl->buf->in_file) {
                cl->buf->file_pos = cl->buf->file_last;
            }
        }
    }
    if (eof_set && !was_last && out) {
        ngx_chain_t *cl = out;
        while (cl->next) {
            cl = cl->next;
        }
        if (r == r->main) {
            cl->buf->last_buf = 1;
        } else {
            cl->buf->last_in_chain = 1;
        }
    }
    if (out == nullptr) {
        return NGX_OK;
    }
    return passOn(r, out);
}

}  // namespace

void installFilters()
{
    // Both always in: the header filter notices nginx's own error page
    // ending a request whose Lua waits for the body, the body filter
    // collects the output of captured subrequests (a few pointer tests for
    // other requests).
    g_next_header = ngx_http_top_header_filter;
    ngx_http_top_header_filter = entry::edge<headerFilter>;
    g_next_body = ngx_http_top_body_filter;
    ngx_http_top_body_filter = entry::edge<bodyFilter>;
}

// ngx.arg[1] in body_filter_by_lua: the data of the chain being filtered.
void pushFilterData(lua_State *L, RequestCtx *ctx)
{
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    for (ngx_chain_t *cl = ctx->filter_out; cl; cl = cl->next) {
        ngx_buf_t *buf = cl->buf;
        if (ngx_buf_in_memory(buf)) {
            luaL_addlstring(&b, reinterpret_cast<char *>(buf->pos),
                            buf->last - buf->pos);
        }
    }
    luaL_pushresult(&b);
}

bool filterEof(RequestCtx *ctx)
{
    return ctx->filter_eof || chainIsLast(ctx->r, ctx->filter_out);
}

// ngx.arg[1] = data: the chain is replaced by one buffer holding `data`,
// keeping the flush and end flags of the original.
bool replaceFilterData(RequestCtx *ctx, const char *data, size_t len)
{
    ngx_http_request_t *r = ctx->r;
    bool last = chainIsLast(r, ctx->filter_out);
    bool flush = false;
    for (ngx_chain_t *cl = ctx->filter_out; cl; cl = cl->next) {
        flush = flush || cl->buf->flush;
    }
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (cl == nullptr) {
        return false;
    }
    if (len) {
        cl->buf = ngx_create_temp_buf(r->pool, len);
        if (cl->buf == nullptr) {
            return false;
        }
        cl->buf->last = ngx_cpymem(cl->buf->pos, data, len);
    } else {
        cl->buf = static_cast<ngx_buf_t *>(ngx_calloc_buf(r->pool));
        if (cl->buf == nullptr) {
            return false;
        }
        cl->buf->sync = 1;
    }
    cl->buf->flush = flush;
    if (last) {
        if (r == r->main) {
            cl->buf->last_buf = 1;
        } else {
            cl->buf->last_in_chain = 1;
        }
    }
    cl->next = nullptr;
    ctx->filter_out = cl;
    ctx->filter_replaced = true;
    return true;
}

}  // namespace luaguard::glue
