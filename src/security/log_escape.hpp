// Text that reaches the error log from Lua (ngx.log, print, error
// messages, tracebacks, names a script chose) carries request data.
// Control bytes are escaped so a value can never end the current log line
// and forge one of its own.
#pragma once

#include <cstddef>
#include <string>

#include "runtime/lua.hpp"

namespace luaguard {

// Appends `len` bytes of `s` to `out`, with CR, LF and the other control
// bytes (tab excepted) written as \r, \n or \xHH.
void appendLogEscaped(std::string &out, const char *s, size_t len);

// The stack of `co` from `level` on, in luaL_traceback's layout
// ("stack traceback:", then "\n\t" and one line per frame, the middle of
// a deep stack elided), with each chunk and function name escaped: every
// line but the first starts with a tab, whatever names the script gave
// (load(code, "=x\n..."), a function stored under a key with "\n").
std::string escapedTraceback(lua_State *co, int level);

// A traceback (escapedTraceback's or luaL_traceback's) made safe to log
// on lines of its own: control bytes escaped within each line, and every
// line but a leading "stack traceback:" starts with a tab, so none can
// pass for a log line.
std::string safeTraceback(const std::string &text);

}  // namespace luaguard
