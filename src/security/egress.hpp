// The egress policy: which destinations cosockets may connect to. Every
// outgoing connection a Lua script asks for (TCP connect, UDP setpeername,
// unix sockets) is checked here on the address it resolved to,
// immediately before the socket is created: checking the final address,
// not the name, is what keeps DNS rebinding from getting round a policy.
// No nginx in here: api/socket_common.cpp logs refusals and turns them
// into `nil, "destination not allowed by policy"`.
//
// Rules (`lua_egress allow|deny TARGET... [port=P,...]`) are evaluated in
// order, the first match decides; then the cloud metadata addresses are
// refused unless a rule allowed them; then `lua_egress_default`.
#pragma once

#include <sys/socket.h>

#include <cstdint>
#include <string>
#include <vector>

namespace luaguard {

// The error string scripts see when a destination is refused.
extern const char kEgressDenied[];

namespace egress {

struct Net {
    int      family;        // AF_INET, AF_INET6
    uint8_t  addr[16];
    int      prefix;        // bits
};

struct Rule {
    bool                 allow;
    std::vector<Net>     nets;          // empty with unix: no IP match
    std::vector<std::string> unix_paths;  // "unix:/p" exact, "unix:/p/*"
    bool                 any_unix = false;
    std::vector<std::pair<uint16_t, uint16_t>> ports;  // empty: any port
    std::string          text;          // as configured, for the log
};

struct Policy {
    std::vector<Rule> rules;
    bool              default_allow = true;
};

// Parses one `lua_egress` directive's arguments (after the directive
// name). False with *err on a bad target.
bool parseRule(const std::vector<std::string> &args, Rule *out,
               std::string *err);

// The address forms of a named group ("loopback", "private", "link-local",
// "metadata", "any"), or false when `name` is none of them.
bool group(const std::string &name, std::vector<Net> *out);

}  // namespace egress

// True when `policy` (null: the built-in default, which refuses only the
// cloud metadata addresses) allows a connection to `sa`. On refusal *why
// names the rule.
bool egressAllowed(const egress::Policy *policy, const struct sockaddr *sa,
                   socklen_t len, std::string *why);

// The same for a unix domain socket path ("unix:" stripped).
bool egressAllowedUnix(const egress::Policy *policy, const char *path,
                       size_t len, std::string *why);

// Per-worker count of refused connections, for the metrics endpoint.
uint64_t egressRefusals();

}  // namespace luaguard
