#include "audit/rules.hpp"

#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstring>
#include <set>

namespace luaguard::audit {

namespace {

const std::vector<Rule> kRules = {
    {"lua-syntax", Severity::High, "Lua chunk does not compile",
     "LuaJIT's parser rejects the chunk. luaguard fails `nginx -t` for an "
     "inline block that does not compile; a *_by_lua_file script fails at "
     "its first request with a 500.",
     "Fix the syntax error at the reported line."},
    {"code-injection", Severity::High,
     "request data reaches load/loadstring/dofile",
     "Code built from ngx.var, request arguments, headers, bodies or cosocket "
     "replies runs with the rights of the handler: the client writes the "
     "Lua. With lua_sandbox off that is every capability of the worker "
     "(io, os.execute, ffi).",
     "Never compile request data. Select among fixed handlers with a table "
     "lookup (handlers[name]) instead of load/loadstring."},
    {"xss", Severity::High,
     "request data written into an HTML response unescaped",
     "ngx.say/ngx.print of request data lets a client inject markup and "
     "script into a page served from your origin. Reported high when the "
     "response is HTML (ngx.header.content_type or default_type says so), "
     "low otherwise (browsers that sniff content types may still render it).",
     "Escape with ngx.escape_html (luaguard; lua-nginx-module has none, any "
     "function named escape_html or html_escape is trusted), or "
     "ngx.escape_uri, or send a non-HTML Content-Type."},
    {"ssrf", Severity::High, "request data chooses an outgoing connection",
     "A cosocket connect/setpeername, ngx.socket.connect, an HTTP client's "
     "request_uri or ngx.location.capture whose target comes from the "
     "request lets a client make the server reach internal services or "
     "cloud metadata. luaguard's egress policy (lua_egress) still judges "
     "every cosocket connection.",
     "Map request values to a fixed list of targets; restrict what the "
     "location may reach with `lua_egress_default deny;` and `lua_egress "
     "allow ...` rules."},
    {"ssrf-proxy-pass", Severity::High,
     "proxy_pass target set from request data by Lua",
     "Lua sets the variable a *_pass directive computes its upstream from, "
     "with request data: the client picks the upstream.",
     "Set the variable from a fixed map of upstreams; luaguard judges such "
     "connections by the egress policy, so also deny by default there."},
    {"header-injection", Severity::Medium,
     "request data written to a response header",
     "A header value or name taken from the request can carry CR/LF "
     "(response splitting under lua-nginx-module; luaguard refuses control "
     "bytes) or attacker-chosen cookies and cache directives.",
     "Validate against a fixed pattern, or escape with ngx.escape_uri."},
    {"open-redirect", Severity::Medium,
     "ngx.redirect to a request-chosen target",
     "A redirect target taken from the request sends your users to any "
     "site with your origin's credibility (phishing), or to javascript: "
     "URIs in some clients.",
     "Redirect only to relative paths you check, or to a fixed allow-list "
     "of hosts."},
    {"log-injection", Severity::Low, "request data written to the error log",
     "ngx.log of raw request data lets a client forge log lines under "
     "lua-nginx-module (luaguard escapes control bytes in log messages), "
     "and floods logs.",
     "Log a bounded, escaped form (ngx.escape_uri(s):sub(1, 200))."},
    {"lua-file-variable-path", Severity::Medium,
     "*_by_lua_file path built from variables, no lua_file_root",
     "The client chooses which script runs. lua-nginx-module lets the path "
     "leave any directory; luaguard confines it to nginx's prefix when "
     "lua_file_root is absent, which is usually much more than the scripts.",
     "Set `lua_file_root /path/to/handlers;` in the location, or map the "
     "variable to a fixed set of file names."},
    {"lua-file-missing", Severity::Low, "*_by_lua_file script not found",
     "The script does not exist under the prefix: the location answers 500, "
     "and it was not audited.",
     "Fix the path, or pass the nginx prefix with -p."},
    {"code-cache-off", Severity::Medium, "lua_code_cache off",
     "Scripts are recompiled for every request: a development setting that "
     "costs CPU per request and picks up any change on disk immediately "
     "(a write to the script directory becomes code at once).",
     "Remove `lua_code_cache off;` in production."},
    {"package-path-relative", Severity::Medium,
     "relative lua_package_path/cpath entry",
     "A relative entry is resolved against the worker's working directory, "
     "not the configuration: require may load a module from wherever nginx "
     "was started.",
     "Use absolute paths, or $prefix/..."},
    {"package-path-writable", Severity::High,
     "world-writable lua_package_path/cpath directory",
     "Anyone on the host can drop a module (or a C library for cpath) "
     "that require then loads into the workers.",
     "Keep module directories owned by root and not writable by others "
     "(chmod o-w)."},
    {"sandbox-off", Severity::Medium, "lua_sandbox off",
     "Handlers get lua-nginx-module's behaviour: globals shared between "
     "requests, writable library tables, bytecode loading, package.loadlib.",
     "Use `lua_sandbox default;` (or strict for tenant code) and grant "
     "what a handler needs with +cap."},
    {"sandbox-off-request-code", Severity::High,
     "lua_sandbox off where request data becomes code",
     "The location compiles request-derived code and runs it with every "
     "capability (io, os, ffi, bytecode): remote code execution in the "
     "worker.",
     "Remove the load of request data; at least use `lua_sandbox strict;` "
     "there."},
    {"egress-no-rule", Severity::Medium, "cosockets used with no egress rule",
     "The location opens outgoing connections and every destination but "
     "the cloud metadata addresses is allowed: a bug or an injected target "
     "reaches internal services.",
     "Add `lua_egress_default deny;` and `lua_egress allow TARGET "
     "port=...;` for what the handler needs."},
    {"egress-default-allow", Severity::Medium,
     "lua_egress_default allow with cosockets",
     "The egress rules only deny what they name: everything else the "
     "handler reaches is allowed.",
     "Write `lua_egress_default deny;` and allow rules."},
    {"egress-metadata", Severity::High,
     "lua_egress allows the cloud metadata service",
     "Lua in the location may reach instance metadata and credential "
     "endpoints (169.254.169.254 ...), the usual prize of an SSRF.",
     "Remove `allow metadata` (or the metadata address) unless the handler "
     "truly needs the instance credentials."},
    {"shared-dict-everywhere", Severity::Low,
     "shared dict reachable from every location",
     "Every location that runs Lua can read and overwrite this dictionary "
     "(sessions, rate-limit counters, cached tokens).",
     "Use `lua_sandbox strict +shared=NAME` (or `default -shared` plus "
     "+shared=NAME) where the dictionary is needed."},
    {"budget-off", Severity::Medium, "lua_budget_* off",
     "A runaway loop, a regex blow-up or a memory bomb in the location is "
     "no longer stopped: one request can hold a worker or its memory.",
     "Keep the budget; raise it for the location that needs more."},
    {"file-check-writable-off", Severity::Medium, "lua_file_check_writable off",
     "Scripts writable by other users (or in directories they can write) "
     "are run: a local user can replace a handler.",
     "Fix the permissions and keep the check (world, or group)."},
    {"client-abort", Severity::Low,
     "long-running handler without lua_check_client_abort",
     "A handler that sleeps or reads in a loop keeps running after the "
     "client left, holding a connection slot and its budgets.",
     "Add `lua_check_client_abort on;` and an ngx.on_abort handler."},
    {"luacheck", Severity::Low, "luacheck warning",
     "A warning of luacheck (run with nginx's globals): undefined globals, "
     "unused variables, shadowing.",
     "See luacheck's documentation for the warning code."},
    {"config-error", Severity::Medium, "configuration cannot be read",
     "A file or include could not be read or does not parse: the audit "
     "saw only part of the configuration.",
     "Check the path (and -p/-D) and run nginx -t."},
};


std::string jsonEscape(const std::string &s)
{
    std::string out;
    for (unsigned char c : s) {
        switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
            if (c < 0x20) {
                char buf[8];
                snprintf(buf, sizeof buf, "\\u%04x", c);
                out += buf;
            } else {
                out += static_cast<char>(c);
            }
        }
    }
    return out;
}


const char *sarifLevel(Severity s)
{
    switch (s) {
    case Severity::High: return "error";
    case Severity::Medium: return "warning";
    default: return "note";
    }
}


const char *securitySeverity(Severity s)
{
    switch (s) {
    case Severity::High: return "8.0";
    case Severity::Medium: return "5.0";
    case Severity::Low: return "3.0";
    default: return "1.0";
    }
}


std::string percentEncode(const std::string &path)
{
    std::string out;
    for (unsigned char c : path) {
        if (isalnum(c) || strchr("/-._~", c)) {
            out += static_cast<char>(c);
        } else {
            char buf[4];
            snprintf(buf, sizeof buf, "%%%02X", c);
            out += buf;
        }
    }
    return out;
}


std::string uriOf(const std::string &path)
{
    char cwd[PATH_MAX];
    if (!path.empty() && path[0] == '/' && getcwd(cwd, sizeof cwd)) {
        std::string base = std::string(cwd) + "/";
        if (path.compare(0, base.size(), base) == 0) {
            return percentEncode(path.substr(base.size()));
        }
        return "file://" + percentEncode(path);
    }
    return percentEncode(path);
}

}  // namespace


const std::vector<Rule> &rules()
{
    return kRules;
}


const Rule *findRule(const std::string &id)
{
    for (const auto &r : kRules) {
        if (id == r.id) {
            return &r;
        }
    }
    return nullptr;
}


const char *severityName(Severity s)
{
    switch (s) {
    case Severity::High: return "high";
    case Severity::Medium: return "medium";
    case Severity::Low: return "low";
    default: return "info";
    }
}


bool parseSeverity(const std::string &s, Severity *out)
{
    for (auto sev : {Severity::Info, Severity::Low, Severity::Medium,
                     Severity::High})
    {
        if (s == severityName(sev)) {
            *out = sev;
            return true;
        }
    }
    return false;
}


std::string formatText(const std::vector<Finding> &findings)
{
    std::string out;
    for (const auto &f : findings) {
        const Rule *r = findRule(f.rule);
        out += f.file + ":" + std::to_string(f.line) + ": "
               + severityName(f.severity) + " " + f.rule + ": " + f.message
               + "\n";
        if (r) {
            out += std::string("    fix: ") + r->fix + "\n";
        }
    }
    return out;
}


std::string formatSarif(const std::vector<Finding> &findings)
{
    std::string out =
        "{\n  \"$schema\": \"https://json.schemastore.org/sarif-2.1.0.json\",\n"
        "  \"version\": \"2.1.0\",\n  \"runs\": [\n    {\n"
        "      \"tool\": {\n        \"driver\": {\n"
        "          \"name\": \"luaguard-audit\",\n"
        "          \"version\": \"0.1.0\",\n"
        "          \"rules\": [\n";
    for (size_t i = 0; i < kRules.size(); i++) {
        const Rule &r = kRules[i];
        out += std::string("            {\"id\": \"") + r.id
               + "\", \"name\": \"" + r.id
               + "\", \"shortDescription\": {\"text\": \""
               + jsonEscape(r.title) + "\"}, \"fullDescription\": {\"text\": \""
               + jsonEscape(r.why) + "\"}, \"help\": {\"text\": \""
               + jsonEscape(r.fix)
               + "\"}, \"defaultConfiguration\": {\"level\": \""
               + sarifLevel(r.severity)
               + "\"}, \"properties\": {\"security-severity\": \""
               + securitySeverity(r.severity) + "\"}}"
               + (i + 1 < kRules.size() ? ",\n" : "\n");
    }
    out += "          ]\n        }\n      },\n      \"results\": [\n";
    for (size_t i = 0; i < findings.size(); i++) {
        const Finding &f = findings[i];
        size_t index = 0;
        for (size_t k = 0; k < kRules.size(); k++) {
            if (f.rule == kRules[k].id) {
                index = k;
            }
        }
        out += "        {\"ruleId\": \"" + f.rule + "\", \"ruleIndex\": "
               + std::to_string(index) + ", \"level\": \""
               + sarifLevel(f.severity) + "\", \"message\": {\"text\": \""
               + jsonEscape(f.message)
               + "\"}, \"locations\": [{\"physicalLocation\": "
                 "{\"artifactLocation\": {\"uri\": \""
               + jsonEscape(uriOf(f.file)) + "\"}";
        if (f.line > 0) {
            out += ", \"region\": {\"startLine\": " + std::to_string(f.line)
                   + "}";
        }
        out += "}}], \"properties\": {\"severity\": \""
               + std::string(severityName(f.severity)) + "\"}}"
               + (i + 1 < findings.size() ? ",\n" : "\n");
    }
    out += "      ]\n    }\n  ]\n}\n";
    return out;
}


std::string explain(const Rule &r)
{
    return std::string(r.id) + " (" + severityName(r.severity) + "): "
           + r.title + "\n\nWhy it matters: " + r.why + "\n\nFix: " + r.fix
           + "\n";
}

}  // namespace luaguard::audit
