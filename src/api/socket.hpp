// Pieces the cosocket areas share (api/socket_tcp.cpp, api/socket_udp.cpp):
// peer addresses, name resolution through nginx's resolver, the egress
// check, error texts.
#pragma once

#include <sys/socket.h>
#include <sys/un.h>

#include <string>

#include "ngx/module.hpp"

namespace luaguard::api::sock {

// The phases in which cosockets work (lua-nginx-module: rewrite, access,
// content, timers, ssl_certificate; server_rewrite runs like rewrite).
constexpr PhaseMask kPhases = mask(Phase::ServerRewrite, Phase::Rewrite,
                                   Phase::Access, Phase::Content,
                                   Phase::Timer, Phase::SslCert);

// A peer's address while it is being resolved and connected to.
struct Target {
    struct sockaddr_storage  addr;
    socklen_t                len;
    u_char                   text[NGX_SOCKADDR_STRLEN + 8];  // for logs
    ngx_str_t                name;        // points into text
};

// An asynchronous name lookup through the location's `resolver`. Lives
// in its owner (the socket), never in request memory.
struct Resolve {
    ngx_resolver_ctx_t  *rctx;
    Target              *target;
    in_port_t            port;
    bool                 sync;         // inside start(): no callback yet
    bool                 finished;
    std::string          err;          // set when it failed
    void               (*done)(Resolve *);   // async completion
    void                *data;
};

// Fills `t` for a literal IP address or a "unix:" path; false when `host`
// is a name that needs the resolver.
bool literal(const char *host, size_t len, in_port_t port, Target *t);

// Starts resolving `host` with the resolver of `r`'s location. Returns
// true when it is already over (res->err empty on success), false when the
// answer comes later through res->done.
bool resolveStart(ngx_http_request_t *r, Resolve *res, const char *host,
                  size_t len, in_port_t port, Target *t);

// Abandons a lookup in progress (thread killed, request over).
void resolveCancel(Resolve *res);

// The egress seam (security/egress.hpp) for `t` under ctx's location
// policy (null ctx: the built-in default): logs "lua <what>: connection
// to ... refused" and returns false when the destination is refused. A
// unix path in `t` is replaced by its resolved form, the one judged.
bool egressCheck(RequestCtx *ctx, const char *what, Target *t);

// lua-nginx-module's text for a socket error: strerror in lower case
// ("connection refused", "connection reset by peer").
std::string errnoText(ngx_err_t err);

// ngx_peer_connection_t set up for `t` and connected (NGX_OK, NGX_AGAIN,
// or an error with *err set). `local` may be null.
ngx_int_t connectPeer(ngx_peer_connection_t *pc, Target *t, int type,
                      ngx_addr_t *local, ngx_log_t *log, bool log_errors,
                      std::string *err);

// Appends the fragments of the (nested) array table at `idx` to *out:
// strings, numbers, booleans, nil; raises "bad data type" on others.
bool flatten(lua_State *L, int idx, std::string *out, int depth);

// lua_socket_max_per_request: a socket's claim on one of the cosockets a
// request (with its subrequests) or a timer may hold at once. Taken when
// a connect starts, given back when the connection is closed, fails or
// goes to the pool.
struct Slot {
    RequestCtx  *owner = nullptr;   // whose count it is in, while held
};

constexpr char kTooManyConnections[] = "too many connections";

// Takes a slot of ctx's request for `slot` (nothing to do when it holds
// one); false, logged, when the request holds its maximum already.
bool takeSlot(Slot *slot, RequestCtx *ctx, const char *kind);
void dropSlot(Slot *slot);

// Closes `c`, ending TLS without waiting for the peer.
void closeConnection(ngx_connection_t *c);

// ngx.req.socket([raw]) for ctx (api/socket_tcp.cpp): pushes the object
// or nil, err; returns the result count.
int reqSocketOpen(lua_State *L, RequestCtx *ctx, bool raw);

// The socket's request still owns it when the running code belongs to it.
inline RequestCtx *currentCtx()
{
    return g_run ? g_run->ctx : nullptr;
}

}  // namespace luaguard::api::sock
