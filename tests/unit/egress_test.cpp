#include "security/egress.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/un.h>

#include <gtest/gtest.h>

namespace luaguard {
namespace {

bool allowV4(const char *ip, std::string *why)
{
    struct sockaddr_in sin {};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(80);
    inet_pton(AF_INET, ip, &sin.sin_addr);
    return egressAllowed(nullptr, reinterpret_cast<struct sockaddr *>(&sin),
                         sizeof(sin), why);
}

bool allowV6(const char *ip, std::string *why)
{
    struct sockaddr_in6 sin6 {};
    sin6.sin6_family = AF_INET6;
    sin6.sin6_port = htons(80);
    inet_pton(AF_INET6, ip, &sin6.sin6_addr);
    return egressAllowed(nullptr, reinterpret_cast<struct sockaddr *>(&sin6),
                         sizeof(sin6), why);
}

TEST(Egress, AllowsOrdinaryAddresses)
{
    std::string why;
    EXPECT_TRUE(allowV4("127.0.0.1", &why));
    EXPECT_TRUE(allowV4("169.254.169.253", &why));
    EXPECT_TRUE(allowV6("::1", &why));
    EXPECT_TRUE(allowV6("fd00:ec2::253", &why));
}

TEST(Egress, RefusesMetadataEndpoints)
{
    std::string why;
    EXPECT_FALSE(allowV4("169.254.169.254", &why));
    EXPECT_EQ(why.rfind("cloud metadata address", 0), 0u) << why;
    why.clear();
    EXPECT_FALSE(allowV6("fd00:ec2::254", &why));
    EXPECT_FALSE(allowV6("::ffff:169.254.169.254", &why));
}

TEST(Egress, UnixAndOddInput)
{
    std::string why;
    EXPECT_TRUE(egressAllowedUnix(nullptr, "/tmp/x.sock", 11, &why));
    struct sockaddr_un sun {};
    sun.sun_family = AF_UNIX;
    EXPECT_TRUE(egressAllowed(nullptr,
                              reinterpret_cast<struct sockaddr *>(&sun),
                              sizeof(sun), &why));
    EXPECT_FALSE(egressAllowed(nullptr, nullptr, 0, &why));
    struct sockaddr_in sin {};
    sin.sin_family = AF_INET;
    EXPECT_FALSE(egressAllowed(nullptr,
                               reinterpret_cast<struct sockaddr *>(&sin),
                               4, &why));  // truncated: refused
}

}  // namespace
}  // namespace luaguard

namespace luaguard {
namespace {

egress::Policy policyOf(std::vector<std::vector<std::string>> rules,
                        bool default_allow = true)
{
    egress::Policy p;
    p.default_allow = default_allow;
    for (auto &words : rules) {
        egress::Rule r;
        std::string err;
        EXPECT_TRUE(egress::parseRule(words, &r, &err)) << err;
        p.rules.push_back(r);
    }
    return p;
}

bool allowed(const egress::Policy &p, const char *ip, int port)
{
    std::string why;
    if (std::string(ip).find(':') != std::string::npos) {
        struct sockaddr_in6 sin6 {};
        sin6.sin6_family = AF_INET6;
        sin6.sin6_port = htons(port);
        inet_pton(AF_INET6, ip, &sin6.sin6_addr);
        return egressAllowed(&p, reinterpret_cast<sockaddr *>(&sin6),
                             sizeof(sin6), &why);
    }
    struct sockaddr_in sin {};
    sin.sin_family = AF_INET;
    sin.sin_port = htons(port);
    inet_pton(AF_INET, ip, &sin.sin_addr);
    return egressAllowed(&p, reinterpret_cast<sockaddr *>(&sin), sizeof(sin),
                         &why);
}

TEST(EgressPolicy, FirstMatchDecides)
{
    auto p = policyOf({{"allow", "10.1.2.3"}, {"deny", "private"}});
    EXPECT_TRUE(allowed(p, "10.1.2.3", 80));
    EXPECT_FALSE(allowed(p, "10.1.2.4", 80));
    EXPECT_FALSE(allowed(p, "192.168.1.1", 80));
    EXPECT_FALSE(allowed(p, "172.31.255.255", 80));
    EXPECT_TRUE(allowed(p, "172.32.0.1", 80));
    EXPECT_FALSE(allowed(p, "fd12::1", 80));
}

TEST(EgressPolicy, PortsAndRanges)
{
    auto p = policyOf({{"deny", "any", "port=22,6000-6010"}});
    EXPECT_FALSE(allowed(p, "8.8.8.8", 22));
    EXPECT_FALSE(allowed(p, "8.8.8.8", 6005));
    EXPECT_TRUE(allowed(p, "8.8.8.8", 6011));
    EXPECT_TRUE(allowed(p, "8.8.8.8", 443));
}

TEST(EgressPolicy, MappedAddressesJudgedAsIpv4)
{
    auto p = policyOf({{"deny", "127.0.0.2"}});
    EXPECT_FALSE(allowed(p, "::ffff:127.0.0.2", 80));
    EXPECT_TRUE(allowed(p, "::ffff:127.0.0.1", 80));
}

TEST(EgressPolicy, MetadataRefusedUnlessAllowed)
{
    auto open = policyOf({});
    EXPECT_FALSE(allowed(open, "169.254.169.254", 80));
    EXPECT_FALSE(allowed(open, "100.100.100.200", 80));
    EXPECT_FALSE(allowed(open, "fd00:ec2::254", 80));
    auto p = policyOf({{"allow", "metadata"}});
    EXPECT_TRUE(allowed(p, "169.254.169.254", 80));
}

TEST(EgressPolicy, DefaultDeny)
{
    auto p = policyOf({{"allow", "127.0.0.0/8", "port=6379"}}, false);
    EXPECT_TRUE(allowed(p, "127.0.0.1", 6379));
    EXPECT_FALSE(allowed(p, "127.0.0.1", 6380));
    EXPECT_FALSE(allowed(p, "1.1.1.1", 6379));
}

TEST(EgressPolicy, PrefixBoundaries)
{
    auto p = policyOf({{"deny", "10.0.0.0/9"}, {"deny", "2001:db8::/33"}});
    EXPECT_FALSE(allowed(p, "10.127.255.255", 1));
    EXPECT_TRUE(allowed(p, "10.128.0.0", 1));
    EXPECT_FALSE(allowed(p, "2001:db8:7fff::1", 1));
    EXPECT_TRUE(allowed(p, "2001:db8:8000::1", 1));
}

TEST(EgressPolicy, BadRulesRejected)
{
    egress::Rule r;
    std::string err;
    for (auto words : std::vector<std::vector<std::string>>{
             {"allow"}, {"permit", "1.2.3.4"}, {"deny", "1.2.3"},
             {"deny", "0177.0.0.1"}, {"deny", "2130706433"},
             {"deny", "10.0.0.0/33"}, {"deny", "::/129"},
             {"deny", "any", "port=0"}, {"deny", "any", "port=9-3"},
             {"deny", "unix:rel"}, {"deny", "port=80"}}) {
        EXPECT_FALSE(egress::parseRule(words, &r, &err)) << words[1];
    }
}

TEST(EgressPolicy, UnixPaths)
{
    auto p = policyOf({{"allow", "unix:/run/app.sock"},
                       {"deny", "unix:/run/*"}});
    std::string why;
    EXPECT_TRUE(egressAllowedUnix(&p, "/run/app.sock", 13, &why));
    EXPECT_FALSE(egressAllowedUnix(&p, "/run/other.sock", 15, &why));
    EXPECT_TRUE(egressAllowedUnix(&p, "/tmp/x.sock", 11, &why));
}

}  // namespace
}  // namespace luaguard
