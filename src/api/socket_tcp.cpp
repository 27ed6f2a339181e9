// ngx.socket.tcp / ngx.socket.stream / ngx.socket.connect: non-blocking TCP
// and stream unix sockets ("cosockets"), with per-worker keepalive pools.
//
// The Lua object is a table {[1] = userdata} like lua-nginx-module's. The
// userdata (Tcp) owns everything that must outlive a request: buffers are
// malloc'd, the connection is closed by a cleanup in the pool of the
// request that connected it, and that cleanup forgets the request so a
// socket kept in a global fails with "closed" in the next request instead
// of touching freed memory. Idle pooled connections belong to the worker
// (malloc'd Idle items, the cycle's log), never to a request. A pool
// belongs to one policy (its key starts with the egress and sandbox policy
// of the location that connected), and an idle connection keeps the peer
// it was opened to, judged again before it is handed out: naming a pool
// never reaches a destination the caller's policy refuses.
//
// Each operation (connect, read, write) can be pending in one thread at a
// time (a reader and a writer thread may overlap). A pending operation is
// undone by the thread's `cancel` when the thread is killed or the request
// ends: timers removed, the waiter forgotten.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>

#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "api/api.hpp"
#include "api/socket.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "ngx/metrics.hpp"
#include "ngx/thread.hpp"
#include "security/egress.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard::api {

namespace {

using sock::Target;
using sock::Resolve;

const char kTcpMeta[] = "luaguard.tcpsock";      // the object table's
const char kTcpUdMeta[] = "luaguard.tcpsock.ud";  // the userdata's
const char kReqMeta[] = "luaguard.reqsock";      // ngx.req.socket()
const char kRawMeta[] = "luaguard.reqsock.raw";   // ngx.req.socket(true)
const char kUntilMeta[] = "luaguard.tcpsock.until";
constexpr uint32_t kMagic = 0x7463706bu;
constexpr int kPending = -1;

enum class RMode : uint8_t { Line, All, Size, Any, Until };

enum class RStatus : uint8_t { Done, Again, Closed, Error };

// receiveuntil's iterator state: pattern, KMP borders, match progress.
struct Until {
    size_t    plen;
    size_t    matched;      // pattern bytes held back, not yet emitted
    size_t    limit;        // this call's size argument, 0: none
    bool      inclusive;
    bool      eof_pending;  // sized reads: boundary seen, next call ends
    char     *pat() { return reinterpret_cast<char *>(this + 1); }
    uint32_t *fail()
    {
        return reinterpret_cast<uint32_t *>(pat() + ((plen + 3) & ~3u));
    }
};

struct Pool;

struct Tcp {
    uint32_t             magic = kMagic;
    RequestCtx          *ctx = nullptr;   // the request using the socket
    ngx_pool_cleanup_t  *cln = nullptr;   // in ctx's pool while it lives
    // Bound to a request once (connect): from then on only that request
    // may connect it again, even after it ended (lua-nginx-module's "bad
    // request"), so no request takes over another's socket object.
    bool                 bound = false;
    ngx_connection_t    *c = nullptr;
    sock::Slot           slot;            // while connecting or connected
    bool                 log_errors = true;

    ngx_msec_t           connect_timeout = 0;   // 0: the directive's
    ngx_msec_t           send_timeout = 0;
    ngx_msec_t           read_timeout = 0;
    size_t               buffer_size = 0;
    size_t               lowat = 0;

    ngx_uint_t           reused = 0;
    std::string          key;             // pool name
    Pool                *pool = nullptr;  // counted against (backlog)
    bool                 counted = false;
    ngx_uint_t           opt_pool_size = 0;
    ngx_uint_t           opt_backlog = 0;
    bool                 opt_has_backlog = false;

    // Read side: rbuf[rpos, rlast) is received and not consumed; acc
    // collects a result that spans several receives.
    char                *rbuf = nullptr;
    size_t               rcap = 0, rpos = 0, rlast = 0;
    std::string          acc;
    RMode                rmode = RMode::Line;
    size_t               rsize = 0;
    Until               *until = nullptr;
    const char          *res = nullptr;   // the result: into rbuf or acc
    size_t               res_len = 0;
    std::string          err;

    // Write side: what is left to send of the current send().
    std::string          sbuf;
    size_t               spos = 0;
    size_t               stotal = 0;
    size_t               scharged = 0;    // of sbuf, to ctx's memory budget

    LuaThread           *reader = nullptr;
    LuaThread           *writer = nullptr;
    LuaThread           *connector = nullptr;
    bool                 read_closed = false;  // the peer's end was read
    bool                 all_ended = false;    // "*a" met it: the next
                                               // read reports it

    // Connect.
    ngx_peer_connection_t pc;
    Target               target;
    Resolve              resolve;
    std::string          host;
    in_port_t            port = 0;
    ngx_addr_t           local;
    struct sockaddr_storage local_addr;
    bool                 has_local = false;
    ngx_queue_t          wait_q;          // in pool->waiters (backlog)
    bool                 in_wait_q = false;
    ngx_event_t          wait_ev;         // backlog timeout / wake-up
    bool                 tcp_nodelay = true;

    // TLS (tcpSslHandshake and the lua_ssl_* contexts, below).
    LuaThread           *shaker = nullptr;
    bool                 ssl_ret_session = true;
    bool                 ssl_verify = false;
    std::string          sni;
    // setclientcert: PEM texts (checked when set), applied at handshake.
    std::string          client_cert;
    std::string          client_key;

    // ngx.req.socket: the request's own connection, never closed or
    // pooled here; nginx's request handlers are borrowed while waiting.
    bool                 downstream = false;
    bool                 raw = false;
    off_t                body_left = -1;      // body bytes still unread
    ngx_http_event_handler_pt saved_read = nullptr;
    ngx_http_event_handler_pt saved_write = nullptr;
};

// RequestCtx keeps ngx.req.socket's object as an opaque slot: only these
// two read and write it, typed.
Tcp *reqSocket(const RequestCtx *ctx)
{
    return ctx ? static_cast<Tcp *>(ctx->req_socket) : nullptr;
}

void setReqSocket(RequestCtx *ctx, Tcp *s)
{
    ctx->req_socket = s;
}

struct Pool {
    std::string  key;
    ngx_uint_t   size;
    ngx_uint_t   backlog;
    bool         backlog_on;
    ngx_uint_t   active;      // counted connections in use
    ngx_queue_t  idle;        // Idle, most recently parked first
    ngx_uint_t   nidle;
    ngx_queue_t  waiters;     // Tcp::wait_q
    ngx_uint_t   nwaiting;
};

struct Idle {
    ngx_queue_t        q;
    ngx_connection_t  *c;
    Pool              *pool;
    ngx_uint_t         reused;
    bool               counted;
    Target             peer;      // what c was connected to
};

// Copies a Target, its name pointing into its own text.
void copyTarget(Target *to, const Target &from)
{
    *to = from;
    to->name.data = to->text;
}

std::unordered_map<std::string, Pool *> g_pools;
std::vector<char *> g_free_bufs;      // read buffers of g_free_size
size_t g_free_size = 0;

// ---- buffers ----

void getRbuf(Tcp *s)
{
    if (s->rbuf) {
        return;
    }
    size_t want = s->buffer_size ? s->buffer_size : ngx_pagesize;
    if (want == g_free_size && !g_free_bufs.empty()) {
        s->rbuf = g_free_bufs.back();
        g_free_bufs.pop_back();
    } else {
        s->rbuf = static_cast<char *>(ngx_alloc(want, ngx_cycle->log));
    }
    s->rcap = s->rbuf ? want : 0;
    s->rpos = s->rlast = 0;
}

void putRbuf(Tcp *s)
{
    if (s->rbuf == nullptr) {
        return;
    }
    if (g_free_size == 0) {
        g_free_size = s->rcap;
    }
    if (s->rcap == g_free_size && g_free_bufs.size() < 64) {
        g_free_bufs.push_back(s->rbuf);
    } else {
        ngx_free(s->rbuf);
    }
    s->rbuf = nullptr;
    s->rcap = s->rpos = s->rlast = 0;
}

// ---- pools ----

Pool *findPool(const std::string &key)
{
    auto it = g_pools.find(key);
    return it == g_pools.end() ? nullptr : it->second;
}

Pool *createPool(const std::string &key, ngx_uint_t size, bool backlog_on,
                 ngx_uint_t backlog)
{
    auto *p = new (std::nothrow) Pool();
    if (p == nullptr) {
        return nullptr;
    }
    p->key = key;
    p->size = size ? size : 1;
    p->backlog = backlog;
    p->backlog_on = backlog_on;
    p->active = 0;
    ngx_queue_init(&p->idle);
    p->nidle = 0;
    ngx_queue_init(&p->waiters);
    p->nwaiting = 0;
    g_pools.emplace(key, p);
    return p;
}

void closeIdle(Idle *it)
{
    ngx_queue_remove(&it->q);
    it->pool->nidle--;
    sock::closeConnection(it->c);
    delete it;
}

void wakeBacklog(Pool *p);

// Idle pooled connection: any event but "nothing to read yet" (peer
// closed, stray data, idle timeout, worker shutdown) closes it.
void idleHandler(ngx_event_t *ev)
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *it = static_cast<Idle *>(c->data);
    if (!c->close && !ev->timedout && ev->write == 0) {
        char b;
        ssize_t n = recv(c->fd, &b, 1, MSG_PEEK);
        if (n == -1 && ngx_socket_errno == NGX_EAGAIN) {
            ev->ready = 0;
            if (ngx_handle_read_event(c->read, 0) == NGX_OK) {
                return;
            }
        }
    } else if (!c->close && !ev->timedout) {
        return;  // write readiness means nothing here
    }
    Pool *p = it->pool;
    closeIdle(it);
    wakeBacklog(p);
}

// ---- event plumbing ----

ngx_msec_t connectTimeout(Tcp *s)
{
    return s->connect_timeout ? s->connect_timeout
                              : s->ctx->llcf->socket_connect_timeout;
}

ngx_msec_t sendTimeout(Tcp *s)
{
    return s->send_timeout ? s->send_timeout
                           : s->ctx->llcf->socket_send_timeout;
}

ngx_msec_t readTimeout(Tcp *s)
{
    return s->read_timeout ? s->read_timeout
                           : s->ctx->llcf->socket_read_timeout;
}

void onRead(ngx_event_t *ev);
void onWrite(ngx_event_t *ev);

void attach(Tcp *s, ngx_connection_t *c)
{
    s->c = c;
    s->read_closed = false;
    s->all_ended = false;
    c->data = s;
    c->read->handler = entry::edge<onRead>;
    c->write->handler = entry::edge<onWrite>;
    c->idle = 0;
    ngx_log_t *log = s->ctx->r->connection->log;
    c->log = log;
    c->read->log = log;
    c->write->log = log;
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
}

void releaseCount(Tcp *s)
{
    if (s->counted && s->pool) {
        s->counted = false;
        s->pool->active--;
        wakeBacklog(s->pool);
    }
}

// Wakes a thread of another operation with nil, "closed" (the socket was
// closed under it): on the next turn of the event loop.
void wakeClosed(LuaThread *t)
{
    if (t == nullptr) {
        return;
    }
    t->cancel = nullptr;
    threads::post(t, WakeWith::NilClosed);
}

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

// A send that waited is over: its copy of the data goes, and with it
// the charge to the request's lua_budget_memory (tcpSend).
void releaseSendBuf(Tcp *s)
{
    if (s->scharged == 0) {
        return;
    }
    if (s->ctx) {
        budget::Guard::releaseExternal(&s->ctx->usage, s->scharged);
    }
    s->scharged = 0;
    std::string().swap(s->sbuf);
    s->spos = 0;
}

void closeSock(Tcp *s, LuaThread *self)
{
    if (s->downstream) {
        // The connection is the request's: only let go of it.
        if (s->c) {
            if (s->c->read->timer_set) {
                ngx_del_timer(s->c->read);
            }
            if (s->c->write->timer_set) {
                ngx_del_timer(s->c->write);
            }
        }
        detachDownstream(s);
        s->c = nullptr;
    }
    if (s->c) {
        sock::closeConnection(s->c);
        s->c = nullptr;
    }
    s->rpos = s->rlast = 0;
    releaseSendBuf(s);
    releaseCount(s);
    sock::dropSlot(&s->slot);
    if (s->reader != self) {
        wakeClosed(s->reader);
    }
    if (s->writer != self) {
        wakeClosed(s->writer);
    }
    s->reader = s->writer = nullptr;
}

// The request that owns the socket ends: nothing may point into it any
// more.
void requestGone(void *data)
{
    auto *s = static_cast<Tcp *>(data);
    s->cln = nullptr;
    sock::resolveCancel(&s->resolve);
    if (s->in_wait_q) {
        ngx_queue_remove(&s->wait_q);
        s->pool->nwaiting--;
        s->in_wait_q = false;
    }
    if (s->wait_ev.timer_set) {
        ngx_del_timer(&s->wait_ev);
    }
    if (s->wait_ev.posted) {
        ngx_delete_posted_event(&s->wait_ev);
    }
    // The threads are being killed: their cancel finds nothing to undo.
    s->reader = s->writer = s->connector = s->shaker = nullptr;
    closeSock(s, nullptr);
    s->ctx = nullptr;
}

bool bindRequest(Tcp *s, RequestCtx *ctx)
{
    if (s->ctx == ctx && s->cln) {
        return true;
    }
    if (s->cln) {
        s->cln->handler = nullptr;  // a former request still alive
        s->cln = nullptr;
    }
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(ctx->r->pool, 0);
    if (cln == nullptr) {
        return false;
    }
    cln->handler = entry::edge<requestGone>;
    cln->data = s;
    s->cln = cln;
    s->ctx = ctx;
    s->bound = true;
    s->log_errors = ctx->llcf->socket_log_errors;
    s->buffer_size = ctx->llcf->socket_buffer_size;
    s->lowat = ctx->llcf->socket_send_lowat;
    auto *clcf = static_cast<ngx_http_core_loc_conf_t *>(
        ngx_http_get_module_loc_conf(ctx->r, ngx_http_core_module));
    s->tcp_nodelay = clcf->tcp_nodelay;
    return true;
}

// ---- the object ----

Tcp *self(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_rawgeti(L, 1, 1);
    // The kind first (the userdata's metatable is ours): size and magic
    // alone would take any userdata of the right size and contents.
    auto *s = static_cast<Tcp *>(luaL_testudata(L, -1, kTcpUdMeta));
    if (s == nullptr || lua_objlen(L, -1) != sizeof(Tcp)
        || s->magic != kMagic)
    {
        luaL_error(L, "bad argument #1 (tcp socket object expected)");
    }
    lua_pop(L, 1);
    return s;
}

// The socket as the running code may use it; raises on a socket of
// another live request (lua-nginx-module's "bad request").
Tcp *use(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    if (s->ctx && s->c && s->ctx != sock::currentCtx()) {
        luaL_error(L, "bad request");
    }
    return s;
}

void logError(Tcp *s, const char *what)
{
    if (s->log_errors && s->ctx) {
        ngx_log_error(NGX_LOG_ERR, s->ctx->r->connection->log, 0,
                      "lua tcp socket %s", what);
    }
}

// ---- connect ----

int connectTarget(Tcp *s, lua_State *dst);
void backlogEvent(ngx_event_t *ev);

int finishConnect(Tcp *s)
{
    LuaThread *t = s->connector;
    s->connector = nullptr;
    t->cancel = nullptr;
    return 0;
}

// Settles the connect the socket's thread waits for with what `push`
// pushes (run protected), unless it returns kPending: still connecting.
template <typename Push>
void settleConnect(Tcp *s, Push &&push)
{
    LuaThread *t = s->connector;
    int n = 0;
    std::string err;
    if (!entry::protect(t->co, [&] { n = push(t->co); }, &err)) {
        finishConnect(s);
        entry::fail(t, err);
        return;
    }
    if (n != kPending) {
        finishConnect(s);
        entry::resumeWith(t, n);
    }
}

int failConnect(Tcp *s, lua_State *dst, const std::string &err)
{
    if (s->c) {
        sock::closeConnection(s->c);
        s->c = nullptr;
    }
    releaseCount(s);
    sock::dropSlot(&s->slot);
    lua_pushnil(dst);
    lua_pushlstring(dst, err.data(), err.size());
    return 2;
}

void onConnect(ngx_event_t *ev)
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *s = static_cast<Tcp *>(c->data);
    LuaThread *t = s->connector;
    if (t == nullptr) {
        return;
    }
    if (ev->timedout) {
        if (s->log_errors) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "lua tcp socket connect timed out, when "
                          "connecting to %V", &s->target.name);
        }
        settleConnect(s, [&](lua_State *co) {
            return failConnect(s, co, "timeout");
        });
        return;
    }
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) == -1) {
        err = ngx_socket_errno;
    }
    if (err) {
        if (s->log_errors) {
            // nginx's own words for it, which lua-nginx-module logs.
            ngx_log_error(NGX_LOG_ERR, c->log, err, "connect() failed");
        }
        settleConnect(s, [&](lua_State *co) {
            return failConnect(s, co, sock::errnoText(err));
        });
        return;
    }
    attach(s, c);
    settleConnect(s, [](lua_State *co) {
        lua_pushinteger(co, 1);
        return 1;
    });
}

int connectTarget(Tcp *s, lua_State *dst)
{
    if (!sock::egressCheck(s->ctx, "tcp socket", &s->target)) {
        return failConnect(s, dst, kEgressDenied);
    }
    ngx_int_t rc = sock::connectPeer(&s->pc, &s->target, SOCK_STREAM,
                                     s->has_local ? &s->local : nullptr,
                                     s->ctx->r->connection->log,
                                     s->log_errors, &s->err);
    if (rc == NGX_ERROR) {
        return failConnect(s, dst, s->err);
    }
    metrics::countConnect(s->ctx);
    ngx_connection_t *c = s->pc.connection;
    c->data = s;
    c->pool = nullptr;
    if (s->tcp_nodelay && s->target.addr.ss_family != AF_UNIX) {
        int on = 1;
        (void) setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
    }
    if (rc == NGX_OK) {
        attach(s, c);
        lua_pushinteger(dst, 1);
        return 1;
    }
    s->c = c;
    c->read->handler = entry::edge<onConnect>;
    c->write->handler = entry::edge<onConnect>;
    ngx_add_timer(c->write, connectTimeout(s));
    return kPending;
}

void resolved(Resolve *res)
{
    auto *s = static_cast<Tcp *>(res->data);
    LuaThread *t = s->connector;
    if (t == nullptr) {
        return;
    }
    // A failed resolution is not logged ("NAME could not be resolved"), as
    // in lua-nginx-module: the script gets the error.
    settleConnect(s, [&](lua_State *co) {
        return res->err.empty() ? connectTarget(s, co)
                                : failConnect(s, co, res->err);
    });
}

// Resolves (when needed) and connects; the pool and backlog are settled.
int resolveAndConnect(Tcp *s, lua_State *dst)
{
    if (sock::literal(s->host.data(), s->host.size(), s->port, &s->target)) {
        return connectTarget(s, dst);
    }
    s->resolve.data = s;
    s->resolve.done = resolved;
    if (sock::resolveStart(s->ctx->r, &s->resolve, s->host.data(),
                           s->host.size(), s->port, &s->target))
    {
        if (!s->resolve.err.empty()) {
            // Not logged ("no resolver defined to resolve ..."), as in
            // lua-nginx-module: the script gets the error.
            return failConnect(s, dst, s->resolve.err);
        }
        return connectTarget(s, dst);
    }
    return kPending;
}

// An idle connection of p for s, when there is one its policy allows
// (*refused when the one there is not allowed).
bool takeIdle(Tcp *s, Pool *p, bool *refused)
{
    if (p == nullptr || p->nidle == 0) {
        return false;
    }
    ngx_queue_t *q = ngx_queue_head(&p->idle);
    Idle *it = ngx_queue_data(q, Idle, q);
    // The pool key already holds the policy; judging the stored peer
    // again keeps a pooled connection from outliving a policy's verdict
    // (a unix path re-resolved, a pool reached by another key).
    if (!sock::egressCheck(s->ctx, "tcp socket", &it->peer)) {
        *refused = true;
        return false;
    }
    copyTarget(&s->target, it->peer);
    ngx_queue_remove(q);
    p->nidle--;
    ngx_connection_t *c = it->c;
    s->reused = it->reused + 1;
    s->counted = it->counted;
    s->pool = p;
    if (it->counted) {
        p->active++;
    }
    delete it;
    attach(s, c);
    metrics::countPoolHit(s->ctx);
    return true;
}

// The pool decides: an idle connection, a new one, or a wait in the
// backlog queue.
int connectFromPool(Tcp *s, lua_State *dst)
{
    Pool *p = findPool(s->key);
    bool refused = false;
    if (takeIdle(s, p, &refused)) {
        lua_pushinteger(dst, 1);
        return 1;
    }
    if (refused) {
        return failConnect(s, dst, kEgressDenied);
    }
    if (s->opt_has_backlog) {
        if (p == nullptr) {
            p = createPool(s->key, s->opt_pool_size
                                       ? s->opt_pool_size
                                       : s->ctx->llcf->socket_pool_size,
                           true, s->opt_backlog);
            if (p == nullptr) {
                return failConnect(s, dst, "no memory");
            }
        }
        if (p->backlog_on && p->active + p->nidle >= p->size) {
            if (p->nwaiting >= s->opt_backlog) {
                return failConnect(s, dst,
                                   "too many waiting connect operations");
            }
            ngx_queue_insert_tail(&p->waiters, &s->wait_q);
            p->nwaiting++;
            s->in_wait_q = true;
            s->pool = p;
            s->wait_ev.handler = entry::edge<backlogEvent>;
            s->wait_ev.data = s;
            s->wait_ev.log = s->ctx->r->connection->log;
            ngx_add_timer(&s->wait_ev, connectTimeout(s));
            return kPending;
        }
    } else if (p == nullptr && s->opt_pool_size) {
        p = createPool(s->key, s->opt_pool_size, false, 0);
    }
    if (p && p->backlog_on) {
        p->active++;
        s->counted = true;
        s->pool = p;
    }
    return resolveAndConnect(s, dst);
}

// Backlog: a waiter's turn came (posted) or its connect timeout fired.
void backlogEvent(ngx_event_t *ev)
{
    auto *s = static_cast<Tcp *>(ev->data);
    LuaThread *t = s->connector;
    if (t == nullptr) {
        return;
    }
    if (ev->timedout) {
        ev->timedout = 0;
        if (s->in_wait_q) {
            ngx_queue_remove(&s->wait_q);
            s->pool->nwaiting--;
            s->in_wait_q = false;
        }
        logError(s, "connect timed out while waiting in the backlog queue");
        settleConnect(s, [&](lua_State *co) {
            return failConnect(s, co, "timeout");
        });
        return;
    }
    settleConnect(s, [&](lua_State *co) { return connectFromPool(s, co); });
}

void wakeBacklog(Pool *p)
{
    if (!p->backlog_on || ngx_queue_empty(&p->waiters)
        || (p->nidle == 0 && p->active + p->nidle >= p->size))
    {
        return;
    }
    ngx_queue_t *q = ngx_queue_head(&p->waiters);
    Tcp *s = ngx_queue_data(q, Tcp, wait_q);
    ngx_queue_remove(q);
    p->nwaiting--;
    s->in_wait_q = false;
    if (s->wait_ev.timer_set) {
        ngx_del_timer(&s->wait_ev);
    }
    ngx_post_event(&s->wait_ev, &ngx_posted_events);
}

void cancelConnect(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->connector != t) {
        return;
    }
    s->connector = nullptr;
    sock::resolveCancel(&s->resolve);
    if (s->in_wait_q) {
        ngx_queue_remove(&s->wait_q);
        s->pool->nwaiting--;
        s->in_wait_q = false;
    }
    if (s->wait_ev.timer_set) {
        ngx_del_timer(&s->wait_ev);
    }
    if (s->wait_ev.posted) {
        ngx_delete_posted_event(&s->wait_ev);
    }
    if (s->c) {
        sock::closeConnection(s->c);
        s->c = nullptr;
    }
    releaseCount(s);
    sock::dropSlot(&s->slot);
}

int tcpConnect(lua_State *L)
{
    Run *run = glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    if (s->bound && s->ctx != run->ctx) {
        return luaL_error(L, "bad request");
    }
    int n = lua_gettop(L);
    if (n < 2 || n > 4) {
        return luaL_error(L, "ngx.socket connect: expecting 2, 3, or 4 "
                          "arguments (including the object), but seen %d",
                          n);
    }
    RequestCtx *ctx = run->ctx;
    size_t hlen;
    const char *host = luaL_checklstring(L, 2, &hlen);
    bool unix_path = hlen >= 5 && std::memcmp(host, "unix:", 5) == 0;
    int opts = 0;
    lua_Integer port = 0;
    if (unix_path) {
        if (n >= 3 && lua_istable(L, 3)) {
            opts = 3;
        }
    } else {
        if (n < 3 || !lua_isnumber(L, 3)) {
            return luaL_error(L, "bad argument #3 to 'connect' (number "
                              "expected, got %s)",
                              luaL_typename(L, 3));
        }
        port = lua_tointeger(L, 3);
        if (n == 4 && !lua_isnil(L, 4)) {  // nil: no options
            luaL_checktype(L, 4, LUA_TTABLE);
            opts = 4;
        }
        if (port < 0 || port > 65535) {
            lua_pushnil(L);
            lua_pushfstring(L, "bad port number: %d",
                            static_cast<int>(port));
            return 2;
        }
    }
    if (s->connector || s->shaker) {
        return pushNilErr(L, "socket busy connecting");
    }
    if (s->c) {
        // Reconnecting: the old connection goes first.
        closeSock(s, nullptr);
    }
    if (!bindRequest(s, ctx)) {
        return pushNilErr(L, "no memory");
    }

    s->host.assign(host, hlen);
    s->port = static_cast<in_port_t>(port);
    s->reused = 0;
    s->counted = false;
    s->pool = nullptr;
    s->opt_pool_size = 0;
    s->opt_backlog = 0;
    s->opt_has_backlog = false;
    bool named = false;
    if (opts) {
        lua_getfield(L, opts, "pool");
        if (lua_isstring(L, -1)) {
            size_t klen;
            const char *k = lua_tolstring(L, -1, &klen);
            s->key.assign(k, klen);
            named = true;
        } else if (!lua_isnil(L, -1)) {
            return luaL_error(L, "bad \"pool\" option type: %s",
                              luaL_typename(L, -1));
        }
        lua_pop(L, 1);
        lua_getfield(L, opts, "pool_size");
        if (!lua_isnil(L, -1)) {
            lua_Integer v = luaL_checkinteger(L, -1);
            if (v <= 0) {
                return luaL_error(L, "bad \"pool_size\" option value: %d",
                                  static_cast<int>(v));
            }
            s->opt_pool_size = static_cast<ngx_uint_t>(v);
        }
        lua_pop(L, 1);
        lua_getfield(L, opts, "backlog");
        if (!lua_isnil(L, -1)) {
            lua_Integer v = luaL_checkinteger(L, -1);
            if (v < 0) {
                return luaL_error(L, "bad \"backlog\" option value: %d",
                                  static_cast<int>(v));
            }
            s->opt_backlog = static_cast<ngx_uint_t>(v);
            s->opt_has_backlog = true;
        }
        lua_pop(L, 1);
    }
    if (!named) {
        s->key.assign(host, hlen);
        if (!unix_path) {
            s->key += ':';
            s->key += std::to_string(port);
        }
    }
    // Pools of different policies or VMs never mix, whatever name the
    // script gives: the key starts with their identities (inherited
    // policies are shared objects, so locations with the same settings
    // share pools; a lua_vm tenant never gets a connection another
    // tenant authenticated). The prefix ends with '|', which no pointer
    // contains.
    char policy[96];
    int plen = std::snprintf(policy, sizeof(policy), "%p,%p,%p|",
                             static_cast<const void *>(ctx->llcf->egress),
                             static_cast<const void *>(
                                 sandbox::policyOf(ctx->llcf)),
                             static_cast<const void *>(ctx->vm));
    s->key.insert(0, policy, static_cast<size_t>(plen));

    if (!sock::takeSlot(&s->slot, ctx, "tcp")) {
        return pushNilErr(L, sock::kTooManyConnections);
    }
    LuaThread *t = threads::current();
    int r = connectFromPool(s, L);
    if (r != kPending) {
        return r;
    }
    s->connector = t;
    t->cancel = cancelConnect;
    t->cancel_data = s;
    return glue::yield(L);
}

// ---- receive ----

void appendNoCr(std::string &acc, const char *p, size_t n)
{
    const char *end = p + n;
    while (p < end) {
        const char *cr = static_cast<const char *>(
            std::memchr(p, '\r', static_cast<size_t>(end - p)));
        if (cr == nullptr) {
            acc.append(p, static_cast<size_t>(end - p));
            return;
        }
        acc.append(p, static_cast<size_t>(cr - p));
        p = cr + 1;
    }
}

// An until-read over rbuf: emits data before the pattern into acc.
// Returns true when the whole pattern was seen.
bool untilScan(Tcp *s, Until *u)
{
    const char *pat = u->pat();
    uint32_t *fail = u->fail();
    while (s->rpos < s->rlast) {
        if (u->limit && s->acc.size() >= u->limit) {
            return false;
        }
        if (u->matched == 0) {
            const char *p = s->rbuf + s->rpos;
            size_t n = s->rlast - s->rpos;
            if (u->limit && n > u->limit - s->acc.size()) {
                n = u->limit - s->acc.size();
            }
            const char *hit = static_cast<const char *>(
                std::memchr(p, pat[0], n));
            if (hit == nullptr) {
                s->acc.append(p, n);
                s->rpos += n;
                continue;
            }
            s->acc.append(p, static_cast<size_t>(hit - p));
            s->rpos += static_cast<size_t>(hit - p) + 1;
            u->matched = 1;
        } else if (s->rbuf[s->rpos] == pat[u->matched]) {
            u->matched++;
            s->rpos++;
        } else {
            size_t k = fail[u->matched - 1];
            s->acc.append(pat, u->matched - k);
            u->matched = k;
            continue;
        }
        if (u->matched == u->plen) {
            u->matched = 0;
            return true;
        }
    }
    return false;
}

// One step of the pending read: consume what rbuf holds, receive more.
// Done leaves the result in s->res (null: a nil result).
// ngx.req.socket(): nginx discards what the script leaves of the body
// (keepalive must not take it for the next request), so its length says
// what is still unread.
void bodyTaken(Tcp *s)
{
    if (s->downstream && !s->raw && s->ctx) {
        s->ctx->r->headers_in.content_length_n = s->body_left;
    }
}

// What a read collects in acc waits outside the Lua VM, then becomes a
// Lua string as large: it may not take more than the request's
// lua_budget_memory still allows (an upstream announcing a huge length
// must not grow the worker).
bool accFits(Tcp *s, size_t total)
{
    RequestCtx *ctx = s->ctx;
    if (ctx == nullptr || ctx->limits == nullptr
        || ctx->limits->memory == 0)
    {
        return true;
    }
    int64_t used = ctx->usage.mem_net > 0 ? ctx->usage.mem_net : 0;
    int64_t left = ctx->limits->memory - used;
    return left > 0 && total <= static_cast<uint64_t>(left);
}

RStatus readProgress(Tcp *s)
{
    ngx_connection_t *c = s->c;
    for (;;) {
        if (s->rpos < s->rlast) {
            char *p = s->rbuf + s->rpos;
            size_t avail = s->rlast - s->rpos;
            switch (s->rmode) {
            case RMode::Line: {
                auto *lf = static_cast<char *>(std::memchr(p, '\n', avail));
                if (lf == nullptr) {
                    appendNoCr(s->acc, p, avail);
                    s->rpos = s->rlast;
                    break;
                }
                size_t seg = static_cast<size_t>(lf - p);
                s->rpos += seg + 1;
                if (s->acc.empty()) {
                    auto *cr = static_cast<char *>(std::memchr(p, '\r', seg));
                    if (cr == nullptr || cr == lf - 1) {
                        s->res = p;
                        s->res_len = cr ? seg - 1 : seg;
                        return RStatus::Done;
                    }
                }
                appendNoCr(s->acc, p, seg);
                s->res = s->acc.data();
                s->res_len = s->acc.size();
                return RStatus::Done;
            }
            case RMode::Size: {
                if (s->acc.empty() && avail >= s->rsize) {
                    s->res = p;
                    s->res_len = s->rsize;
                    s->rpos += s->rsize;
                    return RStatus::Done;
                }
                size_t need = s->rsize - s->acc.size();
                size_t take = avail < need ? avail : need;
                s->acc.append(p, take);
                s->rpos += take;
                if (s->acc.size() == s->rsize) {
                    s->res = s->acc.data();
                    s->res_len = s->acc.size();
                    return RStatus::Done;
                }
                break;
            }
            case RMode::Any: {
                size_t take = avail < s->rsize ? avail : s->rsize;
                s->res = p;
                s->res_len = take;
                s->rpos += take;
                return RStatus::Done;
            }
            case RMode::All:
                s->acc.append(p, avail);
                s->rpos = s->rlast;
                break;
            case RMode::Until: {
                Until *u = s->until;
                bool found = untilScan(s, u);
                if (found) {
                    if (u->inclusive) {
                        s->acc.append(u->pat(), u->plen);
                    }
                    // Sized: the data before the pattern, "" too, and
                    // nil on the next call (lua-resty-upload counts on
                    // the "" when a chunk ended just before a boundary).
                    if (u->limit) {
                        u->eof_pending = true;
                    }
                    s->res = s->acc.data();
                    s->res_len = s->acc.size();
                    return RStatus::Done;
                }
                if (u->limit && s->acc.size() >= u->limit) {
                    s->res = s->acc.data();
                    s->res_len = s->acc.size();
                    return RStatus::Done;
                }
                break;
            }
            }
        }

        // rbuf is used up: receive. Big sized reads go straight into acc.
        s->rpos = s->rlast = 0;
        if (s->body_left == 0) {
            return RStatus::Closed;   // the request body is over
        }
        size_t have = s->acc.size();
        bool direct = s->rmode == RMode::Size && s->rsize - have >= s->rcap;
        if (!accFits(s, direct ? s->rsize : have + s->rcap)) {
            api::refuseMemory(s->ctx, "a socket receive");
            s->err = "not enough memory (luaguard: lua_budget_memory "
                     "exceeded by a socket receive)";
            std::string().swap(s->acc);  // no partial result: too big
            return RStatus::Error;
        }
        char *dst = s->rbuf;
        size_t room = s->rcap;
        if (direct) {
            try {
                s->acc.resize(s->rsize);
            } catch (const std::exception &) {
                s->err = "no memory";   // never thrown through nginx
                return RStatus::Error;
            }
            dst = &s->acc[have];
            room = s->rsize - have;
        }
        if (s->body_left > 0 && static_cast<off_t>(room) > s->body_left) {
            room = static_cast<size_t>(s->body_left);
        }
        ssize_t n = c->recv(c, reinterpret_cast<u_char *>(dst), room);
        if (direct) {
            s->acc.resize(have + (n > 0 ? static_cast<size_t>(n) : 0));
        }
        if (n == NGX_AGAIN) {
            return RStatus::Again;
        }
        if (n == 0) {
            return RStatus::Closed;
        }
        if (n < 0) {
            ngx_err_t e = ngx_socket_errno;
            s->err = e ? sock::errnoText(e) : "error";
            return RStatus::Error;
        }
        if (s->body_left > 0) {
            s->body_left -= n;
            bodyTaken(s);
        }
        if (direct) {
            if (s->acc.size() == s->rsize) {
                s->res = s->acc.data();
                s->res_len = s->acc.size();
                return RStatus::Done;
            }
            continue;
        }
        s->rlast = static_cast<size_t>(n);
    }
}

// Pushes the outcome of a finished read on dst; returns the count.
int pushRead(Tcp *s, lua_State *dst, RStatus st, bool timeout)
{
    if (st == RStatus::Done) {
        if (s->res == nullptr) {
            lua_pushnil(dst);
        } else {
            lua_pushlstring(dst, s->res, s->res_len);
        }
        s->acc.clear();
        if (s->rmode == RMode::Until && !s->until->eof_pending
            && s->until->limit == 0)
        {
            s->until->matched = 0;
        }
        return 1;
    }
    const char *err = timeout ? "timeout"
                      : st == RStatus::Closed ? "closed" : s->err.c_str();
    if (st == RStatus::Closed && s->downstream && s->body_left != 0) {
        err = "client aborted";   // not the end of the body: the client's
    }
    if (s->rmode == RMode::All && st == RStatus::Closed) {
        lua_pushlstring(dst, s->acc.data(), s->acc.size());
        s->acc.clear();
        // The read side is over; the connection stays until close().
        // The next read answers nil, "closed", "" as lua-nginx-module's.
        s->all_ended = true;
        return 1;
    }
    lua_pushnil(dst);
    lua_pushstring(dst, err);
    if (s->rmode == RMode::Until) {
        s->acc.append(s->until->pat(), s->until->matched);
        s->until->matched = 0;
    }
    lua_pushlstring(dst, s->acc.data(), s->acc.size());
    s->acc.clear();
    if (!timeout && st == RStatus::Closed && !s->downstream) {
        // The peer's FIN ends the read half only: send() still writes and
        // close() answers 1, as in lua-nginx-module (HTTP/1.0 and
        // "Connection: close" upstreams).
        s->read_closed = true;
    } else if (!timeout) {
        if (s->log_errors && st == RStatus::Error && s->ctx) {
            ngx_log_error(NGX_LOG_ERR, s->ctx->r->connection->log, 0,
                          "lua tcp socket read failed: %s", err);
        }
        closeSock(s, s->reader);
    } else {
        logError(s, "read timed out");
    }
    return 3;
}

// Hands the waiting reader what `push` pushes (data or an error).
template <typename Push>
void finishReader(Tcp *s, LuaThread *t, Push &&push)
{
    if (s->reader == t) {
        s->reader = nullptr;
    }
    if (s->downstream && s->saved_read && s->ctx) {
        s->ctx->r->read_event_handler = s->saved_read;
        s->saved_read = nullptr;
    }
    t->cancel = nullptr;
    entry::resume(t, push);
}

void readEvent(Tcp *s, ngx_event_t *ev)
{
    LuaThread *t = s->reader;
    if (t == nullptr) {
        return;  // nobody reads now: the data waits in the kernel
    }
    if (ev->timedout) {
        ev->timedout = 0;
        finishReader(s, t, [&](lua_State *co) {
            return pushRead(s, co, RStatus::Again, true);
        });
        return;
    }
    RStatus st = readProgress(s);
    if (st == RStatus::Again) {
        if (ngx_handle_read_event(ev, 0) != NGX_OK) {
            s->err = "failed to wait for the socket";
            st = RStatus::Error;
        } else {
            return;
        }
    }
    if (ev->timer_set) {
        ngx_del_timer(ev);
    }
    finishReader(s, t, [&](lua_State *co) {
        return pushRead(s, co, st, false);
    });
}

void onRead(ngx_event_t *ev)
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    readEvent(static_cast<Tcp *>(c->data), ev);
}

void reqReadHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    Tcp *s = reqSocket(ctx);
    if (s && s->c) {
        readEvent(s, r->connection->read);
    }
}

void cancelRead(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->reader != t) {
        return;
    }
    s->reader = nullptr;
    s->acc.clear();
    if (s->c && s->c->read->timer_set) {
        ngx_del_timer(s->c->read);
    }
    if (s->downstream && s->saved_read && s->ctx) {
        s->ctx->r->read_event_handler = s->saved_read;
        s->saved_read = nullptr;
    }
}

// Runs a read of mode `m`; returns the Lua result count or yields.
int startRead(lua_State *L, Tcp *s, RMode m, size_t size, Until *u)
{
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->read_closed) {
        return pushNilErr(L, "closed");
    }
    if (s->all_ended) {
        s->all_ended = false;
        s->read_closed = true;
        lua_pushnil(L);
        lua_pushliteral(L, "closed");
        lua_pushliteral(L, "");
        return 3;
    }
    if (s->reader) {
        return pushNilErr(L, "socket busy reading");
    }
    if (s->shaker) {
        return pushNilErr(L, "socket busy");
    }
    getRbuf(s);
    if (s->rbuf == nullptr) {
        return pushNilErr(L, "no memory");
    }
    s->rmode = m;
    s->rsize = size;
    s->until = u;
    s->acc.clear();
    RStatus st = readProgress(s);
    if (st != RStatus::Again) {
        return pushRead(s, L, st, false);
    }
    ngx_connection_t *c = s->c;
    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        s->err = "failed to wait for the socket";
        return pushRead(s, L, RStatus::Error, false);
    }
    LuaThread *t = threads::current();
    s->reader = t;
    if (s->downstream && s->saved_read == nullptr) {
        s->saved_read = s->ctx->r->read_event_handler;
        s->ctx->r->read_event_handler = entry::edge<reqReadHandler>;
    }
    t->cancel = cancelRead;
    t->cancel_data = s;
    ngx_add_timer(c->read, readTimeout(s));
    return glue::yield(L);
}

int tcpReceive(lua_State *L)
{
    Tcp *s = use(L);
    int n = lua_gettop(L);
    if (n > 2) {
        return luaL_error(L, "expecting 1 or 2 arguments (including the "
                          "object), but got %d", n);
    }
    RMode m = RMode::Line;
    size_t size = 0;
    if (n == 2) {
        if (lua_type(L, 2) == LUA_TNUMBER
            || (lua_type(L, 2) == LUA_TSTRING && lua_isnumber(L, 2)))
        {
            lua_Number v = lua_tonumber(L, 2);
            if (v < 0) {
                return luaL_argerror(L, 2, "bad pattern argument");
            }
            size = static_cast<size_t>(v);
            if (size == 0) {
                if (s->c == nullptr) {
                    return pushNilErr(L, "closed");
                }
                lua_pushliteral(L, "");
                return 1;
            }
            m = RMode::Size;
        } else if (lua_type(L, 2) == LUA_TSTRING) {
            const char *p = lua_tostring(L, 2);
            if (p[0] == '*' && p[1] == 'l' && p[2] == '\0') {
                m = RMode::Line;
            } else if (p[0] == '*' && p[1] == 'a' && p[2] == '\0') {
                m = RMode::All;
            } else {
                return luaL_argerror(L, 2, "bad pattern argument");
            }
        } else if (!lua_isnil(L, 2)) {
            return luaL_argerror(L, 2, "bad pattern argument");
        }
    }
    return startRead(L, s, m, size, nullptr);
}

int tcpReceiveAny(lua_State *L)
{
    Tcp *s = use(L);
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "expecting 2 arguments (including the object), "
                          "but got %d", lua_gettop(L));
    }
    lua_Integer max = luaL_checkinteger(L, 2);
    if (max <= 0) {
        return luaL_argerror(L, 2, "bad max argument");
    }
    return startRead(L, s, RMode::Any, static_cast<size_t>(max), nullptr);
}

int untilIterator(lua_State *L)
{
    // upvalue 1: the socket table; 2: the Until state.
    glue::checkPhase(L, sock::kPhases);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    Tcp *s = use(L);
    auto *u = static_cast<Until *>(lua_touserdata(L, lua_upvalueindex(2)));
    size_t limit = 0;
    if (lua_gettop(L) >= 2 && !lua_isnil(L, 2)) {
        lua_Integer v = luaL_checkinteger(L, 2);
        if (v < 0) {
            return luaL_argerror(L, 1, "bad size argument");
        }
        limit = static_cast<size_t>(v);
    }
    if (u->eof_pending) {
        u->eof_pending = false;
        u->matched = 0;
        lua_pushnil(L);
        return 1;
    }
    u->limit = limit;
    return startRead(L, s, RMode::Until, 0, u);
}

int tcpReceiveUntil(lua_State *L)
{
    // Only the iterator reads: it checks the request, as in
    // lua-nginx-module.
    glue::checkPhase(L, sock::kPhases);
    self(L);
    int n = lua_gettop(L);
    if (n < 2 || n > 3) {
        return luaL_error(L, "expecting 2 or 3 arguments (including the "
                          "object), but got %d", n);
    }
    size_t plen;
    const char *pat = luaL_checklstring(L, 2, &plen);
    if (plen == 0) {
        return pushNilErr(L, "pattern is empty");
    }
    bool inclusive = false;
    if (n == 3 && !lua_isnil(L, 3)) {
        luaL_checktype(L, 3, LUA_TTABLE);
        lua_getfield(L, 3, "inclusive");
        if (!lua_isnil(L, -1)) {
            if (!lua_isboolean(L, -1)) {
                return luaL_error(L, "bad \"inclusive\" option value type: "
                                  "%s", luaL_typename(L, -1));
            }
            inclusive = lua_toboolean(L, -1);
        }
        lua_pop(L, 1);
    }
    size_t bytes = sizeof(Until) + ((plen + 3) & ~size_t(3))
                   + plen * sizeof(uint32_t);
    lua_pushvalue(L, 1);
    auto *u = static_cast<Until *>(lua_newuserdata(L, bytes));
    u->plen = plen;
    u->matched = 0;
    u->limit = 0;
    u->inclusive = inclusive;
    u->eof_pending = false;
    std::memcpy(u->pat(), pat, plen);
    // KMP borders: fail[i] = longest proper border of pat[0..i].
    uint32_t *fail = u->fail();
    fail[0] = 0;
    for (size_t i = 1, k = 0; i < plen; i++) {
        while (k > 0 && pat[i] != pat[k]) {
            k = fail[k - 1];
        }
        if (pat[i] == pat[k]) {
            k++;
        }
        fail[i] = static_cast<uint32_t>(k);
    }
    luaL_getmetatable(L, kUntilMeta);
    lua_setmetatable(L, -2);
    lua_pushcclosure(L, untilIterator, 2);
    return 1;
}

// ---- send ----

// Sends s->sbuf[spos..] (or p,len when sbuf is unused); NGX_OK when all
// went out, NGX_AGAIN, NGX_ERROR with s->err.
ngx_int_t sendSome(Tcp *s, const char **p, size_t *len)
{
    ngx_connection_t *c = s->c;
    while (*len > 0) {
        ssize_t n = c->send(c, reinterpret_cast<u_char *>(
                                   const_cast<char *>(*p)), *len);
        if (n == NGX_AGAIN || n == 0) {
            return NGX_AGAIN;
        }
        if (n < 0) {
            ngx_err_t e = ngx_socket_errno;
            s->err = e ? sock::errnoText(e) : "error";
            return NGX_ERROR;
        }
        *p += n;
        *len -= static_cast<size_t>(n);
    }
    return NGX_OK;
}

int sendFailed(Tcp *s, lua_State *dst)
{
    if (s->log_errors && s->ctx) {
        ngx_log_error(NGX_LOG_ERR, s->ctx->r->connection->log, 0,
                      "lua tcp socket write failed: %s", s->err.c_str());
    }
    std::string err = s->err;
    closeSock(s, s->writer);
    lua_pushnil(dst);
    lua_pushlstring(dst, err.data(), err.size());
    return 2;
}

// Hands the waiting writer what `push` pushes.
template <typename Push>
void finishWriter(Tcp *s, LuaThread *t, Push &&push)
{
    if (s->writer == t) {
        s->writer = nullptr;
    }
    if (s->downstream && s->saved_write && s->ctx) {
        s->ctx->r->write_event_handler = s->saved_write;
        s->saved_write = nullptr;
    }
    releaseSendBuf(s);
    t->cancel = nullptr;
    entry::resume(t, push);
}

void writeEvent(Tcp *s, ngx_event_t *ev)
{
    LuaThread *t = s->writer;
    if (t == nullptr) {
        return;
    }
    if (ev->timedout) {
        ev->timedout = 0;
        logError(s, "write timed out");
        s->err = "timeout";
        closeSock(s, t);
        finishWriter(s, t, [](lua_State *co) {
            lua_pushnil(co);
            lua_pushliteral(co, "timeout");
            return 2;
        });
        return;
    }
    const char *p = s->sbuf.data() + s->spos;
    size_t len = s->sbuf.size() - s->spos;
    ngx_int_t rc = sendSome(s, &p, &len);
    s->spos = s->sbuf.size() - len;
    if (rc == NGX_AGAIN) {
        if (ngx_handle_write_event(ev, s->lowat) == NGX_OK) {
            return;
        }
        s->err = "failed to wait for the socket";
        rc = NGX_ERROR;
    }
    if (ev->timer_set) {
        ngx_del_timer(ev);
    }
    if (rc == NGX_ERROR) {
        finishWriter(s, t, [&](lua_State *co) { return sendFailed(s, co); });
        return;
    }
    finishWriter(s, t, [s](lua_State *co) {
        lua_pushinteger(co, static_cast<lua_Integer>(s->stotal));
        return 1;
    });
}

void onWrite(ngx_event_t *ev)
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    writeEvent(static_cast<Tcp *>(c->data), ev);
}

void reqWriteHandler(ngx_http_request_t *r)
{
    RequestCtx *ctx = getCtx(r);
    Tcp *s = reqSocket(ctx);
    if (s && s->c) {
        writeEvent(s, r->connection->write);
    }
}

void cancelWrite(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->writer != t) {
        return;
    }
    s->writer = nullptr;
    releaseSendBuf(s);
    if (s->c && s->c->write->timer_set) {
        ngx_del_timer(s->c->write);
    }
    if (s->downstream && s->saved_write && s->ctx) {
        s->ctx->r->write_event_handler = s->saved_write;
        s->saved_write = nullptr;
    }
}

int tcpSend(lua_State *L)
{
    Tcp *s = use(L);
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "expecting 2 arguments (including the object), "
                          "but got %d", lua_gettop(L));
    }
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->writer) {
        return pushNilErr(L, "socket busy writing");
    }
    if (s->shaker) {
        return pushNilErr(L, "socket busy");
    }
    const char *p;
    size_t len;
    bool copied = false;
    switch (lua_type(L, 2)) {
    case LUA_TSTRING:
    case LUA_TNUMBER:
        p = lua_tolstring(L, 2, &len);
        break;
    case LUA_TBOOLEAN:
        p = lua_toboolean(L, 2) ? "true" : "false";
        len = std::strlen(p);
        break;
    case LUA_TNIL:
        p = "nil";
        len = 3;
        break;
    case LUA_TTABLE:
        s->sbuf.clear();
        sock::flatten(L, 2, &s->sbuf, 0);
        p = s->sbuf.data();
        len = s->sbuf.size();
        copied = true;
        break;
    default:
        return luaL_error(L, "bad argument #2 to '?' (string, number, "
                          "boolean, nil, or array table expected, got %s)",
                          luaL_typename(L, 2));
    }
    s->stotal = len;
    ngx_int_t rc = sendSome(s, &p, &len);
    if (rc == NGX_OK) {
        lua_pushinteger(L, static_cast<lua_Integer>(s->stotal));
        return 1;
    }
    if (rc == NGX_ERROR) {
        return sendFailed(s, L);
    }
    // The rest waits in sbuf: the Lua string may not outlive the yield.
    // That copy is outside the Lua VM: charged to the request's
    // lua_budget_memory until the send is over (past it, the request is
    // stopped: one request's sockets cannot park its data many times).
    chargeMemory(L, copied ? s->sbuf.size() : len, "a socket send");
    s->scharged = copied ? s->sbuf.size() : len;
    if (copied) {
        s->spos = s->sbuf.size() - len;
    } else {
        s->sbuf.assign(p, len);
        s->spos = 0;
    }
    ngx_connection_t *c = s->c;
    if (ngx_handle_write_event(c->write, s->lowat) != NGX_OK) {
        s->err = "failed to wait for the socket";
        return sendFailed(s, L);
    }
    LuaThread *t = threads::current();
    s->writer = t;
    if (s->downstream && s->saved_write == nullptr) {
        s->saved_write = s->ctx->r->write_event_handler;
        s->ctx->r->write_event_handler = entry::edge<reqWriteHandler>;
    }
    t->cancel = cancelWrite;
    t->cancel_data = s;
    ngx_add_timer(c->write, sendTimeout(s));
    return glue::yield(L);
}

// ---- the rest ----

int tcpClose(lua_State *L)
{
    Tcp *s = use(L);
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    closeSock(s, nullptr);
    lua_pushinteger(L, 1);
    return 1;
}

int tcpSetKeepalive(lua_State *L)
{
    Tcp *s = use(L);
    int n = lua_gettop(L);
    if (n > 3) {
        return luaL_error(L, "expecting 1 to 3 arguments (including the "
                          "object), but got %d", n);
    }
    ngx_connection_t *c = s->c;
    if (c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->reader || s->writer || s->connector || s->shaker) {
        return pushNilErr(L, "socket busy");
    }
    if (s->rpos < s->rlast) {
        return pushNilErr(L, "unread data in buffer");
    }
    ngx_msec_t timeout = s->ctx->llcf->socket_keepalive_timeout;
    if (n >= 2 && !lua_isnil(L, 2)) {
        lua_Integer v = luaL_checkinteger(L, 2);
        if (v < 0) {
            return luaL_error(L, "bad argument #2 to 'setkeepalive' "
                              "(invalid timeout)");
        }
        timeout = static_cast<ngx_msec_t>(v);
    }
    ngx_uint_t size = s->ctx->llcf->socket_pool_size;
    if (n >= 3 && !lua_isnil(L, 3)) {
        lua_Integer v = luaL_checkinteger(L, 3);
        if (v <= 0) {
            return luaL_error(L, "bad argument #3 to 'setkeepalive' (invalid "
                              "pool size)");
        }
        size = static_cast<ngx_uint_t>(v);
    }
    if (s->read_closed || s->all_ended) {
        // The read half met the peer's end: the reference answers
        // "closed" and leaves the connection to close().
        return pushNilErr(L, "closed");
    }
    if (c->read->eof || c->read->error || c->write->error) {
        closeSock(s, nullptr);
        return pushNilErr(L, "connection in dubious state");
    }

    Pool *p = s->counted ? s->pool : findPool(s->key);
    if (p == nullptr) {
        p = createPool(s->key, size, false, 0);
        if (p == nullptr) {
            closeSock(s, nullptr);
            return pushNilErr(L, "no memory");
        }
    }
    auto *it = new (std::nothrow) Idle();
    if (it == nullptr) {
        closeSock(s, nullptr);
        return pushNilErr(L, "no memory");
    }
    if (p->nidle >= p->size) {
        // Full: the least recently parked one makes room.
        Idle *old = ngx_queue_data(ngx_queue_last(&p->idle), Idle, q);
        closeIdle(old);
    }
    it->c = c;
    it->pool = p;
    copyTarget(&it->peer, s->target);
    it->reused = s->reused;
    it->counted = s->counted;
    if (s->counted) {
        p->active--;
        s->counted = false;
    }
    ngx_queue_insert_head(&p->idle, &it->q);
    p->nidle++;

    s->c = nullptr;
    sock::dropSlot(&s->slot);  // the pool's now, not the request's
    c->data = it;
    c->idle = 1;
    c->log = ngx_cycle->log;
    c->read->log = ngx_cycle->log;
    c->write->log = ngx_cycle->log;
    c->read->handler = entry::edge<idleHandler>;
    c->write->handler = entry::edge<idleHandler>;
    if (c->write->timer_set) {
        ngx_del_timer(c->write);
    }
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    if (timeout) {
        ngx_add_timer(c->read, timeout);
    }
    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        closeIdle(it);
    } else if (c->read->ready) {
        // Something came in already (a close, stray bytes): check now.
        idleHandler(c->read);
    }
    putRbuf(s);
    wakeBacklog(p);
    lua_pushinteger(L, 1);
    return 1;
}

int tcpGetReusedTimes(lua_State *L)
{
    // A count, no I/O: any request may read it, as in lua-nginx-module.
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    lua_pushinteger(L, static_cast<lua_Integer>(s->reused));
    return 1;
}

ngx_msec_t timeoutArg(lua_State *L, int idx)
{
    if (lua_isnil(L, idx)) {
        return 0;
    }
    lua_Number v = luaL_checknumber(L, idx);
    if (v < 0) {
        luaL_error(L, "bad timeout value");
    }
    return static_cast<ngx_msec_t>(v);
}

int tcpSetTimeout(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "ngx.socket settimout: expecting 2 arguments "
                          "(including the object) but seen %d",
                          lua_gettop(L));
    }
    ngx_msec_t ms = timeoutArg(L, 2);
    s->connect_timeout = s->send_timeout = s->read_timeout = ms;
    return 0;
}

int tcpSetTimeouts(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    if (lua_gettop(L) != 4) {
        return luaL_error(L, "ngx.socket settimout: expecting 4 arguments "
                          "(including the object) but seen %d",
                          lua_gettop(L));
    }
    s->connect_timeout = timeoutArg(L, 2);
    s->send_timeout = timeoutArg(L, 3);
    s->read_timeout = timeoutArg(L, 4);
    return 0;
}

int tcpSetOption(lua_State *L)
{
    Tcp *s = use(L);
    const char *opt = luaL_checkstring(L, 2);
    if (!s->bound) {
        return luaL_error(L, "socket is never created nor connected");
    }
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    int level = SOL_SOCKET, name;
    if (std::strcmp(opt, "keepalive") == 0) {
        name = SO_KEEPALIVE;
    } else if (std::strcmp(opt, "reuseaddr") == 0) {
        name = SO_REUSEADDR;
    } else if (std::strcmp(opt, "tcp-nodelay") == 0) {
        level = IPPROTO_TCP;
        name = TCP_NODELAY;
    } else if (std::strcmp(opt, "sndbuf") == 0) {
        name = SO_SNDBUF;
    } else if (std::strcmp(opt, "rcvbuf") == 0) {
        name = SO_RCVBUF;
    } else {
        lua_pushnil(L);
        lua_pushfstring(L, "unsupported option %s", opt);
        return 2;
    }
    int v;
    if (lua_isboolean(L, 3)) {
        v = lua_toboolean(L, 3);
    } else {
        v = static_cast<int>(luaL_checkinteger(L, 3));
    }
    if (setsockopt(s->c->fd, level, name, &v, sizeof(v)) == -1) {
        lua_pushnil(L);
        lua_pushstring(L, sock::errnoText(ngx_socket_errno).c_str());
        return 2;
    }
    lua_pushboolean(L, 1);
    return 1;
}

int tcpBind(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L);
    size_t len;
    const char *addr = luaL_checklstring(L, 2, &len);
    Target t;
    if (!sock::literal(addr, len, 0, &t)
        || t.addr.ss_family == AF_UNIX)
    {
        lua_pushnil(L);
        lua_pushfstring(L, "bad address");
        return 2;
    }
    std::memcpy(&s->local_addr, &t.addr, t.len);
    s->local.sockaddr = reinterpret_cast<struct sockaddr *>(&s->local_addr);
    s->local.socklen = t.len;
    s->local.name.data = nullptr;
    s->local.name.len = 0;
    s->has_local = true;
    lua_pushinteger(L, 1);
    return 1;
}


// ---- TLS ----

const char kSessionMeta[] = "luaguard.ssl_session";

int sessionGc(lua_State *L)
{
    auto **sp = static_cast<ngx_ssl_session_t **>(lua_touserdata(L, 1));
    if (sp && *sp) {
        ngx_ssl_free_session(*sp);
        *sp = nullptr;
    }
    return 0;
}

void sslCleanup(void *data)
{
    ngx_ssl_cleanup_ctx(data);
}

// The client TLS context of a location (lua_ssl_* directives). Made
// while the configuration is read when a trusted certificate is given (the
// master can read files a worker may not), else on first use; kept for the
// life of the configuration.
// lua_ssl_crl: peers' certificates are checked against the list, the
// whole chain as nginx's ssl_crl does.
bool loadCrl(ngx_ssl_t *ssl, ngx_str_t file, ngx_pool_t *pool, ngx_log_t *log,
             ngx_str_t *prefix, std::string *err)
{
    if (ngx_get_full_name(pool, prefix, &file) != NGX_OK) {
        *err = "no memory";
        return false;
    }
    std::string path(reinterpret_cast<char *>(file.data), file.len);
    X509_STORE *store = SSL_CTX_get_cert_store(ssl->ctx);
    X509_LOOKUP *lookup = store ? X509_STORE_add_lookup(store,
                                                        X509_LOOKUP_file())
                                : nullptr;
    if (lookup == nullptr
        || X509_LOOKUP_load_file(lookup, path.c_str(), X509_FILETYPE_PEM)
               != 1)
    {
        ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                      const_cast<char *>("X509_LOOKUP_load_file(\"%s\") "
                                         "failed"), path.c_str());
        *err = "failed to load lua_ssl_crl";
        return false;
    }
    X509_STORE_set_flags(store,
                         X509_V_FLAG_CRL_CHECK | X509_V_FLAG_CRL_CHECK_ALL);
    ERR_clear_error();
    return true;
}

// lua_ssl_conf_command: OpenSSL's SSL_CONF commands, as nginx's
// ssl_conf_command applies them to a server context.
bool applyConfCommands(ngx_ssl_t *ssl, ngx_array_t *commands, ngx_log_t *log,
                       std::string *err)
{
    SSL_CONF_CTX *cctx = SSL_CONF_CTX_new();
    if (cctx == nullptr) {
        *err = "SSL_CONF_CTX_new() failed";
        return false;
    }
    SSL_CONF_CTX_set_flags(cctx, SSL_CONF_FLAG_FILE | SSL_CONF_FLAG_CLIENT
                                 | SSL_CONF_FLAG_CERTIFICATE
                                 | SSL_CONF_FLAG_SHOW_ERRORS);
    SSL_CONF_CTX_set_ssl_ctx(cctx, ssl->ctx);
    auto *kv = static_cast<ngx_keyval_t *>(commands->elts);
    bool ok = true;
    for (ngx_uint_t i = 0; ok && i < commands->nelts; i++) {
        std::string k(reinterpret_cast<char *>(kv[i].key.data), kv[i].key.len);
        std::string v(reinterpret_cast<char *>(kv[i].value.data),
                      kv[i].value.len);
        if (SSL_CONF_cmd(cctx, k.c_str(), v.c_str()) <= 0) {
            ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                          const_cast<char *>("SSL_CONF_cmd(\"%s\", \"%s\") "
                                             "failed"), k.c_str(), v.c_str());
            *err = "bad lua_ssl_conf_command \"" + k + "\"";
            ok = false;
        }
    }
    if (ok && SSL_CONF_CTX_finish(cctx) != 1) {
        *err = "SSL_CONF_CTX_finish() failed";
        ok = false;
    }
    SSL_CONF_CTX_free(cctx);
    ERR_clear_error();
    return ok;
}

ngx_ssl_t *makeSslContext(LocConf *lc, ngx_pool_t *pool, ngx_log_t *log,
                          ngx_str_t *prefix, std::string *err)
{
    auto *ssl = static_cast<ngx_ssl_t *>(ngx_pcalloc(pool,
                                                     sizeof(ngx_ssl_t)));
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(pool, 0);
    if (ssl == nullptr || cln == nullptr) {
        *err = "no memory";
        return nullptr;
    }
    ssl->log = log;
    if (ngx_ssl_create(ssl, lc->ssl_protocols, nullptr) != NGX_OK) {
        *err = "failed to create the SSL context";
        return nullptr;
    }
    cln->handler = sslCleanup;
    cln->data = ssl;
    SSL_CTX_set_mode(ssl->ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    std::string ciphers(reinterpret_cast<char *>(lc->ssl_ciphers.data),
                        lc->ssl_ciphers.len);
    if (SSL_CTX_set_cipher_list(ssl->ctx, ciphers.c_str()) == 0) {
        ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                      const_cast<char *>("SSL_CTX_set_cipher_list(\"%s\") "
                                         "failed"), ciphers.c_str());
        *err = "bad lua_ssl_ciphers";
        return nullptr;
    }
    SSL_CTX_set_verify_depth(ssl->ctx, static_cast<int>(lc->ssl_verify_depth));
    if (lc->ssl_trusted_certificate.len) {
        ngx_str_t name = lc->ssl_trusted_certificate;
        if (ngx_get_full_name(pool, prefix, &name) != NGX_OK) {
            *err = "no memory";
            return nullptr;
        }
        std::string path(reinterpret_cast<char *>(name.data), name.len);
        if (SSL_CTX_load_verify_locations(ssl->ctx, path.c_str(), nullptr)
            == 0)
        {
            ngx_ssl_error(NGX_LOG_EMERG, log, 0,
                          const_cast<char *>("SSL_CTX_load_verify_locations"
                                             "(\"%s\") failed"),
                          path.c_str());
            *err = "failed to load lua_ssl_trusted_certificate";
            return nullptr;
        }
        ERR_clear_error();
    }
    if (lc->ssl_crl.len && !loadCrl(ssl, lc->ssl_crl, pool, log, prefix, err))
    {
        return nullptr;
    }
    if (lc->ssl_conf_commands
        && !applyConfCommands(ssl, lc->ssl_conf_commands, log, err))
    {
        return nullptr;
    }
    return ssl;
}

ngx_ssl_t *sslContext(LocConf *lc, std::string *err)
{
    if (lc->ssl == nullptr) {
        ngx_str_t prefix;
        prefix.data = ngx_cycle->conf_prefix.data;
        prefix.len = ngx_cycle->conf_prefix.len;
        lc->ssl = makeSslContext(lc, ngx_cycle->pool, ngx_cycle->log,
                                 &prefix, err);
    }
    return static_cast<ngx_ssl_t *>(lc->ssl);
}

// The handshake is over (or failed): checks, then the results.
int handshakeDone(Tcp *s, lua_State *dst, const char *fail)
{
    ngx_connection_t *c = s->c;
    std::string err;
    if (fail) {
        err = fail;
    } else if (!c->ssl || !c->ssl->handshaked) {
        err = "handshake failed";
    } else if (s->ssl_verify) {
        long rc = SSL_get_verify_result(c->ssl->connection);
        if (rc != X509_V_OK) {
            err = std::to_string(rc) + ": "
                  + X509_verify_cert_error_string(rc);
        } else if (!s->sni.empty()) {
            ngx_str_t name;
            name.data = reinterpret_cast<u_char *>(&s->sni[0]);
            name.len = s->sni.size();
            if (ngx_ssl_check_host(c, &name) != NGX_OK) {
                err = "certificate host mismatch";
            }
        }
    }
    if (!err.empty()) {
        if (s->log_errors && s->ctx) {
            ngx_log_error(NGX_LOG_ERR, s->ctx->r->connection->log, 0,
                          "lua tcp socket SSL handshake failed: %s",
                          err.c_str());
        }
        closeSock(s, s->shaker);
        lua_pushnil(dst);
        lua_pushlstring(dst, err.data(), err.size());
        return 2;
    }
    c->read->handler = entry::edge<onRead>;
    c->write->handler = entry::edge<onWrite>;
    if (!s->ssl_ret_session) {
        lua_pushboolean(dst, 1);
        return 1;
    }
    ngx_ssl_session_t *sess = ngx_ssl_get_session(c);
    if (sess == nullptr) {
        lua_pushboolean(dst, 1);  // nothing to reuse (yet)
        return 1;
    }
    auto **sp = static_cast<ngx_ssl_session_t **>(
        lua_newuserdata(dst, sizeof(ngx_ssl_session_t *)));
    *sp = sess;
    luaL_getmetatable(dst, kSessionMeta);
    lua_setmetatable(dst, -2);
    return 1;
}

void onHandshake(ngx_connection_t *c)
{
    auto *s = static_cast<Tcp *>(c->data);
    LuaThread *t = s->shaker;
    if (t == nullptr) {
        return;
    }
    const char *fail = nullptr;
    if (c->read->timedout || c->write->timedout) {
        c->read->timedout = c->write->timedout = 0;
        fail = "timeout";
    }
    if (c->read->timer_set) {
        ngx_del_timer(c->read);
    }
    // handshakeDone closes the socket under s->shaker on failure.
    int n = 0;
    std::string err;
    bool ok = entry::protect(t->co, [&] { n = handshakeDone(s, t->co, fail); },
                             &err);
    s->shaker = nullptr;
    t->cancel = nullptr;
    if (!ok) {
        entry::fail(t, err);
        return;
    }
    entry::resumeWith(t, n);
}

void cancelHandshake(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->shaker != t) {
        return;
    }
    s->shaker = nullptr;
    if (s->c) {
        // Half a handshake cannot be picked up again.
        sock::closeConnection(s->c);
        s->c = nullptr;
        releaseCount(s);
        sock::dropSlot(&s->slot);
    }
}

// ---- client certificates (setclientcert) ----

// OpenResty takes cdata from ngx.ssl.parse_pem_cert/parse_pem_priv_key;
// luaguard has no ngx.ssl yet, so the PEM texts themselves are accepted
// and parsed here. `ssl` null: only check that they parse.
bool useClientCert(SSL *ssl, const std::string &cert, const std::string &key,
                   std::string *err)
{
    BIO *bio = BIO_new_mem_buf(cert.data(), static_cast<int>(cert.size()));
    if (bio == nullptr) {
        *err = "no memory";
        return false;
    }
    bool ok = true;
    X509 *x = PEM_read_bio_X509_AUX(bio, nullptr, nullptr, nullptr);
    if (x == nullptr) {
        *err = "PEM_read_bio_X509_AUX() failed";
        ok = false;
    } else if (ssl && SSL_use_certificate(ssl, x) == 0) {
        *err = "SSL_use_certificate() failed";
        ok = false;
    }
    X509_free(x);
    // The rest of the text is the chain.
    while (ok) {
        X509 *ca = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
        if (ca == nullptr) {
            ERR_clear_error();   // the end of the text
            break;
        }
        if (ssl && SSL_add1_chain_cert(ssl, ca) == 0) {
            *err = "SSL_add1_chain_cert() failed";
            ok = false;
        }
        X509_free(ca);
    }
    BIO_free(bio);
    if (!ok) {
        ERR_clear_error();
        return false;
    }
    bio = BIO_new_mem_buf(key.data(), static_cast<int>(key.size()));
    if (bio == nullptr) {
        *err = "no memory";
        return false;
    }
    EVP_PKEY *pk = PEM_read_bio_PrivateKey(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
    if (pk == nullptr) {
        *err = "PEM_read_bio_PrivateKey() failed";
        ok = false;
    } else if (ssl && SSL_use_PrivateKey(ssl, pk) == 0) {
        *err = "SSL_use_PrivateKey() failed";
        ok = false;
    } else if (ssl && SSL_check_private_key(ssl) == 0) {
        *err = "SSL_check_private_key() failed";
        ok = false;
    }
    EVP_PKEY_free(pk);
    if (!ok) {
        ERR_clear_error();
    }
    return ok;
}

int tcpSetClientCert(lua_State *L)
{
    Tcp *s = use(L);
    if (lua_gettop(L) != 3) {
        return luaL_error(L, "ngx.socket setclientcert: expecting 3 "
                          "arguments (including the object), but seen %d",
                          lua_gettop(L));
    }
    if (lua_isnil(L, 2) && lua_isnil(L, 3)) {
        s->client_cert.clear();
        s->client_key.clear();
        lua_pushboolean(L, 1);
        return 1;
    }
    if (lua_isnil(L, 2) || lua_isnil(L, 3)) {
        return luaL_error(L, "client certificate must be supplied with "
                          "corresponding private key");
    }
    // PEM strings, or the objects of ngx.ssl.parse_pem_cert/_priv_key.
    std::string c, k, err;
    if (!sslPemArg(L, 2, false, &c)) {
        return luaL_error(L, "bad cert arg: PEM string or ngx.ssl "
                          "certificate expected, got %s", luaL_typename(L, 2));
    }
    if (!sslPemArg(L, 3, true, &k)) {
        return luaL_error(L, "bad pkey arg: PEM string or ngx.ssl private "
                          "key expected, got %s", luaL_typename(L, 3));
    }
    if (!useClientCert(nullptr, c, k, &err)) {
        return pushNilErr(L, err.c_str());
    }
    s->client_cert.swap(c);
    s->client_key.swap(k);
    lua_pushboolean(L, 1);
    return 1;
}

int tcpSslHandshake(lua_State *L)
{
    Tcp *s = use(L);
    int n = lua_gettop(L);
    if (n < 1 || n > 5) {
        return luaL_error(L, "ngx.socket sslhandshake: expecting 1 ~ 5 "
                          "arguments (including the object), but seen %d",
                          n);
    }
    ngx_connection_t *c = s->c;
    if (c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (s->shaker || s->reader || s->writer) {
        return pushNilErr(L, "socket busy");
    }
    ngx_ssl_session_t *reuse = nullptr;
    s->ssl_ret_session = true;
    if (n >= 2) {
        if (lua_isboolean(L, 2) && !lua_toboolean(L, 2)) {
            s->ssl_ret_session = false;
        } else if (!lua_isnil(L, 2)) {
            auto **sp = static_cast<ngx_ssl_session_t **>(
                luaL_checkudata(L, 2, kSessionMeta));
            reuse = *sp;
        }
    }
    s->sni.clear();
    if (n >= 3 && !lua_isnil(L, 3)) {
        size_t len;
        const char *name = luaL_checklstring(L, 3, &len);
        s->sni.assign(name, len);
    }
    s->ssl_verify = n >= 4 && lua_toboolean(L, 4);

    if (c->ssl && c->ssl->handshaked) {
        return handshakeDone(s, L, nullptr);
    }
    std::string err;
    ngx_ssl_t *ssl = sslContext(s->ctx->llcf, &err);
    if (ssl == nullptr) {
        return pushNilErr(L, err.c_str());
    }
    if (c->pool == nullptr) {
        // TLS state is allocated from the connection's pool: one of its
        // own, since the connection may outlive the request (keepalive).
        c->pool = ngx_create_pool(256, ngx_cycle->log);
        if (c->pool == nullptr) {
            return pushNilErr(L, "no memory");
        }
    }
    if (ngx_ssl_create_connection(ssl, c, NGX_SSL_CLIENT) != NGX_OK) {
        return pushNilErr(L, "failed to create ssl connection");
    }
    if (reuse && ngx_ssl_set_session(c, reuse) != NGX_OK) {
        return pushNilErr(L, "failed to set ssl session");
    }
    if (!s->client_cert.empty()
        && !useClientCert(c->ssl->connection, s->client_cert,
                          s->client_key, &err))
    {
        return pushNilErr(L, err.c_str());
    }
    if (!s->sni.empty()) {
        SSL_set_tlsext_host_name(c->ssl->connection, s->sni.c_str());
    }
    ngx_int_t rc = ngx_ssl_handshake(c);
    if (rc != NGX_AGAIN) {
        return handshakeDone(s, L, nullptr);
    }
    LuaThread *t = threads::current();
    s->shaker = t;
    t->cancel = cancelHandshake;
    t->cancel_data = s;
    c->ssl->handler = entry::edge<onHandshake>;
    ngx_add_timer(c->read, connectTimeout(s));
    return glue::yield(L);
}

int tcpGc(lua_State *L)
{
    auto *s = static_cast<Tcp *>(lua_touserdata(L, 1));
    if (s == nullptr || s->magic != kMagic) {
        return 0;
    }
    if (s->downstream && s->cln) {
        closeSock(s, nullptr);   // gives the request its handlers back
    }
    // While cln is set its request (and pool) is alive: detach from it.
    if (s->cln) {
        s->cln->handler = nullptr;
        s->cln = nullptr;
        sock::resolveCancel(&s->resolve);
        if (s->in_wait_q) {
            ngx_queue_remove(&s->wait_q);
            s->pool->nwaiting--;
        }
        if (s->wait_ev.timer_set) {
            ngx_del_timer(&s->wait_ev);
        }
        if (s->wait_ev.posted) {
            ngx_delete_posted_event(&s->wait_ev);
        }
    }
    s->reader = s->writer = s->connector = s->shaker = nullptr;
    if (s->downstream) {
        s->c = nullptr;
    }
    if (s->c) {
        sock::closeConnection(s->c);
        s->c = nullptr;
    }
    releaseCount(s);
    sock::dropSlot(&s->slot);
    putRbuf(s);
    s->magic = 0;
    s->~Tcp();
    return 0;
}

int tcpNew(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    sandbox::require(L, sandbox::Capability::Socket);
    if (lua_gettop(L) != 0) {
        return luaL_error(L, "expecting zero arguments, but got %d",
                          lua_gettop(L));
    }
    lua_createtable(L, 3, 1);
    void *mem = lua_newuserdata(L, sizeof(Tcp));
    auto *s = new (mem) Tcp();
    ngx_memzero(&s->pc, sizeof(s->pc));
    ngx_memzero(&s->wait_ev, sizeof(s->wait_ev));
    ngx_queue_init(&s->wait_q);
    s->resolve.rctx = nullptr;
    luaL_getmetatable(L, kTcpUdMeta);
    lua_setmetatable(L, -2);
    lua_rawseti(L, -2, 1);
    luaL_getmetatable(L, kTcpMeta);
    lua_setmetatable(L, -2);
    return 1;
}

}  // namespace

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
        if (ctx->buffered_out || r->out || r->connection->buffered) {
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

    lua_createtable(L, 3, 1);
    void *mem = lua_newuserdata(L, sizeof(Tcp));
    auto *s = new (mem) Tcp();
    ngx_memzero(&s->pc, sizeof(s->pc));
    ngx_memzero(&s->wait_ev, sizeof(s->wait_ev));
    ngx_queue_init(&s->wait_q);
    s->resolve.rctx = nullptr;
    luaL_getmetatable(L, kTcpUdMeta);
    lua_setmetatable(L, -2);
    lua_rawseti(L, -2, 1);
    luaL_getmetatable(L, raw ? kRawMeta : kReqMeta);
    lua_setmetatable(L, -2);

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

char *mergeSocketSsl(ngx_conf_t *cf, LocConf *prev, LocConf *conf)
{
    auto same = [](const ngx_str_t &a, const ngx_str_t &b) {
        return a.len == b.len
               && (a.len == 0 || std::memcmp(a.data, b.data, a.len) == 0);
    };
    if (prev->ssl && same(prev->ssl_trusted_certificate,
                          conf->ssl_trusted_certificate)
        && same(prev->ssl_ciphers, conf->ssl_ciphers)
        && prev->ssl_protocols == conf->ssl_protocols
        && prev->ssl_verify_depth == conf->ssl_verify_depth
        && same(prev->ssl_crl, conf->ssl_crl)
        && prev->ssl_conf_commands == conf->ssl_conf_commands)
    {
        conf->ssl = prev->ssl;
        return NGX_CONF_OK;
    }
    if (conf->ssl_trusted_certificate.len == 0 && conf->ssl_crl.len == 0
        && conf->ssl_conf_commands == nullptr)
    {
        return NGX_CONF_OK;  // nothing to read or check: made on first use
    }
    std::string err;
    conf->ssl = makeSslContext(conf, cf->pool, cf->log, &cf->cycle->conf_prefix,
                               &err);
    if (conf->ssl == nullptr) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "%s", err.c_str());
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    return NGX_CONF_OK;
}

void openSocketTcp(lua_State *L)
{
    // The object table's metatable: methods.
    luaL_newmetatable(L, kTcpMeta);
    lua_createtable(L, 0, 20);
    const luaL_Reg methods[] = {{"connect", tcpConnect},
                                {"send", tcpSend},
                                {"receive", tcpReceive},
                                {"receiveany", tcpReceiveAny},
                                {"receiveuntil", tcpReceiveUntil},
                                {"close", tcpClose},
                                {"setkeepalive", tcpSetKeepalive},
                                {"getreusedtimes", tcpGetReusedTimes},
                                {"settimeout", tcpSetTimeout},
                                {"settimeouts", tcpSetTimeouts},
                                {"setoption", tcpSetOption},
                                {"bind", tcpBind},
                                {"sslhandshake", tcpSslHandshake},
                                {"setclientcert", tcpSetClientCert},
                                {nullptr, nullptr}};
    setFuncs(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    // ngx.req.socket objects: the documented subsets of the methods.
    luaL_newmetatable(L, kReqMeta);
    lua_createtable(L, 0, 5);
    const luaL_Reg req_methods[] = {{"receive", tcpReceive},
                                    {"receiveany", tcpReceiveAny},
                                    {"receiveuntil", tcpReceiveUntil},
                                    {"settimeout", tcpSetTimeout},
                                    {"settimeouts", tcpSetTimeouts},
                                    {nullptr, nullptr}};
    setFuncs(L, req_methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, kRawMeta);
    lua_createtable(L, 0, 6);
    setFuncs(L, req_methods);
    lua_pushcfunction(L, tcpSend);
    lua_setfield(L, -2, "send");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    luaL_newmetatable(L, kTcpUdMeta);
    lua_pushcfunction(L, tcpGc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    luaL_newmetatable(L, kUntilMeta);
    lua_pop(L, 1);

    luaL_newmetatable(L, kSessionMeta);
    lua_pushcfunction(L, sessionGc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    subTable(L, "socket");
    lua_pushcfunction(L, tcpNew);
    lua_setfield(L, -2, "tcp");
    lua_pushcfunction(L, tcpNew);
    lua_setfield(L, -2, "stream");
    // ngx.socket.connect is documented as tcp() + connect(); in Lua so
    // the connect may yield.
    static const char kConnect[] =
        "local tcp = ... "
        "return function(...) "
        "local sock = tcp() "
        "local ok, err = sock:connect(...) "
        "if not ok then return nil, err end "
        "return sock end";
    luaL_loadbuffer(L, kConnect, sizeof(kConnect) - 1, "=ngx.socket.connect");
    lua_pushcfunction(L, tcpNew);
    lua_call(L, 1, 1);
    lua_setfield(L, -2, "connect");
    lua_pop(L, 1);
}

ngx_uint_t socketPoolIdle()
{
    ngx_uint_t n = 0;
    for (const auto &kv : g_pools) {
        n += kv.second->nidle;
    }
    return n;
}

}  // namespace luaguard::api
