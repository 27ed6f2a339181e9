#include "runtime/phase.hpp"

namespace luaguard {

const char *phaseName(Phase p)
{
    switch (p) {
    case Phase::Init: return "init";
    case Phase::InitWorker: return "init_worker";
    case Phase::Set: return "set";
    case Phase::ServerRewrite: return "server_rewrite";
    case Phase::Rewrite: return "rewrite";
    case Phase::Access: return "access";
    case Phase::Content: return "content";
    case Phase::Log: return "log";
    case Phase::HeaderFilter: return "header_filter";
    case Phase::BodyFilter: return "body_filter";
    case Phase::Timer: return "timer";
    case Phase::ExitWorker: return "exit_worker";
    case Phase::Balancer: return "balancer";
    case Phase::SslCert: return "ssl_cert";
    case Phase::SslSessionFetch: return "ssl_session_fetch";
    case Phase::SslSessionStore: return "ssl_session_store";
    case Phase::SslClientHello: return "ssl_client_hello";
    case Phase::None: break;
    }
    return "unknown";
}

const char *directiveName(Phase p)
{
    switch (p) {
    case Phase::Init: return "init_by_lua*";
    case Phase::InitWorker: return "init_worker_by_lua*";
    case Phase::Set: return "set_by_lua*";
    case Phase::ServerRewrite: return "server_rewrite_by_lua*";
    case Phase::Rewrite: return "rewrite_by_lua*";
    case Phase::Access: return "access_by_lua*";
    case Phase::Content: return "content_by_lua*";
    case Phase::Log: return "log_by_lua*";
    case Phase::HeaderFilter: return "header_filter_by_lua*";
    case Phase::BodyFilter: return "body_filter_by_lua*";
    case Phase::Timer: return "ngx.timer";
    case Phase::ExitWorker: return "exit_worker_by_lua*";
    case Phase::Balancer: return "balancer_by_lua*";
    case Phase::SslCert: return "ssl_certificate_by_lua*";
    case Phase::SslSessionFetch: return "ssl_session_fetch_by_lua*";
    case Phase::SslSessionStore: return "ssl_session_store_by_lua*";
    case Phase::SslClientHello: return "ssl_client_hello_by_lua*";
    case Phase::None: break;
    }
    return "unknown";
}

}  // namespace luaguard
