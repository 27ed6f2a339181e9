#include "security/egress.hpp"

#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>

#include <cerrno>
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
    // Most candidates differ in the first byte: decided without a call
    // (every connect and balancer peer walks the metadata list).
    if (full > 0 && n.addr[0] != addr[0]) {
        return false;
    }
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

// Cloud metadata and credential endpoints: an instance or pod's identity
// on every major cloud. Sources (provider documentation, checked when an
// entry was added; see docs/security.md for the list with links):
const std::vector<Net> &metadata()
{
    static const std::vector<Net> nets = {
        // AWS IMDS; also GCP, Azure IMDS, OpenStack, DigitalOcean, Hetzner,
        // Oracle (IMDSv2), IBM Cloud VPC, Huawei, Linode, Vultr, Yandex.
        net("169.254.169.254/32"),
        net("fd00:ec2::254/128"),   // AWS IMDS over IPv6 (Nitro)
        net("169.254.170.2/32"),    // AWS ECS task metadata / credentials
        net("169.254.170.23/32"),   // AWS EKS Pod Identity agent
        net("fd00:ec2::23/128"),    // AWS EKS Pod Identity agent, IPv6
        net("168.63.129.16/32"),    // Azure WireServer (and its DNS/DHCP)
        net("169.254.0.23/32"),     // Tencent Cloud metadata
        net("192.0.0.192/32"),      // Oracle Cloud legacy metadata
        net("100.100.100.200/32"),  // Alibaba Cloud metadata
        net("169.254.42.42/32"),    // Scaleway metadata
        net("fd00:42::42/128"),     // Scaleway metadata, IPv6
        net("fd20:ce::254/128"),    // GCP metadata server, IPv6
        net("fe80::a9fe:a9fe/128"), // OpenStack metadata, IPv6 link-local
    };
    return nets;
}

// Whether `addr` is in the metadata list. The list's first bytes, per
// family, decide most addresses without walking it (every connect and
// balancer peer asks).
bool isMetadata(int family, const uint8_t *addr)
{
    struct Index {
        bool first[2][256] = {};  // [IPv6][first byte]: a net may match
        Index()
        {
            for (const Net &n : metadata()) {
                int v6 = n.family == AF_INET6;
                for (int b = 0; b < 256; b++) {
                    int bits = n.prefix < 8 ? n.prefix : 8;
                    int mask = (0xff << (8 - bits)) & 0xff;
                    if ((b & mask) == (n.addr[0] & mask)) {
                        first[v6][b] = true;
                    }
                }
            }
        }
    };
    static const Index index;
    if (!index.first[family == AF_INET6][addr[0]]) {
        return false;
    }
    return inList(metadata(), family, addr);
}

}  // namespace

bool group(const std::string &name, std::vector<Net> *out)
{
    // 0.0.0.0/8 and :: reach the host's own listeners when connected to.
    static const char *const kLoopback[] = {"127.0.0.0/8", "::1/128",
                                            "0.0.0.0/8", "::/128"};
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
        add(kLoopback, 4);
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
    std::string norm;
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
            } else if (a.size() < 7 || a[5] != '/'
                       || !normalizeUnixPath(a.substr(5, a.size() - 5
                                                         - (a.back() == '*')),
                                             &norm))
            {
                *err = "invalid unix socket path \"" + a + "\"";
                return false;
            } else {
                r.unix_paths.push_back(a.substr(5));
            }
            continue;
        }
        if (group(a, &r.nets)) {
            r.metadata = r.metadata || a == "metadata";
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

namespace egress {

namespace {

// The policy's verdict on one address: rules in order, then the metadata
// list, then lua_egress_default.
bool judge(const Policy *policy, const Addr &a, uint16_t port,
           std::string *why)
{
    bool meta = isMetadata(a.family, a.b);
    int host = a.family == AF_INET ? 32 : 128;
    if (policy) {
        for (const Rule &r : policy->rules) {
            const Net *hit = nullptr;
            for (const Net &n : r.nets) {
                if (matches(n, a.family, a.b)) {
                    hit = &n;
                    break;
                }
            }
            if (hit == nullptr || !portMatches(r, port)) {
                continue;
            }
            if (!r.allow) {
                *why = "lua_egress " + r.text;
                return false;
            }
            if (meta && !r.metadata && hit->prefix < host) {
                // A broad allow (any, private, a range) does not open a
                // metadata address: only "allow metadata" or the
                // address itself does.
                continue;
            }
            return true;
        }
    }
    if (meta) {
        *why = "cloud metadata address (allow it explicitly with "
               "\"lua_egress allow metadata\")";
        return false;
    }
    if (policy && !policy->default_allow) {
        *why = "lua_egress_default deny";
        return false;
    }
    return true;
}

Addr v4(const uint8_t *p)
{
    Addr a{};
    a.family = AF_INET;
    std::memcpy(a.b, p, 4);
    return a;
}

}  // namespace

int spellings(int family, const uint8_t *addr, Addr *out)
{
    static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0xff, 0xff};
    static const uint8_t kTranslated[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0xff,
                                            0xff, 0, 0};
    static const uint8_t kNat64[4] = {0, 0x64, 0xff, 0x9b};
    static const uint8_t kLoop4[4] = {127, 0, 0, 1};
    static const uint8_t kZero[16] = {};
    int n = 0;
    Addr a{};
    a.family = family;
    std::memcpy(a.b, addr, family == AF_INET ? 4 : 16);
    if (family == AF_INET6) {
        if (std::memcmp(addr, kMapped, 12) == 0) {
            // ::ffff:a.b.c.d is an IPv4 socket: only the IPv4 address.
            a = v4(addr + 12);
        } else {
            out[n++] = a;
            if (std::memcmp(addr, kTranslated, 12) == 0
                || std::memcmp(addr, kNat64, 4) == 0)
            {
                // SIIT (::ffff:0:a.b.c.d), NAT64 64:ff9b::/96 and the
                // local-use 64:ff9b:1::/48 (all of 64:ff9b::/32): a
                // translator carries these to the IPv4 address in the
                // last 32 bits.
                a = v4(addr + 12);
            } else if (addr[0] == 0x20 && addr[1] == 0x02) {
                a = v4(addr + 2);  // 6to4: 2002:AABB:CCDD::/48
            } else {
                if (std::memcmp(addr, kZero, 16) == 0) {
                    // :: connects to the host itself, like ::1.
                    Addr one{};
                    one.family = AF_INET6;
                    one.b[15] = 1;
                    out[n++] = one;
                }
                return n;
            }
        }
    }
    out[n++] = a;
    if (a.b[0] == 0 && a.b[1] == 0 && a.b[2] == 0 && a.b[3] == 0) {
        // 0.0.0.0 connects to the host itself, like 127.0.0.1.
        out[n++] = v4(kLoop4);
    }
    return n;
}

}  // namespace egress

bool egressAllowed(const egress::Policy *policy, const struct sockaddr *sa,
                   socklen_t len, std::string *why)
{
    using namespace egress;
    int family;
    const uint8_t *addr;
    uint16_t port;

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
    } else {
        *why = "unsupported address family";
        g_refusals++;
        return false;
    }

    // Every address the connection can be said to reach must be allowed:
    // an IPv6 address wrapping an IPv4 one is judged as both.
    Addr all[4];
    int n = spellings(family, addr, all);
    for (int i = 0; i < n; i++) {
        if (!judge(policy, all[i], port, why)) {
            g_refusals++;
            return false;
        }
    }
    return true;
}

namespace egress {

bool normalizeUnixPath(const std::string &in, std::string *out)
{
    if (in.empty() || in[0] != '/' || in.find('\0') != std::string::npos) {
        return false;
    }
    std::string p;
    size_t i = 0;
    while (i < in.size()) {
        size_t slash = in.find('/', i);
        if (slash == std::string::npos) {
            slash = in.size();
        }
        std::string seg = in.substr(i, slash - i);
        i = slash + 1;
        if (seg.empty() || seg == ".") {
            continue;  // "//" and "/./"
        }
        if (seg == "..") {
            return false;  // refused, never resolved
        }
        p += '/';
        p += seg;
    }
    *out = p.empty() ? "/" : p;
    return true;
}

bool resolveUnixPath(const std::string &in, std::string *out, int *err)
{
    std::string norm;
    if (!normalizeUnixPath(in, &norm)) {
        *err = EINVAL;
        return false;
    }
    char buf[PATH_MAX];
    if (realpath(norm.c_str(), buf) == nullptr) {
        *err = errno;
        return false;
    }
    *out = buf;
    return true;
}

namespace {

// A rule's path as it reads now: resolved where it exists, so a rule for
// /var/run/x matches a socket reached as /run/x when /var/run -> /run.
std::string ruleExact(const std::string &u)
{
    std::string r;
    int err;
    if (resolveUnixPath(u, &r, &err)) {
        return r;
    }
    return normalizeUnixPath(u, &r) ? r : u;
}

// "dir/prefix*": the directory resolved, the name prefix kept as text.
std::string rulePrefix(const std::string &u)
{
    std::string base = u.substr(0, u.size() - 1);
    size_t slash = base.rfind('/');
    std::string dir = base.substr(0, slash);
    std::string name = base.substr(slash + 1);
    std::string d = dir.empty() ? std::string("/") : ruleExact(dir);
    if (d.back() != '/') {
        d += '/';
    }
    return d + name;
}

}  // namespace

}  // namespace egress

bool egressAllowedUnix(const egress::Policy *policy, const char *path,
                       size_t len, std::string *resolved, std::string *why)
{
    using namespace egress;
    int err = 0;
    if (!resolveUnixPath(std::string(path, len), resolved, &err)) {
        resolved->clear();
        *why = err == EINVAL ? "unix socket path with \"..\" or not absolute"
                             : std::string("unix socket path does not "
                                           "resolve: ")
                                   + std::strerror(err);
        g_refusals++;
        return false;
    }
    const std::string &p = *resolved;
    if (policy) {
        for (const Rule &r : policy->rules) {
            bool hit = r.any_unix;
            for (const std::string &u : r.unix_paths) {
                if (hit) {
                    break;
                }
                if (u.back() == '*') {
                    std::string pre = rulePrefix(u);
                    hit = p.compare(0, pre.size(), pre) == 0;
                } else {
                    hit = p == ruleExact(u);
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
    }
    *why = "unix socket not in an allow rule (\"lua_egress allow "
           "unix:...\")";
    g_refusals++;
    return false;
}

uint64_t egressRefusals()
{
    return egress::g_refusals;
}

}  // namespace luaguard
