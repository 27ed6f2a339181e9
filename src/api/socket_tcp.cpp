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

#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include "api/api.hpp"
#include "api/socket.hpp"
#include "api/socket_tcp.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "ngx/metrics.hpp"
#include "ngx/thread.hpp"
#include "security/egress.hpp"
#include "security/ngx_sandbox.hpp"

namespace luaguard::api {

// Not anonymous: api/ssl_client.cpp (TLS) shares the socket's internals
// through api/socket_tcp.hpp.
namespace tcp {

// Copies a Target, its name pointing into its own text.
void copyTarget(Target *to, const Target &from)
{
    *to = from;
    to->name.data = to->text;
}

std::unordered_map<std::string, Pool *> g_pools;
std::string g_key;                    // tcpConnect's, for the lookup
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

// ---- links ----

constexpr size_t kFreeLinks = 64;
Link *g_free_links[kFreeLinks];       // kept for the next connects
size_t g_nfree_links = 0;

bool takeLink(Tcp *s)
{
    if (s->link) {
        return true;
    }
    Link *l = g_nfree_links ? g_free_links[--g_nfree_links]
                            : new (std::nothrow) Link();
    if (l == nullptr) {
        return false;
    }
    ngx_memzero(&l->pc, sizeof(l->pc));
    ngx_memzero(&l->wait_ev, sizeof(l->wait_ev));
    ngx_queue_init(&l->wait_q);
    l->in_wait_q = false;
    l->resolve.rctx = nullptr;
    l->owner = s;
    s->link = l;
    return true;
}

// Gives the link back, first undoing what it takes part in: a name
// lookup, a place in the backlog queue, its timer or posted event.
void dropLink(Tcp *s)
{
    Link *l = s->link;
    if (l == nullptr) {
        return;
    }
    s->link = nullptr;
    sock::resolveCancel(&l->resolve);
    if (l->in_wait_q) {
        ngx_queue_remove(&l->wait_q);
        s->pool->nwaiting--;
        l->in_wait_q = false;
    }
    if (l->wait_ev.timer_set) {
        ngx_del_timer(&l->wait_ev);
    }
    if (l->wait_ev.posted) {
        ngx_delete_posted_event(&l->wait_ev);
    }
    l->owner = nullptr;
    if (g_nfree_links == kFreeLinks || l->host.capacity() > 256
        || l->key.capacity() > 256)
    {
        delete l;   // a long name's memory is not kept
        return;
    }
    l->host.clear();
    l->key.clear();
    l->resolve.err.clear();
    g_free_links[g_nfree_links++] = l;
}

// ---- pools ----

Pool *findPool(const std::string &key)
{
    auto it = g_pools.find(key);
    return it == g_pools.end() ? nullptr : it->second;
}

// The pool of the socket's key: found by tcpConnect, or looked up again
// by the key it kept (another socket may have created it since).
Pool *homePool(Tcp *s)
{
    if (s->home == nullptr) {
        s->home = findPool(s->link->key);
    }
    return s->home;
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
    dropLink(s);   // out of the backlog queue before a waiter is woken
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
    dropLink(s);
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

Tcp *self(lua_State *L, int mt = kUdMetaUpvalue)
{
    if (lua_type(L, 1) != LUA_TTABLE) {
        luaL_checktype(L, 1, LUA_TTABLE);  // raises its error
    }
    lua_rawgeti(L, 1, 1);
    // The kind first (the userdata's metatable is ours): size and magic
    // alone would take any userdata of the right size and contents. The
    // metatable is the method's upvalue: compared by identity, as
    // luaL_testudata does, without looking its name up in the registry.
    // (A light userdata has no length: refused by the size.)
    auto *s = static_cast<Tcp *>(lua_touserdata(L, -1));
    if (s && lua_getmetatable(L, -1)) {
        if (!lua_rawequal(L, -1, mt) || lua_objlen(L, -2) != sizeof(Tcp)) {
            s = nullptr;
        }
        lua_settop(L, -3);
    } else {
        s = nullptr;
        lua_settop(L, -2);
    }
    if (s == nullptr || s->magic != kMagic) {
        luaL_error(L, "bad argument #1 (tcp socket object expected)");
    }
    return s;
}

// The socket as the running code may use it; raises on a socket of
// another live request (lua-nginx-module's "bad request").
Tcp *use(lua_State *L, int mt)
{
    glue::checkPhase(L, sock::kPhases);
    Tcp *s = self(L, mt);
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
    // Pushed first: err may be the link's.
    lua_pushnil(dst);
    lua_pushlstring(dst, err.data(), err.size());
    dropLink(s);
    if (s->c) {
        sock::closeConnection(s->c);
        s->c = nullptr;
    }
    releaseCount(s);
    sock::dropSlot(&s->slot);
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
                          "connecting to %V", &s->link->target.name);
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
    Link *l = s->link;
    if (!sock::egressCheck(s->ctx, "tcp socket", &l->target)) {
        return failConnect(s, dst, kEgressDenied);
    }
    ngx_addr_t local;
    if (s->local_len) {
        local.sockaddr = &s->local_addr.sa;
        local.socklen = s->local_len;
        local.name.data = nullptr;
        local.name.len = 0;
    }
    ngx_int_t rc = sock::connectPeer(&l->pc, &l->target, SOCK_STREAM,
                                     s->local_len ? &local : nullptr,
                                     s->ctx->r->connection->log,
                                     s->log_errors, &s->err);
    if (rc == NGX_ERROR) {
        return failConnect(s, dst, s->err);
    }
    metrics::countConnect(s->ctx);
    ngx_connection_t *c = l->pc.connection;
    c->data = s;
    c->pool = nullptr;
    if (s->tcp_nodelay && l->target.addr.ss_family != AF_UNIX) {
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
    Link *l = s->link;
    if (sock::literal(l->host.data(), l->host.size(), s->port, &l->target)) {
        return connectTarget(s, dst);
    }
    l->resolve.data = s;
    l->resolve.done = resolved;
    if (sock::resolveStart(s->ctx->r, &l->resolve, l->host.data(),
                           l->host.size(), s->port, &l->target))
    {
        if (!l->resolve.err.empty()) {
            // Not logged ("no resolver defined to resolve ..."), as in
            // lua-nginx-module: the script gets the error.
            return failConnect(s, dst, l->resolve.err);
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
    copyTarget(&s->link->target, it->peer);
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
    Pool *p = homePool(s);
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
            p = createPool(s->link->key, s->opt_pool_size
                                       ? s->opt_pool_size
                                       : s->ctx->llcf->socket_pool_size,
                           true, s->opt_backlog);
            if (p == nullptr) {
                return failConnect(s, dst, "no memory");
            }
            s->home = p;
        }
        if (p->backlog_on && p->active + p->nidle >= p->size) {
            if (p->nwaiting >= s->opt_backlog) {
                return failConnect(s, dst,
                                   "too many waiting connect operations");
            }
            Link *l = s->link;
            ngx_queue_insert_tail(&p->waiters, &l->wait_q);
            p->nwaiting++;
            l->in_wait_q = true;
            s->pool = p;
            l->wait_ev.handler = entry::edge<backlogEvent>;
            l->wait_ev.data = s;
            l->wait_ev.log = s->ctx->r->connection->log;
            ngx_add_timer(&l->wait_ev, connectTimeout(s));
            return kPending;
        }
    } else if (p == nullptr && s->opt_pool_size) {
        p = createPool(s->link->key, s->opt_pool_size, false, 0);
        s->home = p;
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
        Link *l = s->link;
        if (l->in_wait_q) {
            ngx_queue_remove(&l->wait_q);
            s->pool->nwaiting--;
            l->in_wait_q = false;
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
    Link *l = ngx_queue_data(q, Link, wait_q);
    ngx_queue_remove(q);
    p->nwaiting--;
    l->in_wait_q = false;
    if (l->wait_ev.timer_set) {
        ngx_del_timer(&l->wait_ev);
    }
    ngx_post_event(&l->wait_ev, &ngx_posted_events);
}

void cancelConnect(LuaThread *t)
{
    auto *s = static_cast<Tcp *>(t->cancel_data);
    if (s->connector != t) {
        return;
    }
    s->connector = nullptr;
    dropLink(s);
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

    s->port = static_cast<in_port_t>(port);
    s->reused = 0;
    s->counted = false;
    s->pool = nullptr;
    s->opt_pool_size = 0;
    s->opt_backlog = 0;
    s->opt_has_backlog = false;
    bool named = false;
    std::string name;   // the pool option (popped: errors count the stack)
    if (opts) {
        lua_getfield(L, opts, "pool");
        if (lua_isstring(L, -1)) {
            size_t nlen;
            const char *k = lua_tolstring(L, -1, &nlen);
            name.assign(k, nlen);
            named = true;
        } else if (!lua_isnil(L, -1)) {
            return luaL_argerror(L, opts, lua_pushfstring(
                L, "bad \"pool\" option type: %s", luaL_typename(L, -1)));
        }
        lua_pop(L, 1);
        // Errors name the options argument, as lua-nginx-module's do; a
        // backlog that is not a number counts as 0, as there.
        lua_getfield(L, opts, "pool_size");
        if (!lua_isnil(L, -1)) {
            if (!lua_isnumber(L, -1)) {
                return luaL_argerror(L, opts, lua_pushfstring(
                    L, "bad \"pool_size\" option type: %s",
                    luaL_typename(L, -1)));
            }
            lua_Integer v = lua_tointeger(L, -1);
            if (v <= 0) {
                return luaL_argerror(L, opts, lua_pushfstring(
                    L, "bad \"pool_size\" option value: %d",
                    static_cast<int>(v)));
            }
            s->opt_pool_size = static_cast<ngx_uint_t>(v);
        }
        lua_pop(L, 1);
        lua_getfield(L, opts, "backlog");
        if (!lua_isnil(L, -1)) {
            lua_Integer v = lua_tointeger(L, -1);
            if (v < 0) {
                return luaL_argerror(L, opts, lua_pushfstring(
                    L, "bad \"backlog\" option value: %d",
                    static_cast<int>(v)));
            }
            s->opt_backlog = static_cast<ngx_uint_t>(v);
            s->opt_has_backlog = true;
        }
        lua_pop(L, 1);
    }
    // Pools of different policies or VMs never mix, whatever name the
    // script gives: the key starts with their identities (inherited
    // policies are shared objects, so locations with the same settings
    // share pools; a lua_vm tenant never gets a connection another
    // tenant authenticated), as bytes of a fixed length, then the name
    // (or host:port). No Lua runs from here to the lookup (g_key is
    // the worker's).
    const void *ids[3] = {ctx->llcf->egress, sandbox::policyOf(ctx->llcf),
                          ctx->vm};
    std::string &key = g_key;
    key.assign(reinterpret_cast<const char *>(ids), sizeof(ids));
    if (named) {
        key += name;
    } else {
        key.append(host, hlen);
        if (!unix_path) {
            char digits[8];
            char *d = digits + sizeof(digits);
            auto v = static_cast<unsigned>(port);
            do {
                *--d = static_cast<char>('0' + v % 10);
                v /= 10;
            } while (v);
            key += ':';
            key.append(d, static_cast<size_t>(digits + sizeof(digits) - d));
        }
    }
    s->home = findPool(key);

    if (!sock::takeSlot(&s->slot, ctx, "tcp")) {
        return pushNilErr(L, sock::kTooManyConnections);
    }
    if (!takeLink(s)) {
        sock::dropSlot(&s->slot);
        return pushNilErr(L, "no memory");
    }
    s->link->host.assign(host, hlen);
    if (s->home == nullptr) {
        // Kept until the pool exists (connectFromPool, setkeepalive).
        s->link->key = key;
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
        int t = lua_type(L, 2);
        const char *p = t == LUA_TSTRING ? lua_tostring(L, 2) : nullptr;
        // The patterns first: they are no numbers, and scanning "*l" as
        // one costs more than reading the line.
        if (p && p[0] == '*' && p[1] == 'l' && p[2] == '\0') {
            m = RMode::Line;
        } else if (p && p[0] == '*' && p[1] == 'a' && p[2] == '\0') {
            m = RMode::All;
        } else if (t == LUA_TNUMBER || (p && lua_isnumber(L, 2))) {
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
        } else if (t != LUA_TNIL) {
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
    // upvalue 1: the socket table; 2: the Until state; 3: kTcpUdMeta.
    glue::checkPhase(L, sock::kPhases);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    Tcp *s = use(L, lua_upvalueindex(3));
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
    lua_pushvalue(L, kUdMetaUpvalue);
    lua_pushcclosure(L, untilIterator, 3);
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
    // No link: ngx.req.socket's object, whose connection is the
    // request's (called through a tcp object's method).
    if (c == nullptr || s->link == nullptr) {
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

    Pool *p = s->counted ? s->pool : homePool(s);
    if (p == nullptr) {
        p = createPool(s->link->key, size, false, 0);
        if (p == nullptr) {
            closeSock(s, nullptr);
            return pushNilErr(L, "no memory");
        }
        s->home = p;
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
    copyTarget(&it->peer, s->link->target);
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
    dropLink(s);
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

// setoption's and getoption's option names.
bool sockOption(const char *opt, int *level, int *name)
{
    static const struct {
        const char *opt;
        int         level;
        int         name;
    } kOptions[] = {{"keepalive", SOL_SOCKET, SO_KEEPALIVE},
                    {"reuseaddr", SOL_SOCKET, SO_REUSEADDR},
                    {"tcp-nodelay", IPPROTO_TCP, TCP_NODELAY},
                    {"sndbuf", SOL_SOCKET, SO_SNDBUF},
                    {"rcvbuf", SOL_SOCKET, SO_RCVBUF}};
    for (const auto &o : kOptions) {
        if (std::strcmp(opt, o.opt) == 0) {
            *level = o.level;
            *name = o.name;
            return true;
        }
    }
    return false;
}

int tcpGetOption(lua_State *L)
{
    Tcp *s = use(L);
    if (!s->bound) {
        return luaL_error(L, "socket is never created nor connected");
    }
    if (s->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (lua_isnoneornil(L, 2)) {
        return pushNilErr(L, "missing the \"option\" argument");
    }
    const char *opt = lua_type(L, 2) == LUA_TSTRING ? lua_tostring(L, 2)
                                                    : nullptr;
    int level, name;
    if (opt == nullptr || !sockOption(opt, &level, &name)) {
        lua_pushnil(L);
        lua_pushfstring(L, "unsupported option %s",
                        lua_isstring(L, 2) ? lua_tostring(L, 2)
                                           : luaL_typename(L, 2));
        return 2;
    }
    int v = 0;
    socklen_t len = sizeof(v);
    if (getsockopt(s->c->fd, level, name, &v, &len) == -1) {
        return pushNilErr(L, sock::errnoText(ngx_socket_errno).c_str());
    }
    lua_pushinteger(L, v);
    return 1;
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
    int level, name;
    if (!sockOption(opt, &level, &name)) {
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
    static_assert(sizeof(s->local_addr) >= sizeof(struct sockaddr_in6));
    std::memcpy(&s->local_addr, &t.addr, t.len);
    s->local_len = t.len;
    lua_pushboolean(L, 1);   // true, as lua-nginx-module's bind()
    return 1;
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
    }
    dropLink(s);   // (already done by requestGone when it ran)
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

void setMethods(lua_State *L, const luaL_Reg *fns, int ud_mt)
{
    for (; fns->name; fns++) {
        lua_pushvalue(L, ud_mt);
        lua_pushcclosure(L, fns->func, 1);
        lua_setfield(L, -2, fns->name);
    }
}

// The object with the metatables at stack indexes `ud_mt` (kTcpUdMeta)
// and `meta`.
Tcp *pushTcpWith(lua_State *L, int ud_mt, int meta)
{
    lua_createtable(L, 3, 1);
    void *mem = lua_newuserdata(L, sizeof(Tcp));
    new (mem) Tcp();
    auto *s = static_cast<Tcp *>(mem);
    lua_pushvalue(L, ud_mt);
    lua_setmetatable(L, -2);
    lua_rawseti(L, -2, 1);
    lua_pushvalue(L, meta);
    lua_setmetatable(L, -2);
    return s;
}

Tcp *pushTcp(lua_State *L, const char *meta)
{
    luaL_getmetatable(L, kTcpUdMeta);
    luaL_getmetatable(L, meta);
    int top = lua_gettop(L);
    Tcp *s = pushTcpWith(L, top - 1, top);
    lua_replace(L, top - 1);
    lua_settop(L, top - 1);
    return s;
}

int tcpNew(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    sandbox::require(L, sandbox::Capability::Socket);
    if (lua_gettop(L) != 0) {
        return luaL_error(L, "expecting zero arguments, but got %d",
                          lua_gettop(L));
    }
    pushTcpWith(L, lua_upvalueindex(1), lua_upvalueindex(2));
    return 1;
}

}  // namespace tcp

using namespace tcp;


void openSocketTcp(lua_State *L)
{
    int ngx = lua_gettop(L);
    // The userdata's metatable first: every method holds it (upvalue 1,
    // use()).
    luaL_newmetatable(L, kTcpUdMeta);
    lua_pushcfunction(L, tcpGc);
    lua_setfield(L, -2, "__gc");
    int ud_mt = lua_gettop(L);

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
                                {"getoption", tcpGetOption},
                                {"bind", tcpBind},
                                {"sslhandshake", tcpSslHandshake},
                                {"setclientcert", tcpSetClientCert},
                                {nullptr, nullptr}};
    setMethods(L, methods, ud_mt);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);

    openReqSocket(L, ud_mt);

    luaL_newmetatable(L, kUntilMeta);
    lua_pop(L, 1);

    luaL_newmetatable(L, kSessionMeta);
    lua_pushcfunction(L, sessionGc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    lua_pushvalue(L, ngx);
    subTable(L, "socket");
    lua_remove(L, -2);
    // tcpNew's upvalues: the userdata's and the object's metatables.
    auto pushNew = [&] {
        lua_pushvalue(L, ud_mt);
        luaL_getmetatable(L, kTcpMeta);
        lua_pushcclosure(L, tcpNew, 2);
    };
    pushNew();
    lua_setfield(L, -2, "tcp");
    pushNew();
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
    pushNew();
    lua_call(L, 1, 1);
    lua_setfield(L, -2, "connect");
    lua_pop(L, 1);
    lua_remove(L, ud_mt);
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
