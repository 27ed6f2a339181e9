// ngx.req.socket: the request's own connection as a cosocket, reading
// the body (or, raw, speaking a protocol of the script's own). It shares
// the socket core (api/socket_tcp.cpp) and borrows the request's event
// handlers while a read or write waits; it never closes or pools the
// connection.

#include "api/api.hpp"
#include "api/socket_tcp.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"

namespace luaguard::api {
namespace tcp {

void detachDownstream(Tcp *s)
{
    if (s->ctx == nullptr) {
        return;
    }
    ngx_http_request_t *r = s->ctx->r;
    if (s->saved_read) {
        r->read_event_handler = s->saved_read;
        s->saved_read = nullptr;
    }
    if (s->saved_write) {
        r->write_event_handler = s->saved_write;
        s->saved_write = nullptr;
    }
    if (reqSocket(s->ctx) == s) {
        setReqSocket(s->ctx, nullptr);
    }
}

void reqReadHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    Tcp *s = reqSocket(ctx);
    if (s && s->c) {
        readEvent(s, r->connection->read);
    }
}

void reqWriteHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    Tcp *s = reqSocket(ctx);
    if (s && s->c) {
        writeEvent(s, r->connection->write);
    }
}

// The documented subsets of the methods.
void openReqSocket(lua_State *L, int ud_mt)
{
    luaL_newmetatable(L, kReqMeta);
    lua_createtable(L, 0, 5);
    const luaL_Reg req_methods[] = {{"receive", tcpReceive},
                                    {"receiveany", tcpReceiveAny},
                                    {"receiveuntil", tcpReceiveUntil},
                                    {"settimeout", tcpSetTimeout},
                                    {"settimeouts", tcpSetTimeouts},
                                    {nullptr, nullptr}};
    setMethods(L, req_methods, ud_mt);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, kRawMeta);
    lua_createtable(L, 0, 6);
    const luaL_Reg raw_methods[] = {{"send", tcpSend}, {nullptr, nullptr}};
    setMethods(L, req_methods, ud_mt);
    setMethods(L, raw_methods, ud_mt);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

}  // namespace tcp

using namespace tcp;

// ngx.req.socket([raw]): the downstream connection as a cosocket.
int sock::reqSocketOpen(lua_State *L, RequestCtx *ctx, bool raw)
{
    ngx_http_request_t *r = ctx->r;
    if (r != r->main) {
        return luaL_error(L, "attempt to read the request body in a "
                          "subrequest");
    }
#if (NGX_HTTP_V2)
    if (r->stream) {
        return pushNilErr(L, "http v2 not supported yet");
    }
#endif
    if (reqSocket(ctx)) {
        return pushNilErr(L, "request body already exists");
    }
    off_t body = -1;
    if (!raw) {
        if (r->request_body) {
            return pushNilErr(L, "request body already exists");
        }
        if (r->discard_body) {
            return pushNilErr(L, "request body discarded");
        }
        if (r->headers_in.chunked) {
            return pushNilErr(L, "chunked request bodies not supported yet");
        }
        if (r->headers_in.content_length_n <= 0) {
            return pushNilErr(L, "no body");
        }
        body = r->headers_in.content_length_n;
    } else {
        if (ctx->buffering && ctx->buffered_out == nullptr) {
            // A header held by lua_http10_buffering (ngx.send_headers in
            // HTTP/1.0; ngx.flush does nothing there): it goes out now,
            // the raw bytes follow it.
            ctx->buffering = false;
            ctx->buffering_done = true;
            ngx_int_t rc = glue::sendHeader(ctx);
            if (rc == NGX_OK) {
                rc = ngx_http_send_special(r, NGX_HTTP_FLUSH);
            }
            if (rc == NGX_ERROR || rc > NGX_OK) {
                return pushNilErr(L, "nginx output filter error");
            }
        }
        if (ctx->buffered_out || ctx->held || r->out
            || r->connection->buffered)
        {
            return pushNilErr(L, "pending data to write");
        }
    }
    // Raw: the connection belongs to the script; nginx must not read or
    // discard anything on it. (Plain: nginx discards what the script
    // leaves unread, see bodyTaken.)
    if (raw && r->request_body == nullptr) {
        auto *rb = static_cast<ngx_http_request_body_t *>(
            ngx_pcalloc(r->pool, sizeof(ngx_http_request_body_t)));
        if (rb == nullptr) {
            return pushNilErr(L, "no memory");
        }
        r->request_body = rb;
    }
    if (raw) {
        // The script speaks the protocol itself from here on: nginx sends
        // no header, no final chunk, and closes the connection after.
        r->header_sent = 1;
        ctx->eof = true;
        r->keepalive = 0;
        r->lingering_close = 0;
    }

    Tcp *s = pushTcp(L, raw ? kRawMeta : kReqMeta);

    if (!bindRequest(s, ctx)) {
        return pushNilErr(L, "no memory");
    }
    s->downstream = true;
    s->raw = raw;
    s->c = r->connection;
    s->body_left = body;
    // Body bytes nginx read together with the header are handed over.
    ngx_buf_t *hb = r->header_in;
    size_t pre = hb ? static_cast<size_t>(hb->last - hb->pos) : 0;
    if (body >= 0 && static_cast<off_t>(pre) > body) {
        pre = static_cast<size_t>(body);
    }
    if (s->buffer_size < pre) {
        s->buffer_size = pre;
    }
    getRbuf(s);
    if (s->rbuf == nullptr) {
        return pushNilErr(L, "no memory");
    }
    if (pre) {
        ngx_memcpy(s->rbuf, hb->pos, pre);
        hb->pos += pre;
        s->rlast = pre;
        if (body >= 0) {
            s->body_left -= static_cast<off_t>(pre);
        }
    }
    bodyTaken(s);
    setReqSocket(ctx, s);
    return 1;
}

}  // namespace luaguard::api
