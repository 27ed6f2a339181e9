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
    EXPECT_EQ(why, "cloud metadata address");
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
