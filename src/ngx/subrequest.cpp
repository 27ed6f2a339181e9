// Captured subrequests and the client abort watch.

#include "ngx/subrequest.hpp"

#include <sys/socket.h>

#include <cstring>

#include "api/socket.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"
#include "runtime/vm.hpp"

namespace luaguard::subreq {

namespace {

// ---- egress of upstreams Lua can steer ----
//
// A location whose proxy_pass (fastcgi_pass, grpc_pass, ...) takes its
// target from variables lets Lua pick the upstream: through the URI,
// args or vars of ngx.location.capture, or by setting a variable and
// ngx.exec'ing there. nginx has no hook between choosing an upstream peer
// and connecting to it, except the event method's add_conn, called by
// ngx_event_connect_peer() after socket() and before connect(). It is
// wrapped here: when the new connection is the upstream of a request
// with a variable target (u->resolved), the peer address is judged by
// the egress policy of every location Lua ran in for that request and
// for each request above it (a capture's issuer among them). A refusal
// fails the connect before any packet is sent (the request answers 500).

ngx_queue_t g_live;                 // Capture::live, captures not done
bool g_live_init = false;
ngx_int_t (*g_add_conn)(ngx_connection_t *c) = nullptr;
u_char *(*g_http_log_handler)(ngx_log_t *, u_char *, size_t) = nullptr;

void unwatch(Capture *cap)
{
    if (cap->watched) {
        ngx_queue_remove(&cap->live);
        cap->watched = false;
    }
}

void unwatchCleanup(void *data)
{
    unwatch(static_cast<Capture *>(data));
}

bool ownsUpstream(ngx_http_request_t *r, ngx_connection_t *c)
{
    return r && r->upstream && r->upstream->peer.connection == c;
}

// The request whose upstream connection c is, when it is one on an HTTP
// connection.
ngx_http_request_t *upstreamOwner(ngx_connection_t *c)
{
    if (g_http_log_handler == nullptr || c->log == nullptr
        || c->log->handler != g_http_log_handler)
    {
        return nullptr;  // not opened for an HTTP request
    }
    // nginx marks the request it runs in the log (every request event
    // handler does); the main request and live captures cover a connect
    // made from an event of ours (a Lua thread resuming, then ngx.exec
    // or the next phase).
    auto *lctx = static_cast<ngx_http_log_ctx_t *>(c->log->data);
    if (lctx && ownsUpstream(lctx->current_request, c)) {
        return lctx->current_request;
    }
    if (lctx && ownsUpstream(lctx->request, c)) {
        return lctx->request;
    }
    for (ngx_queue_t *q = ngx_queue_head(&g_live);
         q != ngx_queue_sentinel(&g_live); q = ngx_queue_next(q))
    {
        Capture *cap = ngx_queue_data(q, Capture, live);
        if (ownsUpstream(cap->sr, c)) {
            return cap->sr;
        }
    }
    return nullptr;
}

ngx_int_t vetAddConn(ngx_connection_t *c)
{
    ngx_http_request_t *r = upstreamOwner(c);
    if (r && r->upstream->resolved) {
        ngx_peer_connection_t *pc = &r->upstream->peer;
        api::sock::Target t;
        std::memset(&t, 0, sizeof(t));
        socklen_t len = pc->socklen < sizeof(t.addr) ? pc->socklen
                                                     : sizeof(t.addr);
        std::memcpy(&t.addr, pc->sockaddr, len);
        t.len = len;
        t.name.data = t.text;
        if (pc->name) {
            t.name.len = pc->name->len < sizeof(t.text)
                             ? pc->name->len : sizeof(t.text);
            std::memcpy(t.text, pc->name->data, t.name.len);
        }
        // Subrequests share the main request's pool: its cleanups hold
        // the RequestCtx of every location Lua ran in, for all of them.
        for (ngx_http_request_t *p = r; p; p = p->parent) {
            for (ngx_pool_cleanup_t *cln = r->pool->cleanup; cln;
                 cln = cln->next)
            {
                RequestCtx *ctx = ctxOfCleanup(cln);
                if (ctx && ctx->r == p
                    && !api::sock::egressCheck(ctx, "upstream", &t))
                {
                    return NGX_ERROR;  // ngx_event_connect_peer closes c
                }
            }
        }
    }
    return g_add_conn(c);
}

void wakeBatch(ngx_event_t *ev)
{
    auto *b = static_cast<Batch *>(ev->data);
    if (b->thread) {
        b->deliver(b);
    }
}

bool specialFollows(ngx_int_t rc)
{
    // nginx answers these codes with its own response (error page, empty
    // 201/204) and finalizes the subrequest once more afterwards.
    return rc == NGX_HTTP_CREATED || rc == NGX_HTTP_NO_CONTENT
           || (rc >= NGX_HTTP_SPECIAL_RESPONSE && rc != NGX_HTTP_CLOSE
               && rc != NGX_HTTP_REQUEST_TIME_OUT
               && rc != NGX_HTTP_CLIENT_CLOSED_REQUEST);
}

// nginx calls this each time the subrequest is finalized; the last call is
// the one after which nothing more is sent.
ngx_int_t subrequestDone(ngx_http_request_t *r, void *data, ngx_int_t rc)
{
    auto *cap = static_cast<Capture *>(data);
    if (cap->done) {
        return rc;
    }
    if (rc == NGX_ERROR || rc == NGX_HTTP_CLOSE
        || rc == NGX_HTTP_REQUEST_TIME_OUT
        || rc == NGX_HTTP_CLIENT_CLOSED_REQUEST)
    {
        cap->failed = true;
    } else if (rc == NGX_AGAIN) {
        return rc;
    } else if (specialFollows(rc) && !r->header_sent) {
        // As lua-nginx-module: the status without nginx's error page.
        cap->status = rc;
        r->headers_out.status = rc;
        if (r->headers_out.content_type.len == 0) {
            ngx_http_set_content_type(r);
        }
        rc = NGX_OK;
    }
    if (r->buffered || r->postponed) {
        return rc;  // finalized again once the rest is out
    }

    cap->done = true;
    unwatch(cap);  // its own upstream is over; nested ones keep the chain
    if (r->headers_out.status) {
        cap->status = r->headers_out.status;
    } else if (cap->status == 0) {
        cap->status = rc >= NGX_HTTP_OK && rc < 1000 ? rc
                      : cap->failed ? NGX_HTTP_INTERNAL_SERVER_ERROR
                                    : NGX_HTTP_OK;
    }

    Batch *b = cap->batch;
    if (--b->pending == 0 && b->thread) {
        // Not resumed from inside nginx's finalization of the subrequest:
        // on the next round of posted events.
        ngx_post_event(&b->wake, &ngx_posted_events);
    }

    if (rc == NGX_ERROR && !r->connection->error) {
        // An error in the subrequest (a broken upstream) marks its result
        // truncated; it must not tear down the parent request with it.
        // The codes that mean "drop the connection" (ngx.exit(444), 408,
        // 499) do drop it, as with lua-nginx-module.
        return NGX_OK;
    }
    return rc;
}

bool append(ngx_http_request_t *r, Capture *cap, const u_char *p, size_t n)
{
    if (n == 0) {
        return true;
    }
    ngx_buf_t *b = ngx_create_temp_buf(r->pool, n);
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (b == nullptr || cl == nullptr) {
        return false;
    }
    b->last = ngx_cpymem(b->pos, p, n);
    cl->buf = b;
    cl->next = nullptr;
    *cap->last = cl;
    cap->last = &cl->next;
    cap->size += n;
    return true;
}

bool appendFile(ngx_http_request_t *r, Capture *cap, ngx_buf_t *buf)
{
    off_t n = buf->file_last - buf->file_pos;
    if (n <= 0) {
        return true;
    }
    ngx_buf_t *b = ngx_create_temp_buf(r->pool, static_cast<size_t>(n));
    ngx_chain_t *cl = ngx_alloc_chain_link(r->pool);
    if (b == nullptr || cl == nullptr) {
        return false;
    }
    ssize_t got = ngx_read_file(buf->file, b->pos, static_cast<size_t>(n),
                                buf->file_pos);
    if (got != n) {
        return false;
    }
    b->last += n;
    cl->buf = b;
    cl->next = nullptr;
    *cap->last = cl;
    cap->last = &cl->next;
    cap->size += n;
    return true;
}

// ---- the client abort watch ----

void abortHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    ngx_connection_t *c = r->connection;
    if (ctx == nullptr || ctx->threads == nullptr || ctx->client_aborted) {
        ngx_http_block_reading(r);
        return;
    }
    char buf[1];
    ssize_t n = recv(c->fd, buf, 1, MSG_PEEK);
    ngx_err_t err = 0;
    if (n == -1) {
        err = ngx_socket_errno;
        if (err == NGX_EAGAIN) {
            return;
        }
    } else if (n > 0) {
        return;  // pipelined data, not a close
    }

    ctx->client_aborted = true;
    c->read->eof = 1;
    r->read_event_handler = ngx_http_block_reading;
    ngx_log_error(NGX_LOG_INFO, c->log, err,
                  "client prematurely closed connection");

    if (ctx->on_abort_ref != LUA_NOREF) {
        // The callback runs as a user light thread of the phase.
        LuaThread *parent = ctx->entry ? ctx->entry : ctx->threads;
        LuaThread *t = nullptr;
        std::string err;
        entry::protect(ctx->vm->L(), [&] {
            t = threads::create(ctx, parent);
        }, &err);
        if (t != nullptr) {
            entry::resume(t, [ctx](lua_State *co) {
                lua_rawgeti(co, LUA_REGISTRYINDEX, ctx->on_abort_ref);
                return 0;  // the callback itself, called with no argument
            });
            return;
        }
    }
    // No callback: the request ends here, as with ngx.exit(499).
    c->error = 1;
    ctx->exited = true;
    ctx->exit_code = NGX_HTTP_CLIENT_CLOSED_REQUEST;
    threads::killAll(ctx, nullptr);
    glue::phaseFinished(ctx);
    ngx_http_run_posted_requests(c);
}

}  // namespace

void prepare(Batch *b, Capture *cap)
{
    cap->batch = b;
    cap->last = &cap->body;
    cap->ps.handler = entry::edge<subrequestDone>;
    cap->ps.data = cap;
    b->wake.handler = entry::edge<wakeBatch>;
    b->wake.data = b;
}

Capture *captureOf(ngx_http_request_t *r)
{
    // post_subrequest survives internal redirects inside the subrequest,
    // where module contexts do not.
    if (r == r->main || r->post_subrequest == nullptr
        || r->post_subrequest->handler != entry::edge<subrequestDone>)
    {
        return nullptr;
    }
    return static_cast<Capture *>(r->post_subrequest->data);
}

ngx_int_t collect(ngx_http_request_t *r, ngx_chain_t *in)
{
    Capture *cap = captureOf(r);
    cap->body_seen = true;
    for (ngx_chain_t *cl = in; cl; cl = cl->next) {
        ngx_buf_t *b = cl->buf;
        bool ok = true;
        if (ngx_buf_in_memory(b)) {
            ok = append(r, cap, b->pos, b->last - b->pos);
        } else if (b->in_file) {
            ok = appendFile(r, cap, b);
        }
        if (!ok) {
            return NGX_ERROR;
        }
        b->pos = b->last;
        if (b->in_file) {
            b->file_pos = b->file_last;
        }
        if (b->last_buf || b->last_in_chain) {
            cap->eof = true;
        }
    }
    return NGX_OK;
}

bool watch(Capture *cap, RequestCtx *issuer)
{
    if (g_add_conn == nullptr) {
        return false;
    }
    ngx_http_request_t *r = issuer->r;
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(r->pool, 0);
    if (cln == nullptr) {
        return false;
    }
    // The capture record lives in the main request's pool (subrequests
    // share it): off the list before that memory goes.
    cln->handler = unwatchCleanup;
    cln->data = cap;
    ngx_queue_insert_tail(&g_live, &cap->live);
    cap->watched = true;
    return true;
}

void noteRequestLog(const ngx_log_t *log)
{
    // nginx's (static) HTTP log handler, learnt from a real request: a
    // log with it has an ngx_http_log_ctx_t as its data. Fake requests
    // (timers) have none.
    if (g_http_log_handler == nullptr && log->handler != nullptr) {
        g_http_log_handler = log->handler;
    }
}

bool installEgressHook(ngx_log_t *log)
{
    if (!g_live_init) {
        ngx_queue_init(&g_live);
        g_live_init = true;
    }
    if (g_add_conn != nullptr) {
        return true;
    }
    if (ngx_event_actions.add_conn == nullptr) {
        ngx_log_error(NGX_LOG_WARN, log, 0,
                      "luaguard: the event method has no add_conn (use "
                      "epoll): ngx.location.capture is refused, as the "
                      "egress policy cannot judge its upstreams");
        return false;
    }
    g_add_conn = ngx_event_actions.add_conn;
    ngx_event_actions.add_conn = entry::edge<vetAddConn>;
    return true;
}

bool pendingOf(const ngx_http_request_t *r)
{
    if (!g_live_init) {
        return false;
    }
    // Captures leave the list when done; few are live at once.
    for (ngx_queue_t *q = ngx_queue_head(&g_live);
         q != ngx_queue_sentinel(&g_live); q = ngx_queue_next(q))
    {
        Capture *cap = ngx_queue_data(q, Capture, live);
        if (!cap->done && cap->sr && cap->sr->parent == r) {
            return true;
        }
    }
    return false;
}

void checkAbortable(lua_State *L, const RequestCtx *ctx)
{
    if (pendingOf(ctx->r)) {
        luaL_error(L, "attempt to abort with pending subrequests");
    }
}

void cancel(Batch *b)
{
    b->thread = nullptr;
    if (b->wake.posted) {
        ngx_delete_posted_event(&b->wake);
    }
}

void watchClientAbort(RequestCtx *ctx)
{
    ngx_http_request_t *r = ctx->r;
    if (ctx->is_timer || r != r->main || ctx->client_aborted
        || !ctx->llcf->check_client_abort
        || r->read_event_handler != ngx_http_block_reading)
    {
        return;  // not wanted, or the body reader owns the read side
    }
    r->read_event_handler = entry::edge<abortHandler>;

    // The close may already have happened, its (edge-triggered) event
    // swallowed by nginx's block_reading before this watch was installed:
    // always look once. When nothing is there yet, make sure the
    // connection is registered for reads (nginx may have read the whole
    // request at once without registering it).
    ngx_connection_t *c = r->connection;
    ngx_event_t *rev = c->read;
    char buf[1];
    ssize_t n = recv(c->fd, buf, 1, MSG_PEEK);
    if (n > 0) {
        return;  // pipelined data: nothing to learn until it is read
    }
    if (n == -1 && ngx_socket_errno == NGX_EAGAIN) {
        if (!rev->active) {
            rev->ready = 0;
            if (ngx_handle_read_event(rev, 0) != NGX_OK) {
                r->read_event_handler = ngx_http_block_reading;
            }
        }
        return;
    }
    rev->ready = 1;
    ngx_post_event(rev, &ngx_posted_events);
}

}  // namespace luaguard::subreq
