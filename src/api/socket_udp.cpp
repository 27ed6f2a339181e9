// ngx.socket.udp: datagram sockets (UDP and datagram unix sockets).
//
// Same ownership rules as the TCP socket (api/socket_tcp.cpp): the
// userdata owns its state, a cleanup in the connecting request's pool
// closes the socket and forgets the request.

#include <cstring>
#include <new>
#include <string>

#include "api/api.hpp"
#include "api/socket.hpp"
#include "ngx/entry.hpp"
#include "ngx/glue.hpp"
#include "security/sandbox.hpp"
#include "ngx/thread.hpp"
#include "security/egress.hpp"

namespace luaguard::api {

namespace {

using sock::Target;
using sock::Resolve;

const char kUdpMeta[] = "luaguard.udpsock";
const char kUdpUdMeta[] = "luaguard.udpsock.ud";
constexpr uint32_t kMagic = 0x7564706bu;
constexpr int kPending = -1;
constexpr size_t kMaxDatagram = 65536;

struct Udp {
    uint32_t             magic = kMagic;
    RequestCtx          *ctx = nullptr;
    ngx_pool_cleanup_t  *cln = nullptr;
    bool                 bound = false;   // as Tcp::bound (socket_tcp.cpp)
    ngx_connection_t    *c = nullptr;
    sock::Slot           slot;            // while it has a peer
    ngx_msec_t           read_timeout = 0;
    bool                 log_errors = true;
    LuaThread           *reader = nullptr;
    LuaThread           *connector = nullptr;
    size_t               rsize = 0;
    ngx_peer_connection_t pc;
    Target               target;
    Resolve              resolve;
    std::string          err;
};

char g_dgram[kMaxDatagram];

Udp *self(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_rawgeti(L, 1, 1);
    // The kind first (the userdata's metatable is ours): size and magic
    // alone would take any userdata of the right size and contents.
    auto *u = static_cast<Udp *>(luaL_testudata(L, -1, kUdpUdMeta));
    if (u == nullptr || lua_objlen(L, -1) != sizeof(Udp)
        || u->magic != kMagic)
    {
        luaL_error(L, "bad argument #1 (udp socket object expected)");
    }
    lua_pop(L, 1);
    return u;
}

Udp *use(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Udp *u = self(L);
    if (u->ctx && u->c && u->ctx != sock::currentCtx()) {
        luaL_error(L, "bad request");
    }
    return u;
}

void closeUdp(Udp *u)
{
    if (u->c) {
        ngx_close_connection(u->c);
        u->c = nullptr;
    }
    sock::dropSlot(&u->slot);
    if (LuaThread *t = u->reader) {
        u->reader = nullptr;
        t->cancel = nullptr;
        threads::post(t, WakeWith::NilClosed);
    }
}

void requestGone(void *data)
{
    auto *u = static_cast<Udp *>(data);
    u->cln = nullptr;
    sock::resolveCancel(&u->resolve);
    u->reader = u->connector = nullptr;
    closeUdp(u);
    u->ctx = nullptr;
}

bool bindRequest(Udp *u, RequestCtx *ctx)
{
    if (u->ctx == ctx && u->cln) {
        return true;
    }
    if (u->cln) {
        u->cln->handler = nullptr;
        u->cln = nullptr;
    }
    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(ctx->r->pool, 0);
    if (cln == nullptr) {
        return false;
    }
    cln->handler = entry::edge<requestGone>;
    cln->data = u;
    u->cln = cln;
    u->ctx = ctx;
    u->bound = true;
    u->log_errors = ctx->llcf->socket_log_errors;
    return true;
}

void onRead(ngx_event_t *ev);

void ignore(ngx_event_t *) {}

int connectTarget(Udp *u, lua_State *dst)
{
    if (!sock::egressCheck(u->ctx, "udp socket", &u->target)) {
        return pushNilErr(dst, kEgressDenied);
    }
    if (!sock::takeSlot(&u->slot, u->ctx, "udp")) {
        return pushNilErr(dst, sock::kTooManyConnections);
    }
    ngx_int_t rc = sock::connectPeer(&u->pc, &u->target, SOCK_DGRAM, nullptr,
                                     u->ctx->r->connection->log,
                                     u->log_errors, &u->err);
    if (rc == NGX_ERROR) {
        sock::dropSlot(&u->slot);
        return pushNilErr(dst, u->err.c_str());
    }
    // A datagram "connect" only names the peer: it is done at once.
    ngx_connection_t *c = u->pc.connection;
    u->c = c;
    c->data = u;
    c->pool = nullptr;
    c->read->handler = entry::edge<onRead>;
    c->write->handler = ignore;
    lua_pushinteger(dst, 1);
    return 1;
}

void resolved(Resolve *res)
{
    auto *u = static_cast<Udp *>(res->data);
    LuaThread *t = u->connector;
    if (t == nullptr) {
        return;
    }
    u->connector = nullptr;
    t->cancel = nullptr;
    entry::resume(t, [&](lua_State *co) {
        return res->err.empty() ? connectTarget(u, co)
                                : pushNilErr(co, res->err.c_str());
    });
}

void cancelConnect(LuaThread *t)
{
    auto *u = static_cast<Udp *>(t->cancel_data);
    if (u->connector == t) {
        u->connector = nullptr;
        sock::resolveCancel(&u->resolve);
    }
}

int udpSetPeerName(lua_State *L)
{
    Run *run = glue::checkPhase(L, sock::kPhases);
    Udp *u = self(L);
    if (u->bound && u->ctx != run->ctx) {
        return luaL_error(L, "bad request");
    }
    int n = lua_gettop(L);
    if (n != 2 && n != 3) {
        return luaL_error(L, "ngx.socket.udp setpeername: expecting 2 or 3 "
                          "arguments (including the object), but seen %d",
                          n);
    }
    size_t hlen;
    const char *host = luaL_checklstring(L, 2, &hlen);
    lua_Integer port = 0;
    bool unix_path = hlen >= 5 && std::memcmp(host, "unix:", 5) == 0;
    if (!unix_path) {
        if (n != 3) {
            return luaL_error(L, "bad argument #3 to 'setpeername' (number "
                              "expected, got no value)");
        }
        port = luaL_checkinteger(L, 3);
        if (port < 0 || port > 65535) {
            lua_pushnil(L);
            lua_pushfstring(L, "bad port number: %d",
                            static_cast<int>(port));
            return 2;
        }
    }
    if (u->connector) {
        return pushNilErr(L, "socket busy connecting");
    }
    closeUdp(u);
    if (!bindRequest(u, run->ctx)) {
        return pushNilErr(L, "no memory");
    }
    auto p = static_cast<in_port_t>(port);
    if (sock::literal(host, hlen, p, &u->target)) {
        return connectTarget(u, L);
    }
    u->resolve.data = u;
    u->resolve.done = resolved;
    if (sock::resolveStart(run->ctx->r, &u->resolve, host, hlen, p,
                           &u->target))
    {
        if (!u->resolve.err.empty()) {
            return pushNilErr(L, u->resolve.err.c_str());
        }
        return connectTarget(u, L);
    }
    LuaThread *t = threads::current();
    u->connector = t;
    t->cancel = cancelConnect;
    t->cancel_data = u;
    return glue::yield(L);
}

int udpSend(lua_State *L)
{
    Udp *u = use(L);
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "expecting 2 arguments (including the object), "
                          "but got %d", lua_gettop(L));
    }
    if (u->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    const char *p;
    size_t len;
    std::string flat;
    if (lua_type(L, 2) == LUA_TTABLE) {
        // A (nested) array of fragments, one datagram.
        sock::flatten(L, 2, &flat, 0);
        p = flat.data();
        len = flat.size();
    } else {
        p = luaL_checklstring(L, 2, &len);
    }
    ssize_t n = u->c->send(u->c, reinterpret_cast<u_char *>(
                                     const_cast<char *>(p)), len);
    if (n == NGX_ERROR || n == NGX_AGAIN) {
        ngx_err_t e = ngx_socket_errno;
        return pushNilErr(L, e ? sock::errnoText(e).c_str()
                               : "send failed");
    }
    if (static_cast<size_t>(n) != len) {
        return pushNilErr(L, "send failed: partial datagram");
    }
    lua_pushinteger(L, 1);
    return 1;
}

// Receives one datagram into `dst` when there is one: the result count,
// or kPending.
int tryRecv(Udp *u, lua_State *dst)
{
    ngx_connection_t *c = u->c;
    ssize_t n = c->recv(c, reinterpret_cast<u_char *>(g_dgram), u->rsize);
    if (n == NGX_AGAIN) {
        return kPending;
    }
    if (n < 0) {
        ngx_err_t e = ngx_socket_errno;
        return pushNilErr(dst, e ? sock::errnoText(e).c_str() : "error");
    }
    lua_pushlstring(dst, g_dgram, static_cast<size_t>(n));
    return 1;
}

// Hands the waiting reader what `push` pushes (the datagram or an error).
template <typename Push>
void finishRead(Udp *u, LuaThread *t, Push &&push)
{
    u->reader = nullptr;
    t->cancel = nullptr;
    entry::resume(t, push);
}

void onRead(ngx_event_t *ev)
{
    auto *c = static_cast<ngx_connection_t *>(ev->data);
    auto *u = static_cast<Udp *>(c->data);
    LuaThread *t = u->reader;
    if (t == nullptr) {
        return;
    }
    if (ev->timedout) {
        ev->timedout = 0;
        if (u->log_errors) {
            ngx_log_error(NGX_LOG_ERR, c->log, 0,
                          "lua udp socket read timed out");
        }
        finishRead(u, t, [](lua_State *co) {
            return pushNilErr(co, "timeout");
        });
        return;
    }
    // The datagram is pushed as it is taken: the receive runs protected.
    int n = 0;
    std::string err;
    if (!entry::protect(t->co, [&] { n = tryRecv(u, t->co); }, &err)) {
        if (ev->timer_set) {
            ngx_del_timer(ev);
        }
        u->reader = nullptr;
        t->cancel = nullptr;
        entry::fail(t, err);
        return;
    }
    if (n == kPending) {
        if (ngx_handle_read_event(ev, 0) == NGX_OK) {
            return;
        }
        if (ev->timer_set) {
            ngx_del_timer(ev);
        }
        finishRead(u, t, [](lua_State *co) {
            return pushNilErr(co, "failed to wait for the socket");
        });
        return;
    }
    if (ev->timer_set) {
        ngx_del_timer(ev);
    }
    finishRead(u, t, [n](lua_State *) { return n; });
}

void cancelRead(LuaThread *t)
{
    auto *u = static_cast<Udp *>(t->cancel_data);
    if (u->reader != t) {
        return;
    }
    u->reader = nullptr;
    if (u->c && u->c->read->timer_set) {
        ngx_del_timer(u->c->read);
    }
}

int udpReceive(lua_State *L)
{
    Udp *u = use(L);
    int nargs = lua_gettop(L);
    if (nargs != 1 && nargs != 2) {
        return luaL_error(L, "expecting 1 or 2 arguments (including the "
                          "object), but got %d", nargs);
    }
    if (u->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    if (u->reader) {
        return pushNilErr(L, "socket busy reading");
    }
    size_t size = 8192;  // documented maximum: bigger sizes are cut
    if (nargs == 2 && !lua_isnil(L, 2)) {  // nil: the default size
        lua_Integer v = luaL_checkinteger(L, 2);
        if (v <= 0) {
            return luaL_argerror(L, 2, "bad size argument");
        }
        if (static_cast<size_t>(v) < size) {
            size = static_cast<size_t>(v);
        }
    }
    u->rsize = size;
    int n = tryRecv(u, L);
    if (n != kPending) {
        return n;
    }
    ngx_connection_t *c = u->c;
    if (ngx_handle_read_event(c->read, 0) != NGX_OK) {
        return pushNilErr(L, "failed to wait for the socket");
    }
    LuaThread *t = threads::current();
    u->reader = t;
    t->cancel = cancelRead;
    t->cancel_data = u;
    ngx_add_timer(c->read, u->read_timeout ? u->read_timeout
                                           : u->ctx->llcf->socket_read_timeout);
    return glue::yield(L);
}

int udpClose(lua_State *L)
{
    Udp *u = use(L);
    if (u->c == nullptr) {
        return pushNilErr(L, "closed");
    }
    closeUdp(u);
    lua_pushinteger(L, 1);
    return 1;
}

int udpSetTimeout(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    Udp *u = self(L);
    if (lua_gettop(L) != 2) {
        return luaL_error(L, "ngx.socket settimout: expecting 2 arguments "
                          "(including the object) but seen %d",
                          lua_gettop(L));
    }
    // nil: back to the directive's timeout (0), as the reference does.
    lua_Number v = lua_isnil(L, 2) ? 0 : luaL_checknumber(L, 2);
    if (v < 0) {
        return luaL_error(L, "bad timeout value");
    }
    u->read_timeout = static_cast<ngx_msec_t>(v);
    return 0;
}

int udpGc(lua_State *L)
{
    auto *u = static_cast<Udp *>(lua_touserdata(L, 1));
    if (u == nullptr || u->magic != kMagic) {
        return 0;
    }
    if (u->cln) {
        u->cln->handler = nullptr;
        u->cln = nullptr;
        sock::resolveCancel(&u->resolve);
    }
    u->reader = u->connector = nullptr;
    if (u->c) {
        ngx_close_connection(u->c);
        u->c = nullptr;
    }
    sock::dropSlot(&u->slot);  // its request lives, or it was given back
    u->magic = 0;
    u->~Udp();
    return 0;
}

int udpNew(lua_State *L)
{
    glue::checkPhase(L, sock::kPhases);
    sandbox::require(L, sandbox::Capability::Socket);
    if (lua_gettop(L) != 0) {
        return luaL_error(L, "expecting zero arguments, but got %d",
                          lua_gettop(L));
    }
    lua_createtable(L, 3, 1);
    void *mem = lua_newuserdata(L, sizeof(Udp));
    auto *u = new (mem) Udp();
    ngx_memzero(&u->pc, sizeof(u->pc));
    u->resolve.rctx = nullptr;
    luaL_getmetatable(L, kUdpUdMeta);
    lua_setmetatable(L, -2);
    lua_rawseti(L, -2, 1);
    luaL_getmetatable(L, kUdpMeta);
    lua_setmetatable(L, -2);
    return 1;
}

}  // namespace

void openSocketUdp(lua_State *L)
{
    luaL_newmetatable(L, kUdpMeta);
    lua_createtable(L, 0, 6);
    const luaL_Reg methods[] = {{"setpeername", udpSetPeerName},
                                {"send", udpSend},
                                {"receive", udpReceive},
                                {"close", udpClose},
                                {"settimeout", udpSetTimeout},
                                {nullptr, nullptr}};
    setFuncs(L, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    luaL_newmetatable(L, kUdpUdMeta);
    lua_pushcfunction(L, udpGc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    subTable(L, "socket");
    lua_pushcfunction(L, udpNew);
    lua_setfield(L, -2, "udp");
    lua_pop(L, 1);
}

}  // namespace luaguard::api
