#include "security/egress.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>

#include <cstdlib>
#include <cstring>

namespace luaguard {

const char kEgressDenied[] = "destination not allowed by policy";

namespace egress {

namespace {

uint64_t g_refusals = 0;

bool parseNet(const std::string &text, Net *out)
{
    std::string addr = text;
    int prefix = -1;
    size_t slash = text.find('/');
    if (slash != std::string::npos) {
        addr = text.substr(0, slash);
        std::string bits = text.substr(slash + 1);
        if (bits.empty() || bits.find_first_not_of("0123456789")
                                != std::string::npos)
        {
            return false;
        }
        prefix = std::atoi(bits.c_str());
    }
    std::memset(out->addr, 0, sizeof(out->addr));
    // inet_pton takes only the canonical dotted quad: "0177.1" or
    // "2130706433" are refused here, never read as an address.
    if (inet_pton(AF_INET, addr.c_str(), out->addr) == 1) {
        out->family = AF_INET;
        out->prefix = prefix < 0 ? 32 : prefix;
        return out->prefix <= 32;
    }
    if (inet_pton(AF_INET6, addr.c_str(), out->addr) == 1) {
        out->family = AF_INET6;
        out->prefix = prefix < 0 ? 128 : prefix;
        return out->prefix <= 128;
    }
    return false;
}

Net net(const char *text)
{
    Net n{};
    parseNet(text, &n);
    return n;
}

bool matches(const Net &n, int family, const uint8_t *addr)
{
    if (n.family != family) {
        return false;
    }
    int full = n.prefix / 8;
    if (std::memcmp(n.addr, addr, full) != 0) {
        return false;
    }
    int rest = n.prefix % 8;
    if (rest == 0) {
        return true;
    }
    uint8_t mask = static_cast<uint8_t>(0xff << (8 - rest));
    return (n.addr[full] & mask) == (addr[full] & mask);
}

bool parsePorts(const std::string &list,
                std::vector<std::pair<uint16_t, uint16_t>> *out)
{
    size_t start = 0;
    while (start <= list.size()) {
        size_t comma = list.find(',', start);
        std::string item = list.substr(start, comma - start);
        size_t dash = item.find('-');
        std::string lo = item.substr(0, dash);
        std::string hi = dash == std::string::npos ? lo : item.substr(dash + 1);
        for (const std::string *s : {&lo, &hi}) {
            if (s->empty() || s->size() > 5
                || s->find_first_not_of("0123456789") != std::string::npos)
            {
                return false;
            }
        }
        long a = std::atol(lo.c_str()), b = std::atol(hi.c_str());
        if (a < 1 || b > 65535 || a > b) {
            return false;
        }
        out->emplace_back(static_cast<uint16_t>(a), static_cast<uint16_t>(b));
        if (comma == std::string::npos) {
            break;
        }
        start = comma + 1;
    }
    return !out->empty();
}

bool portMatches(const Rule &r, uint16_t port)
{
    if (r.ports.empty()) {
        return true;
    }
    for (const auto &range : r.ports) {
        if (port >= range.first && port <= range.second) {
            return true;
        }
    }
    return false;
}

bool inList(const std::vector<Net> &nets, int family, const uint8_t *addr)
{
    for (const Net &n : nets) {
        if (matches(n, family, addr)) {
            return true;
        }
    }
    return false;
}

const std::vector<Net> &metadata()
{
    static const std::vector<Net> nets = {
        net("169.254.169.254/32"),  // AWS, GCP, Azure, OpenStack, ...
        net("169.254.170.2/32"),    // AWS ECS task metadata
        net("100.100.100.200/32"),  // Alibaba Cloud
        net("fd00:ec2::254/128"),   // AWS over IPv6
    };
    return nets;
}

}  // namespace

bool group(const std::string &name, std::vector<Net> *out)
{
    static const char *const kLoopback[] = {"127.0.0.0/8", "::1/128"};
    static const char *const kPrivate[] = {"10.0.0.0/8", "172.16.0.0/12",
                                           "192.168.0.0/16", "100.64.0.0/10",
                                           "fc00::/7"};
    static const char *const kLinkLocal[] = {"169.254.0.0/16", "fe80::/10"};
    static const char *const kAny[] = {"0.0.0.0/0", "::/0"};
    auto add = [out](const char *const *v, size_t n) {
        for (size_t i = 0; i < n; i++) {
            out->push_back(net(v[i]));
        }
    };
    if (name == "loopback") {
        add(kLoopback, 2);
    } else if (name == "private") {
        add(kPrivate, 5);
    } else if (name == "link-local") {
        add(kLinkLocal, 2);
    } else if (name == "metadata") {
        for (const Net &n : metadata()) {
            out->push_back(n);
        }
    } else if (name == "any" || name == "all") {
        add(kAny, 2);
    } else {
        return false;
    }
    return true;
}

bool parseRule(const std::vector<std::string> &args, Rule *out,
               std::string *err)
{
    if (args.size() < 2 || (args[0] != "allow" && args[0] != "deny")) {
        *err = "expected \"allow\" or \"deny\" and at least one target";
        return false;
    }
    Rule r;
    r.allow = args[0] == "allow";
    r.text = args[0];
    bool any_target = false;
    for (size_t i = 1; i < args.size(); i++) {
        const std::string &a = args[i];
        r.text += " " + a;
        if (a.compare(0, 5, "port=") == 0) {
            if (!r.ports.empty() || !parsePorts(a.substr(5), &r.ports)) {
                *err = "invalid port list \"" + a + "\"";
                return false;
            }
            continue;
        }
        any_target = true;
        if (a.compare(0, 5, "unix:") == 0) {
            if (a == "unix:*") {
                r.any_unix = true;
            } else if (a.size() < 7 || a[5] != '/') {
                *err = "invalid unix socket path \"" + a + "\"";
                return false;
            } else {
                r.unix_paths.push_back(a.substr(5));
            }
            continue;
        }
        if (group(a, &r.nets)) {
            continue;
        }
        Net n;
        if (!parseNet(a, &n)) {
            *err = "invalid target \"" + a + "\": expected an address or "
                   "CIDR range, loopback, private, link-local, metadata, "
                   "any, or unix:/path";
            return false;
        }
        r.nets.push_back(n);
    }
    if (!any_target) {
        *err = "no target given";
        return false;
    }
    *out = std::move(r);
    return true;
}

}  // namespace egress

bool egressAllowed(const egress::Policy *policy, const struct sockaddr *sa,
                   socklen_t len, std::string *why)
{
    using namespace egress;
    int family;
    const uint8_t *addr;
    uint16_t port;
    uint8_t mapped[4];

    if (sa == nullptr) {
        *why = "no address";
        return false;
    }
    if (sa->sa_family == AF_UNIX) {
        return true;  // decided by egressAllowedUnix
    }
    if (sa->sa_family == AF_INET && len >= sizeof(sockaddr_in)) {
        const auto *sin = reinterpret_cast<const sockaddr_in *>(sa);
        family = AF_INET;
        addr = reinterpret_cast<const uint8_t *>(&sin->sin_addr);
        port = ntohs(sin->sin_port);
    } else if (sa->sa_family == AF_INET6 && len >= sizeof(sockaddr_in6)) {
        const auto *sin6 = reinterpret_cast<const sockaddr_in6 *>(sa);
        family = AF_INET6;
        addr = sin6->sin6_addr.s6_addr;
        port = ntohs(sin6->sin6_port);
        // ::ffff:a.b.c.d reaches the IPv4 address: judge it as that.
        static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                            0xff, 0xff};
        if (std::memcmp(addr, kMapped, 12) == 0) {
            std::memcpy(mapped, addr + 12, 4);
            family = AF_INET;
            addr = mapped;
        }
    } else {
        *why = "unsupported address family";
        g_refusals++;
        return false;
    }

    if (policy) {
        for (const Rule &r : policy->rules) {
            if (inList(r.nets, family, addr) && portMatches(r, port)) {
                if (!r.allow) {
                    *why = "lua_egress " + r.text;
                    g_refusals++;
                }
                return r.allow;
            }
        }
    }
    if (inList(metadata(), family, addr)) {
        *why = "cloud metadata address (allow it explicitly with "
               "\"lua_egress allow metadata\")";
        g_refusals++;
        return false;
    }
    if (policy && !policy->default_allow) {
        *why = "lua_egress_default deny";
        g_refusals++;
        return false;
    }
    return true;
}

bool egressAllowedUnix(const egress::Policy *policy, const char *path,
                       size_t len, std::string *why)
{
    using namespace egress;
    std::string p(path, len);
    if (policy) {
        for (const Rule &r : policy->rules) {
            bool hit = r.any_unix;
            for (const std::string &u : r.unix_paths) {
                if (!u.empty() && u.back() == '*') {
                    hit = hit || p.compare(0, u.size() - 1, u, 0,
                                           u.size() - 1) == 0;
                } else {
                    hit = hit || p == u;
                }
            }
            if (hit) {
                if (!r.allow) {
                    *why = "lua_egress " + r.text;
                    g_refusals++;
                }
                return r.allow;
            }
        }
        if (!policy->default_allow) {
            *why = "lua_egress_default deny";
            g_refusals++;
            return false;
        }
    }
    return true;
}

uint64_t egressRefusals()
{
    return egress::g_refusals;
}

}  // namespace luaguard
