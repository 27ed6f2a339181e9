// balancer_by_lua: Lua chooses the upstream peer of each try. The handler
// wraps whatever balancer the upstream block had (round robin unless
// another module set one), so a try for which Lua sets no peer falls back
// to it, and `keepalive` placed after the directive wraps us in turn.
#pragma once

#include "ngx/module.hpp"

namespace luaguard::balancer {

// One upstream request's balancer state, in the request pool; the API
// (api/balancer.cpp) reaches the one whose handler is running through
// current().
struct State {
    ngx_http_request_t     *r;
    Handler                *handler;
    ngx_peer_connection_t  *pc;          // during a try's get()

    // The balancer we wrap.
    void                   *orig_data;
    ngx_event_get_peer_pt   orig_get;
    ngx_event_free_peer_pt  orig_free;

    // The peer Lua set for the try in progress.
    bool                    peer_set;
    bool                    ours;        // the last try's peer was Lua's
    struct sockaddr_storage addr;
    socklen_t               socklen;
    ngx_str_t               name;
    u_char                  name_buf[NGX_SOCKADDR_STRLEN];

    ngx_uint_t              tries_done;  // tries before this one
    ngx_uint_t              last_state;  // NGX_PEER_FAILED / _NEXT, 0: none
    bool                    conf_copied; // u->conf is ours (set_timeouts)
    bool                    exited;      // ngx.exit in this try
    ngx_int_t               exit_code;
};

// The state of the balancer_by_lua handler running now, or null.
State *current();

// ngx.exit in balancer_by_lua: lua-nginx-module records the status and
// lets the handler go on; a status of 400 and above (or ngx.ERROR) then
// fails the try with a 500.
void recordExit(State *s, ngx_int_t code);

// balancer_by_lua_block / _file in an upstream block: installs the
// wrapper. `srv` is our server configuration of the upstream block.
char *install(ngx_conf_t *cf, SrvConf *srv);

}  // namespace luaguard::balancer
