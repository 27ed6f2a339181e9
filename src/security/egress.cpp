// The stub egress policy: see egress.hpp.

#include "security/egress.hpp"

#include <netinet/in.h>

#include <cstring>

namespace luaguard {

const char kEgressDenied[] = "destination not allowed by policy";

namespace {

// 169.254.169.254: the metadata service of AWS, GCP, Azure and others.
bool isMetadataV4(const struct in_addr &a)
{
    return ntohl(a.s_addr) == 0xa9fea9feu;
}

// fd00:ec2::254: AWS's IPv6 metadata endpoint.
bool isMetadataV6(const struct in6_addr &a)
{
    static const unsigned char kAws[16] = {0xfd, 0x00, 0x0e, 0xc2, 0, 0, 0,
                                           0, 0, 0, 0, 0, 0, 0, 0x02, 0x54};
    if (std::memcmp(a.s6_addr, kAws, 16) == 0) {
        return true;
    }
    // ::ffff:169.254.169.254 reaches the IPv4 endpoint through a dual
    // stack socket.
    static const unsigned char kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                              0xff, 0xff};
    if (std::memcmp(a.s6_addr, kMapped, 12) == 0) {
        struct in_addr v4;
        std::memcpy(&v4, a.s6_addr + 12, 4);
        return isMetadataV4(v4);
    }
    return false;
}

}  // namespace

bool egressAllowed(const LocConf *, const struct sockaddr *sa, socklen_t len,
                   std::string *why)
{
    if (sa == nullptr) {
        *why = "no address";
        return false;
    }
    if (sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        const auto *sin = reinterpret_cast<const struct sockaddr_in *>(sa);
        if (isMetadataV4(sin->sin_addr)) {
            *why = "cloud metadata address";
            return false;
        }
        return true;
    }
    if (sa->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        const auto *sin6 = reinterpret_cast<const struct sockaddr_in6 *>(sa);
        if (isMetadataV6(sin6->sin6_addr)) {
            *why = "cloud metadata address";
            return false;
        }
        return true;
    }
    if (sa->sa_family == AF_UNIX) {
        return true;
    }
    *why = "unsupported address family";
    return false;
}

bool egressAllowedUnix(const LocConf *, const char *, size_t, std::string *)
{
    return true;
}

}  // namespace luaguard
