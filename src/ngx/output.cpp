// The response path shared by ngx.say/print/flush/eof, ngx.send_headers and
// the end of a content handler.

#include "ngx/glue.hpp"

namespace luaguard::glue {

namespace {

ngx_buf_tag_t bufTag()
{
    return reinterpret_cast<ngx_buf_tag_t>(&ngx_http_luaguard_module);
}

bool wantsHttp10Buffering(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    // HEAD has no body to measure: its headers go out as they are.
    return r->http_version < NGX_HTTP_VERSION_11 && ctx->llcf->http10_buffering
           && r->method != NGX_HTTP_HEAD
           && r->headers_out.content_length_n < 0 && !ctx->eof
           && !ctx->buffering_done;
}

ngx_int_t sendBuffered(RequestCtx *ctx, bool last)
{
    ngx_http_request_t *r = ctx->r;
    ngx_chain_t *cl = ctx->buffered_out;
    ctx->buffered_out = nullptr;
    ctx->last_buffered = &ctx->buffered_out;
    ctx->buffering = false;
    ctx->buffering_done = true;

    if (last) {
        off_t total = 0;
        for (ngx_chain_t *c = cl; c; c = c->next) {
            total += ngx_buf_size(c->buf);
        }
        r->headers_out.content_length_n = total;
    }
    ngx_int_t rc = sendHeader(ctx);
    if (rc == NGX_ERROR || rc > NGX_OK || r->header_only || cl == nullptr) {
        return rc;
    }
    return output(ctx, cl);
}

ngx_int_t passOutput(RequestCtx *ctx, ngx_chain_t *cl)
{
    ngx_http_request_t *r = ctx->r;
    ngx_int_t rc = ngx_http_output_filter(r, cl);
    ngx_chain_update_chains(r->pool, &ctx->free_bufs, &ctx->busy_bufs, &cl,
                            bufTag());
    return rc;
}

}  // namespace

bool hasFreeBuf(RequestCtx *ctx, size_t size)
{
    for (ngx_chain_t *cl = ctx->free_bufs; cl; cl = cl->next) {
        if (static_cast<size_t>(cl->buf->end - cl->buf->start) >= size) {
            return true;
        }
    }
    return false;
}

size_t reclaimBufs(RequestCtx *ctx, size_t size)
{
    ngx_http_request_t *r = ctx->r;
    ngx_chain_t *none = nullptr;
    ngx_chain_update_chains(r->pool, &ctx->free_bufs, &ctx->busy_bufs, &none,
                            bufTag());
    if (hasFreeBuf(ctx, size)) {
        return 0;
    }
    // Only large pool allocations go back to malloc; a small buffer stays
    // in the pool (and charged) until the request ends.
    size_t freed = 0;
    for (ngx_chain_t **ll = &ctx->free_bufs; *ll;) {
        ngx_chain_t *cl = *ll;
        ngx_buf_t *b = cl->buf;
        auto cap = static_cast<size_t>(b->end - b->start);
        if (cap <= r->pool->max || ngx_pfree(r->pool, b->start) != NGX_OK) {
            ll = &cl->next;
            continue;
        }
        *ll = cl->next;
        ngx_free_chain(r->pool, cl);
        freed += cap;
    }
    ctx->output_bytes -= freed < ctx->output_bytes ? freed
                                                   : ctx->output_bytes;
    return freed;
}

bool outputPending(RequestCtx *ctx)
{
    return ctx->r->connection->buffered & NGX_HTTP_LOWLEVEL_BUFFERED;
}

ngx_chain_t *allocBuf(RequestCtx *ctx, size_t size)
{
    ngx_http_request_t *r = ctx->r;
    for (ngx_chain_t **ll = &ctx->free_bufs; *ll; ll = &(*ll)->next) {
        ngx_buf_t *b = (*ll)->buf;
        if (static_cast<size_t>(b->end - b->start) >= size) {
            ngx_chain_t *cl = *ll;
            *ll = cl->next;
            cl->next = nullptr;
            b->pos = b->last = b->start;
            b->flush = b->last_buf = b->last_in_chain = 0;
            b->tag = bufTag();
            return cl;
        }
    }
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (cl == nullptr) {
        return nullptr;
    }
    cl->buf = ngx_create_temp_buf(r->pool, size ? size : 1);
    if (cl->buf == nullptr) {
        return nullptr;
    }
    cl->buf->tag = bufTag();
    cl->next = nullptr;
    return cl;
}

ngx_int_t sendHeader(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    if (r->header_sent) {
        return NGX_OK;
    }
    if (r->headers_out.status == 0) {
        r->headers_out.status = NGX_HTTP_OK;
    }
    if (ctx->llcf->use_default_type && !ctx->mime_set
        && r->headers_out.content_type.len == 0
        && ngx_http_set_content_type(r) != NGX_OK)
    {
        return NGX_ERROR;
    }
    if (wantsHttp10Buffering(ctx)) {
        // HTTP/1.0 has no chunked encoding: hold the body so the header can
        // carry its length (lua_http10_buffering).
        ctx->buffering = true;
        return NGX_OK;
    }
    ctx->headers_sent_by_lua = true;
    return ngx_http_send_header(r);
}

ngx_int_t output(RequestCtx *ctx, ngx_chain_t *cl)
{
    ngx_http_request_t *r = ctx->r;
    if (!r->header_sent && !ctx->buffering) {
        ngx_int_t rc = sendHeader(ctx);
        if (rc == NGX_ERROR || rc > NGX_OK) {
            return rc;
        }
    }
    if (ctx->buffering) {
        *ctx->last_buffered = cl;
        while (cl->next) {
            cl = cl->next;
        }
        ctx->last_buffered = &cl->next;
        return NGX_OK;
    }
    if (r->header_only) {
        return NGX_OK;
    }
    // One pass through the body filters costs about what the Lua around a
    // small handler does; a say/print per pass would pay it per call.
    // body_filter_by_lua sees each call's output on its own, as with
    // lua-nginx-module: its scripts may count on that.
    if (ctx->llcf->body_filter) {
        return passOutput(ctx, cl);
    }
    if (ctx->held) {
        ctx->held_tail->next = cl;
    } else {
        ctx->held = cl;
    }
    for (; cl; cl = cl->next) {
        ctx->held_bytes += ngx_buf_size(cl->buf);
        ctx->held_tail = cl;
    }
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(r, ngx_http_core_module));
    if (ctx->held_bytes < clcf->postpone_output) {
        return NGX_OK;
    }
    return passHeld(ctx);
}

ngx_int_t passHeld(RequestCtx *ctx)
{
    ngx_chain_t *cl = ctx->held;
    if (cl == nullptr) {
        return NGX_OK;
    }
    ctx->held = ctx->held_tail = nullptr;
    ctx->held_bytes = 0;
    return passOutput(ctx, cl);
}

ngx_int_t sendEof(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    if (ctx->eof) {
        return NGX_OK;
    }
    if (ctx->buffering || (!r->header_sent && ctx->buffered_out == nullptr)) {
        ctx->eof = true;
        ngx_int_t rc = sendBuffered(ctx, true);
        if (rc == NGX_ERROR || rc > NGX_OK) {
            return rc;
        }
    }
    ctx->eof = true;
    if (ctx->held) {
        // The held output carries the end, as ngx_http_send_special's
        // empty buffer would have.
        ngx_buf_t *b = ctx->held_tail->buf;
        if (r == r->main && !r->post_action) {
            b->last_buf = 1;
        } else {
            b->last_in_chain = 1;
        }
        return passHeld(ctx);
    }
    return ngx_http_send_special(r, NGX_HTTP_LAST);
}

ngx_int_t flush(RequestCtx *ctx)
{
    if (ctx->buffering) {
        // Documented: ngx.flush does nothing in HTTP/1.0 buffering mode, so
        // the response still gets its Content-Length.
        return NGX_OK;
    }
    if (ctx->eof || !ctx->r->header_sent) {
        return NGX_OK;
    }
    if (ctx->held) {
        ctx->held_tail->buf->flush = 1;
        return passHeld(ctx);
    }
    return ngx_http_send_special(ctx->r, NGX_HTTP_FLUSH);
}

}  // namespace luaguard::glue
