// The egress seam: every outgoing connection a Lua script asks for (TCP
// connect, UDP setpeername, unix sockets) is checked here, on the address
// it resolved to, immediately before the socket is created. Checking the
// final address (not the name) is what keeps DNS rebinding from getting
// round a policy. No nginx in here: the callers (api/socket_*.cpp) log
// refusals and turn them into `nil, "destination not allowed by policy"`.
//
// Today's policy is a stub: everything is allowed except the cloud
// instance metadata endpoints. A real, configurable policy replaces the
// bodies of these functions; the signatures are the contract.
#pragma once

#include <sys/socket.h>

#include <string>

namespace luaguard {

struct LocConf;

// The error string scripts see when a destination is refused.
extern const char kEgressDenied[];

// True when `loc` (the configuration of the location whose code connects,
// may be null) allows a connection to `sa`. On refusal *why says which
// rule refused it (for the log).
bool egressAllowed(const LocConf *loc, const struct sockaddr *sa,
                   socklen_t len, std::string *why);

// The same for a unix domain socket path ("unix:" stripped).
bool egressAllowedUnix(const LocConf *loc, const char *path, size_t len,
                       std::string *why);

}  // namespace luaguard
