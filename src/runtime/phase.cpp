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
    case Phase::None: break;
    }
    return "unknown";
}

}  // namespace luaguard
