#include "security/ngx_sandbox.hpp"

#include <new>
#include <vector>

#include "ngx/glue.hpp"

namespace luaguard::sandbox {

namespace {

// Code that runs with no run of ours on the stack (a __gc finalizer called
// by a collection that nginx-side glue triggered, for example) belongs to
// nobody: it gets no capability at all, never the trust of init code.
const Policy &denyAll()
{
    static const Policy p = [] {
        Policy d;
        d.allowed = 0;
        d.strict = true;
        d.label = "(no running request: deny-all)";
        return d;
    }();
    return p;
}

const Policy *runningPolicy()
{
    Run *run = g_run;
    if (run && run->ctx) {
        return policyOf(run->ctx->llcf);
    }
    if (run && (run->phase == Phase::Init || run->phase == Phase::InitWorker
                || run->phase == Phase::ExitWorker))
    {
        return nullptr;  // the configuration's own code: trusted
    }
    return &denyAll();
}

bool pushRunningEnv(lua_State *L)
{
    Run *run = g_run;
    if (run && run->ctx && glue::pushRequestEnv(L, run->ctx)) {
        run->ctx->env_escaped = true;
        return true;
    }
    return false;
}

void runningEnvEscapes()
{
    Run *run = g_run;
    if (run && run->ctx) {
        run->ctx->env_escaped = true;
    }
}

void destroyPolicy(void *data)
{
    static_cast<Policy *>(data)->~Policy();
}

}  // namespace

char *setDirective(ngx_conf_t *cf, ngx_command_t *cmd, void *conf)
{
    auto **slot = reinterpret_cast<const Policy **>(static_cast<char *>(conf)
                                                    + cmd->offset);
    if (*slot != nullptr) {
        return const_cast<char *>("is duplicate");
    }
    auto *args = static_cast<ngx_str_t *>(cf->args->elts);
    std::vector<std::string> words;
    for (ngx_uint_t i = 1; i < cf->args->nelts; i++) {
        words.emplace_back(reinterpret_cast<char *>(args[i].data),
                           args[i].len);
    }

    Policy parsed;
    std::string err;
    if (!parse(words, &parsed, &err)) {
        ngx_conf_log_error(NGX_LOG_EMERG, cf, 0, "invalid lua_sandbox: %s",
                           err.c_str());
        return static_cast<char *>(NGX_CONF_ERROR);
    }

    ngx_pool_cleanup_t *cln = ngx_pool_cleanup_add(cf->pool, 0);
    void *mem = ngx_palloc(cf->pool, sizeof(Policy));
    if (cln == nullptr || mem == nullptr) {
        return static_cast<char *>(NGX_CONF_ERROR);
    }
    auto *p = new (mem) Policy(std::move(parsed));
    cln->handler = destroyPolicy;
    cln->data = p;
    *slot = p;
    return NGX_CONF_OK;
}

bool installNgx(lua_State *L, std::string *err)
{
    setHooks(runningPolicy, pushRunningEnv, runningEnvEscapes);
    return install(L, err);
}

}  // namespace luaguard::sandbox
