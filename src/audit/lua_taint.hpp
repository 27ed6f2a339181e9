// luaguard-audit: the Lua side. A tokenizer and a small evaluating parser
// over Lua 5.1 syntax (no AST kept: each expression yields an abstract
// value) that follows request data from its sources (ngx.var, ngx.req.*,
// cosocket replies) through locals, aliases, tables, concatenation and
// local functions to the sinks that matter in a request handler.
// Syntax errors are LuaJIT's business (luaL_loadbuffer in main.cpp); this
// pass assumes the chunk compiles and never loops on one that does not.
#pragma once

#include <string>
#include <vector>

namespace luaguard::audit {

struct LuaFinding {
    std::string rule;      // code-injection, xss, ssrf, ...
    int line = 0;          // line in the chunk
    std::string message;
};

struct LuaFacts {
    std::vector<LuaFinding> findings;
    int cosocket_line = 0;      // first outgoing cosocket use
    int sleep_loop_line = 0;    // ngx.sleep or receive inside a loop
    int content_type_line = 0;  // ngx.header.content_type = "..."
    std::string content_type;   // its literal value, "" when unknown
    // ngx.var.NAME = request data (NAME, line): steers proxy_pass $NAME.
    std::vector<std::pair<std::string, int>> tainted_var_writes;
    std::vector<std::string> requires;
    // ngx.ctx.NAME = request data: other phases of the request read it.
    std::vector<std::string> tainted_ctx;
    bool returns_tainted = false;  // the chunk returns request data
};

struct LuaOptions {
    bool args_tainted = false;  // set_by_lua with $variables as ngx.arg
    // ngx.ctx fields another chunk of the request fills with request
    // data ("?" for a computed key).
    std::vector<std::string> tainted_ctx;
};

LuaFacts analyzeLua(const std::string &code, const LuaOptions &opts);

}  // namespace luaguard::audit
