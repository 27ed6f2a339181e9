// The egress policy: which destinations cosockets may connect to. Every
// outgoing connection a Lua script asks for (TCP connect, UDP setpeername,
// unix sockets) is checked here on the address it resolved to,
// immediately before the socket is created: checking the final address,
// not the name, is what keeps DNS rebinding from getting round a policy.
// No nginx in here: api/socket_common.cpp logs refusals and turns them
// into `nil, "destination not allowed by policy"`.
//
// Rules (`lua_egress allow|deny TARGET... [port=P,...]`) are evaluated in
// order, the first match decides (a broad allow rule does not open a
// cloud metadata address: only `allow metadata` or the address itself
// does); then the metadata addresses are refused; then
// `lua_egress_default`. An
// address is judged in every form it reaches (IPv4 inside NAT64, 6to4,
// mapped IPv6; 0.0.0.0 and :: as loopback): all must be allowed. Unix
// socket paths are resolved first, and refused unless a rule allows them.
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
    bool                 metadata = false;  // names the metadata group
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

// An address as the rules see it.
struct Addr {
    int      family;        // AF_INET, AF_INET6
    uint8_t  b[16];
};

// The addresses a connection to `addr` reaches (at most 3): itself (an
// IPv4-mapped address only as IPv4), the IPv4 address a NAT64, SIIT or
// 6to4 address wraps, and the loopback address for 0.0.0.0 or ::.
int spellings(int family, const uint8_t *addr, Addr *out);

// "/a//b/./c" -> "/a/b/c"; false for a relative path, a ".." segment or
// a NUL byte. No file system access.
bool normalizeUnixPath(const std::string &in, std::string *out);

// normalizeUnixPath, then realpath(3): every symlink followed. False
// with *err (errno; EINVAL for a refused spelling) when it does not
// resolve.
bool resolveUnixPath(const std::string &in, std::string *out, int *err);

// The address forms of a named group ("loopback", "private", "link-local",
// "metadata", "any"), or false when `name` is none of them.
bool group(const std::string &name, std::vector<Net> *out);

}  // namespace egress

// True when `policy` (null: the built-in default, which refuses only the
// cloud metadata addresses) allows a connection to `sa`. On refusal *why
// names the rule.
bool egressAllowed(const egress::Policy *policy, const struct sockaddr *sa,
                   socklen_t len, std::string *why);

// The same for a unix domain socket path ("unix:" stripped): the path is
// resolved (resolveUnixPath) and the resolved path is matched; *resolved
// gets it, and the caller connects to that path, so what was judged is
// what is reached. Unix sockets are refused unless a rule allows them
// (lua_egress_default does not open them).
bool egressAllowedUnix(const egress::Policy *policy, const char *path,
                       size_t len, std::string *resolved, std::string *why);

// Per-worker count of refused connections, for the metrics endpoint.
uint64_t egressRefusals();

}  // namespace luaguard
