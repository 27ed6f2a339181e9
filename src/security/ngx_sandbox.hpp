// nginx side of the sandbox: the `lua_sandbox` directive and the hooks that
// tell src/security/sandbox.cpp which request is running.
#pragma once

#include <string>

#include "ngx/module.hpp"
#include "security/sandbox.hpp"

namespace luaguard::sandbox {

// `lua_sandbox off | default | strict [+cap | -cap | +shared=a,b ...]`
// in http, server and location; stores a Policy* at cmd->offset.
char *setDirective(ngx_conf_t *cf, ngx_command_t *cmd, void *conf);

// Sets the hooks and installs the Lua half in a new VM.
bool installNgx(lua_State *L, std::string *err);

// The policy of a location (the default one when nothing is configured).
inline const Policy *policyOf(const LocConf *llcf)
{
    return llcf && llcf->sandbox ? llcf->sandbox : &defaultPolicy();
}

}  // namespace luaguard::sandbox
