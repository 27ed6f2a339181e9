// The cosocket object's internals (struct Tcp), shared by the socket core
// (api/socket_tcp.cpp) and its TLS layer (api/ssl_client.cpp). Nothing
// outside the cosocket implementation includes this.
#pragma once

#include <openssl/ssl.h>

#include <string>

#include "api/socket.hpp"
#include "ngx/glue.hpp"
#include "ngx/thread.hpp"

namespace luaguard::api::tcp {

using sock::Target;
using sock::Resolve;

inline constexpr char kTcpMeta[] = "luaguard.tcpsock";      // the object table's
inline constexpr char kTcpUdMeta[] = "luaguard.tcpsock.ud";  // the userdata's
inline constexpr char kReqMeta[] = "luaguard.reqsock";      // ngx.req.socket()
inline constexpr char kRawMeta[] = "luaguard.reqsock.raw";   // ngx.req.socket(true)
inline constexpr char kUntilMeta[] = "luaguard.tcpsock.until";
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
struct Tcp;

// What a connect and the connection it makes need beyond the Tcp, out of
// the Lua heap: the object is made anew by most requests that use a
// socket, and the GC's work follows the bytes the VM allocates. A Link
// is taken from the worker's free list when a connect starts (after its
// lua_socket_max_per_request slot) and given back with that slot: when
// the connect fails, the connection closes or goes to the pool, the
// thread is killed, the request ends or the object is collected. So the
// Links in use never outnumber the connections requests hold.
struct Link {
    Tcp                  *owner = nullptr;
    ngx_peer_connection_t pc;
    Target                target;        // the peer: resolved, judged
    Resolve               resolve;
    std::string           host;          // as connect() was given it
    std::string           key;           // pool key, while no pool
    ngx_queue_t           wait_q;        // in pool->waiters (backlog)
    bool                  in_wait_q = false;
    ngx_event_t           wait_ev;       // backlog timeout / wake-up
};

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
    Link                *link = nullptr;  // while connecting, connected
    Pool                *home = nullptr;  // the key's pool, once it exists
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

    // Connect (the rest is in link).
    in_port_t            port = 0;
    union {                               // bind(): an IP address
        struct sockaddr     sa;
        struct sockaddr_in  sin;
        struct sockaddr_in6 sin6;
    }                    local_addr;
    socklen_t            local_len = 0;   // 0: no bind()
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
inline Tcp *reqSocket(const RequestCtx *ctx)
{
    return ctx ? static_cast<Tcp *>(ctx->req_socket) : nullptr;
}

inline void setReqSocket(RequestCtx *ctx, Tcp *s)
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

// ---- the socket core (api/socket_tcp.cpp) ----

// A new object: the table {[1] = userdata} with the methods of `meta`.
Tcp *pushTcp(lua_State *L, const char *meta);
// Registers the methods `fns` into the table at the top of the stack,
// each holding the metatable at `ud_mt` (kTcpUdMeta) as upvalue 1.
void setMethods(lua_State *L, const luaL_Reg *fns, int ud_mt);
// The methods' upvalue: the userdata's metatable (kTcpUdMeta), which
// use() compares with the object's by identity.
inline constexpr int kUdMetaUpvalue = lua_upvalueindex(1);
// The Tcp of the object at index 1, raising when it is not usable; `mt`
// is the stack index of the kTcpUdMeta metatable.
Tcp *use(lua_State *L, int mt = kUdMetaUpvalue);
ngx_msec_t connectTimeout(Tcp *s);
// Gives back the pool count the connection held (backlog waiters wake).
void releaseCount(Tcp *s);
// Closes the connection; `self` is the thread closing it (not woken).
void closeSock(Tcp *s, LuaThread *self);
// The connection's event handlers (through entry::edge) once connected.
void onRead(ngx_event_t *ev);
void onWrite(ngx_event_t *ev);

// What the read and write paths and ngx.req.socket share.
void readEvent(Tcp *s, ngx_event_t *ev);
void writeEvent(Tcp *s, ngx_event_t *ev);
bool bindRequest(Tcp *s, RequestCtx *ctx);
void getRbuf(Tcp *s);
// The body bytes the script read are the request's body no more.
void bodyTaken(Tcp *s);
int tcpReceive(lua_State *L);
int tcpReceiveAny(lua_State *L);
int tcpReceiveUntil(lua_State *L);
int tcpSetTimeout(lua_State *L);
int tcpSetTimeouts(lua_State *L);
int tcpSend(lua_State *L);

// ---- ngx.req.socket (api/socket_downstream.cpp) ----

// Gives the request its event handlers back and forgets the socket.
void detachDownstream(Tcp *s);
// The request's event handlers while a read or write of it waits.
void reqReadHandler(ngx_http_request_t *r);
void reqWriteHandler(ngx_http_request_t *r);
// The metatables of ngx.req.socket's objects; `ud_mt`: kTcpUdMeta's
// stack index.
void openReqSocket(lua_State *L, int ud_mt);

// ---- TLS (api/ssl_client.cpp) ----

// sslhandshake's session objects.
inline constexpr char kSessionMeta[] = "luaguard.ssl_session";
int sessionGc(lua_State *L);
int tcpSslHandshake(lua_State *L);
int tcpSetClientCert(lua_State *L);
// The client TLS context of a location's lua_ssl_* directives.
ngx_ssl_t *makeSslContext(LocConf *lc, ngx_pool_t *pool, ngx_log_t *log,
                          ngx_str_t *prefix, std::string *err);

}  // namespace luaguard::api::tcp
