// The C API of ngx_http_lua_api.h, luaguard's side.
#pragma once

#include "ngx/module.hpp"

namespace luaguard::capi {

// What ngx_http_lua_add_package_preload registered, for a VM being set up
// (every VM of the configuration gets it).
void applyPreloads(MainConf *mcf, lua_State *L);

}  // namespace luaguard::capi
