#include "security/egress.hpp"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <limits.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

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
    std::string why, resolved;
    // No rule: unix sockets are refused, even an existing path.
    EXPECT_FALSE(egressAllowedUnix(nullptr, "/tmp", 4, &resolved, &why));
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

// A scratch directory tree with files standing in for sockets (the
// policy resolves paths; it does not care what the file is).
class UnixTree : public ::testing::Test {
protected:
    void SetUp() override
    {
        char tmpl[] = "/tmp/egress_test.XXXXXX";
        ASSERT_NE(mkdtemp(tmpl), nullptr);
        char real[PATH_MAX];
        ASSERT_NE(realpath(tmpl, real), nullptr);
        root_ = real;
        mkdir((root_ + "/app").c_str(), 0700);
        touch("/app/ok.sock");
        touch("/docker.sock");
        ASSERT_EQ(symlink("../docker.sock",
                          (root_ + "/app/link.sock").c_str()), 0);
        ASSERT_EQ(symlink(root_.c_str(), (root_ + "/dirlink").c_str()), 0);
        ASSERT_EQ(symlink("app", (root_ + "/applink").c_str()), 0);
    }

    void TearDown() override
    {
        for (const char *f : {"/app/ok.sock", "/app/link.sock",
                              "/docker.sock", "/dirlink", "/applink"}) {
            unlink((root_ + f).c_str());
        }
        rmdir((root_ + "/app").c_str());
        rmdir(root_.c_str());
    }

    void touch(const char *rel)
    {
        FILE *f = std::fopen((root_ + rel).c_str(), "w");
        ASSERT_NE(f, nullptr);
        std::fclose(f);
    }

    bool allowed(const egress::Policy &p, const std::string &rel,
                 std::string *resolved = nullptr)
    {
        std::string path = root_ + rel, why, res;
        bool ok = egressAllowedUnix(&p, path.data(), path.size(), &res,
                                    &why);
        if (resolved) {
            *resolved = res;
        }
        return ok;
    }

    std::string root_;
};

TEST(EgressUnix, Normalize)
{
    std::string out;
    EXPECT_TRUE(egress::normalizeUnixPath("/a//b/./c/", &out));
    EXPECT_EQ(out, "/a/b/c");
    EXPECT_TRUE(egress::normalizeUnixPath("///", &out));
    EXPECT_EQ(out, "/");
    EXPECT_FALSE(egress::normalizeUnixPath("/a/../b", &out));
    EXPECT_FALSE(egress::normalizeUnixPath("/a/..", &out));
    EXPECT_FALSE(egress::normalizeUnixPath("a/b", &out));
    EXPECT_FALSE(egress::normalizeUnixPath("", &out));
    EXPECT_FALSE(egress::normalizeUnixPath(std::string("/a\0b", 4), &out));
    EXPECT_TRUE(egress::normalizeUnixPath("/a/..b/.c", &out));
    EXPECT_EQ(out, "/a/..b/.c");
}

TEST_F(UnixTree, AllowPrefixIsNotEscaped)
{
    auto p = policyOf({{"allow", "unix:" + root_ + "/app/*"}});
    std::string res;
    EXPECT_TRUE(allowed(p, "/app/ok.sock", &res));
    EXPECT_EQ(res, root_ + "/app/ok.sock");
    EXPECT_TRUE(allowed(p, "//app/./ok.sock"));
    EXPECT_TRUE(allowed(p, "/applink/ok.sock", &res));  // dir symlink
    EXPECT_EQ(res, root_ + "/app/ok.sock");
    EXPECT_FALSE(allowed(p, "/app/../docker.sock"));
    EXPECT_FALSE(allowed(p, "/app/link.sock"));      // -> ../docker.sock
    EXPECT_FALSE(allowed(p, "/app/missing.sock"));   // does not resolve
    EXPECT_FALSE(allowed(p, "/docker.sock"));        // no rule: refused
}

TEST_F(UnixTree, DenyExactCoversEverySpelling)
{
    auto p = policyOf({{"deny", "unix:" + root_ + "/docker.sock"},
                       {"allow", "unix:*"}});
    EXPECT_FALSE(allowed(p, "/docker.sock"));
    EXPECT_FALSE(allowed(p, "//docker.sock"));
    EXPECT_FALSE(allowed(p, "/./docker.sock"));
    EXPECT_FALSE(allowed(p, "/dirlink/docker.sock"));
    EXPECT_FALSE(allowed(p, "/dirlink//dirlink/./docker.sock"));
    EXPECT_FALSE(allowed(p, "/app/link.sock"));
    EXPECT_TRUE(allowed(p, "/app/ok.sock"));
    // The rule spelled through a symlinked directory matches the same.
    auto q = policyOf({{"deny", "unix:" + root_ + "/dirlink/docker.sock"},
                       {"allow", "unix:*"}});
    EXPECT_FALSE(allowed(q, "/docker.sock"));
    EXPECT_TRUE(allowed(q, "/app/ok.sock"));
}

TEST(EgressUnix, DefaultDoesNotOpenUnixSockets)
{
    // lua_egress_default allow is about addresses; unix sockets need a
    // rule.
    auto p = policyOf({{"allow", "any"}});
    std::string why, res;
    EXPECT_FALSE(egressAllowedUnix(&p, "/tmp", 4, &res, &why));
    EXPECT_NE(why.find("lua_egress allow unix:"), std::string::npos) << why;
    egress::Rule r;
    std::string err;
    EXPECT_FALSE(egress::parseRule({"allow", "unix:/run/../x"}, &r, &err));
    EXPECT_FALSE(egress::parseRule({"allow", "unix:/run/../*"}, &r, &err));
}

// Every spelling of every metadata entry is refused by the built-in
// default, and by an open policy (`allow private` etc. not naming
// metadata).
struct Spelling {
    std::string text;
    sockaddr_storage sa;
    socklen_t len;
};

std::vector<Spelling> spellingsOf(const egress::Net &n)
{
    std::vector<Spelling> out;
    auto add6 = [&out](const std::string &text, const uint8_t *b) {
        Spelling s{text, {}, sizeof(sockaddr_in6)};
        auto *sin6 = reinterpret_cast<sockaddr_in6 *>(&s.sa);
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons(80);
        std::memcpy(sin6->sin6_addr.s6_addr, b, 16);
        out.push_back(s);
    };
    char buf[INET6_ADDRSTRLEN];
    if (n.family == AF_INET6) {
        inet_ntop(AF_INET6, n.addr, buf, sizeof(buf));
        add6(buf, n.addr);
        return out;
    }
    const uint8_t *a = n.addr;
    uint32_t v = (uint32_t(a[0]) << 24) | (uint32_t(a[1]) << 16)
                 | (uint32_t(a[2]) << 8) | a[3];
    // Textual IPv4 forms a permissive parser (inet_aton, as in many
    // resolvers and libraries) reads as this address.
    char t[64];
    std::vector<std::string> texts;
    std::snprintf(t, sizeof(t), "%u.%u.%u.%u", a[0], a[1], a[2], a[3]);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "%u", v);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "0x%x", v);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "0%o.0%o.0%o.0%o", a[0], a[1], a[2], a[3]);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "0x%x.0x%x.0x%x.0x%x", a[0], a[1], a[2],
                  a[3]);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "%u.%u", a[0], v & 0xffffff);
    texts.push_back(t);
    std::snprintf(t, sizeof(t), "%u.%u.%u", a[0], a[1], v & 0xffff);
    texts.push_back(t);
    for (const std::string &text : texts) {
        Spelling s{text, {}, sizeof(sockaddr_in)};
        auto *sin = reinterpret_cast<sockaddr_in *>(&s.sa);
        sin->sin_family = AF_INET;
        sin->sin_port = htons(80);
        EXPECT_EQ(inet_aton(text.c_str(), &sin->sin_addr), 1) << text;
        EXPECT_EQ(std::memcmp(&sin->sin_addr, a, 4), 0) << text;
        out.push_back(s);
    }
    // IPv6 forms that carry it: mapped, SIIT, NAT64 (well-known and
    // local-use), 6to4.
    struct { const char *name; uint8_t pre[16]; int at; } wraps[] = {
        {"::ffff:", {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff}, 12},
        {"::ffff:0:", {0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0}, 12},
        {"64:ff9b::", {0, 0x64, 0xff, 0x9b}, 12},
        {"64:ff9b:1::", {0, 0x64, 0xff, 0x9b, 0, 1}, 12},
        {"2002:", {0x20, 0x02}, 2},
    };
    for (auto &w : wraps) {
        uint8_t b[16];
        std::memcpy(b, w.pre, 16);
        std::memcpy(b + w.at, a, 4);
        inet_ntop(AF_INET6, b, buf, sizeof(buf));
        add6(std::string(w.name) + " " + buf, b);
    }
    return out;
}

TEST(EgressSpellings, EveryMetadataEntryEverySpelling)
{
    std::vector<egress::Net> meta;
    ASSERT_TRUE(egress::group("metadata", &meta));
    // The entries the documentation promises (docs/security.md).
    for (const char *must : {"169.254.169.254", "fd00:ec2::254",
                             "169.254.170.2", "169.254.170.23",
                             "fd00:ec2::23", "168.63.129.16",
                             "169.254.0.23", "192.0.0.192",
                             "100.100.100.200", "169.254.42.42",
                             "fd00:42::42", "fd20:ce::254",
                             "fe80::a9fe:a9fe"}) {
        auto p = policyOf({});
        EXPECT_FALSE(allowed(p, must, 80)) << must;
    }
    auto open = policyOf({{"allow", "private"}, {"allow", "10.0.0.0/8"}});
    size_t checked = 0;
    for (const egress::Net &n : meta) {
        for (const Spelling &s : spellingsOf(n)) {
            std::string why;
            auto *sa = reinterpret_cast<const sockaddr *>(&s.sa);
            EXPECT_FALSE(egressAllowed(nullptr, sa, s.len, &why)) << s.text;
            EXPECT_FALSE(egressAllowed(&open, sa, s.len, &why)) << s.text;
            checked++;
        }
    }
    EXPECT_GE(checked, meta.size() * 3);
}

TEST(EgressSpellings, WrappedAddressesJudgedBothWays)
{
    auto p = policyOf({{"deny", "10.1.2.3"}});
    EXPECT_FALSE(allowed(p, "64:ff9b::a01:203", 80));
    EXPECT_FALSE(allowed(p, "64:ff9b::10.1.2.3", 80));
    EXPECT_FALSE(allowed(p, "2002:a01:203::1", 80));
    EXPECT_FALSE(allowed(p, "::ffff:0:10.1.2.3", 80));
    EXPECT_TRUE(allowed(p, "64:ff9b::a01:204", 80));
    // A rule on the IPv6 form still applies.
    auto q = policyOf({{"deny", "2002::/16"}});
    EXPECT_FALSE(allowed(q, "2002:a01:203::1", 80));
    EXPECT_TRUE(allowed(q, "2003::1", 80));
}

TEST(EgressSpellings, UnspecifiedIsLoopback)
{
    auto p = policyOf({{"deny", "loopback"}});
    EXPECT_FALSE(allowed(p, "0.0.0.0", 80));
    EXPECT_FALSE(allowed(p, "::", 80));
    EXPECT_FALSE(allowed(p, "::ffff:0.0.0.0", 80));
    EXPECT_FALSE(allowed(p, "127.0.0.1", 80));
    EXPECT_TRUE(allowed(p, "10.0.0.1", 80));
    auto q = policyOf({{"deny", "127.0.0.1"}});
    EXPECT_FALSE(allowed(q, "0.0.0.0", 80));
    auto r = policyOf({{"deny", "::1"}});
    EXPECT_FALSE(allowed(r, "::", 80));
    auto d = policyOf({{"allow", "10.0.0.0/8"}}, false);
    EXPECT_FALSE(allowed(d, "0.0.0.0", 80));
}

}  // namespace
}  // namespace luaguard
