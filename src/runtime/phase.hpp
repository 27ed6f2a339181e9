// The contexts Lua code runs in, with the names ngx.get_phase() returns and
// the error text lua-nginx-module uses when an API is used in the wrong one.
#pragma once

#include <cstdint>

namespace luaguard {

enum class Phase : uint32_t {
    None = 0,
    Init = 1 << 0,
    InitWorker = 1 << 1,
    Set = 1 << 2,
    ServerRewrite = 1 << 3,
    Rewrite = 1 << 4,
    Access = 1 << 5,
    Content = 1 << 6,
    Log = 1 << 7,
    HeaderFilter = 1 << 8,
    BodyFilter = 1 << 9,
    Timer = 1 << 10,
    ExitWorker = 1 << 11,
    Balancer = 1 << 12,
    SslCert = 1 << 13,
    SslSessionFetch = 1 << 14,
    SslSessionStore = 1 << 15,
    SslClientHello = 1 << 16,
};

using PhaseMask = uint32_t;

constexpr PhaseMask mask(Phase p) { return static_cast<PhaseMask>(p); }

template <typename... P>
constexpr PhaseMask mask(Phase p, P... rest)
{
    return static_cast<PhaseMask>(mask(p) | mask(rest...));
}

// Phases whose Lua runs in a coroutine that may yield to nginx.
constexpr PhaseMask kYieldable = mask(Phase::ServerRewrite, Phase::Rewrite,
                                      Phase::Access, Phase::Content,
                                      Phase::Timer, Phase::SslCert);

// Phases with a request (ngx.var, ngx.req.*).
constexpr PhaseMask kRequest = mask(Phase::Set, Phase::ServerRewrite,
                                    Phase::Rewrite, Phase::Access,
                                    Phase::Content, Phase::Log,
                                    Phase::HeaderFilter, Phase::BodyFilter,
                                    Phase::Balancer);

// Phases whose Lua runs on a placeholder request of luaguard's making:
// the request's own fields are "API disabled in the current context"
// there, as lua-nginx-module says.
constexpr PhaseMask kPlaceholder = mask(Phase::Timer, Phase::SslCert,
                                      Phase::SslSessionFetch,
                                      Phase::SslSessionStore,
                                      Phase::SslClientHello);

// Phases in which output may be produced with ngx.say and friends.
constexpr PhaseMask kOutput = mask(Phase::ServerRewrite, Phase::Rewrite,
                                   Phase::Access, Phase::Content);

const char *phaseName(Phase p);

// The directive family lua-nginx-module names in its messages
// ("ssl_certificate_by_lua*" for the phase ngx.get_phase() calls
// "ssl_cert").
const char *directiveName(Phase p);

}  // namespace luaguard
