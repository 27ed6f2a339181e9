// Captured subrequests (ngx.location.capture*) and the client abort watch
// (lua_check_client_abort, ngx.on_abort): the nginx side.
#pragma once

#include "ngx/module.hpp"

namespace luaguard::subreq {

// One captured subrequest. Its output never reaches the postpone filter:
// the body filter hands it to `collect` (see filters.cpp), which copies it
// into this record, however large it is.
struct Batch;

struct Capture {
    Batch                      *batch;
    ngx_http_request_t         *sr;
    ngx_chain_t                *body;
    ngx_chain_t               **last;
    size_t                      size;
    ngx_int_t                   status;
    bool                        done;
    bool                        eof;          // saw the end of the body
    bool                        body_seen;    // the body filter was called
    bool                        failed;       // finalized with an error
    ngx_http_post_subrequest_t  ps;
    ngx_queue_t                 live;         // in the watch list
    bool                        watched;
};

// The subrequests one capture/capture_multi call waits for.
struct Batch {
    LuaThread   *thread;      // the waiter; null once it is killed
    Capture     *caps;
    int          n;
    int          pending;
    ngx_event_t  wake;        // posted when the last one is done
    void       (*deliver)(Batch *b);  // pushes results, resumes the thread
};

// Sets up the post-subrequest hook of `cap` (call before creating sr).
void prepare(Batch *b, Capture *cap);

// The capture record of `r` when it is one of our captured subrequests.
Capture *captureOf(ngx_http_request_t *r);

// Body filter for a captured subrequest: keeps the data, passes nothing on.
ngx_int_t collect(ngx_http_request_t *r, ngx_chain_t *in);

// Lists a capture issued by `issuer` (call after prepare and before
// creating cap->sr) so that an upstream connection it opens to a target
// computed from variables is found and judged by the egress policy of
// every location Lua ran in, for it and the requests above it, before
// its socket connects. False (nothing to undo) when that cannot be
// guaranteed: no hook, no memory.
bool watch(Capture *cap, RequestCtx *issuer);

// Called for each request Lua runs in (createCtx): learns what an HTTP
// connection's log looks like, so the hook knows which connections are
// made for HTTP requests.
void noteRequestLog(const ngx_log_t *log);

// Installs the connection vetting hook (worker start). False when the
// event method gives no hook (not epoll): subrequests are then refused.
bool installEgressHook(ngx_log_t *log);

// True while a capture issued by `r` is not finished. lua-nginx-module
// refuses to end such a request from Lua: ngx.exit, ngx.exec, ngx.redirect
// and a jumping ngx.req.set_uri raise "attempt to abort with pending
// subrequests" (see checkAbortable), and an entry thread that fails then
// closes the connection.
bool pendingOf(const ngx_http_request_t *r);

// Raises that error when pendingOf(ctx->r).
void checkAbortable(lua_State *L, const RequestCtx *ctx);

// Detaches the batch from its (killed) thread: nothing fires for it later.
void cancel(Batch *b);

// Called when a Lua thread of `ctx` is about to wait: with
// lua_check_client_abort on, watches the client connection meanwhile.
void watchClientAbort(RequestCtx *ctx);

}  // namespace luaguard::subreq
