// Text that reaches the error log from Lua (ngx.log, print, error
// messages) carries request data. Control bytes are escaped so a value can
// never end the current log line and forge one of its own.
#pragma once

#include <cstddef>
#include <string>

namespace luaguard {

// Appends `len` bytes of `s` to `out`, with CR, LF and the other control
// bytes (tab excepted) written as \r, \n or \xHH.
void appendLogEscaped(std::string &out, const char *s, size_t len);

}  // namespace luaguard
