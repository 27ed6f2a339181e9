// luaguard-audit: a static checker for nginx configurations and the Lua
// they run. docs/audit.md lists the rules.

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <set>
#include <tuple>

#include "audit/config.hpp"
#include "audit/lua_taint.hpp"
#include "audit/rules.hpp"
#include "runtime/lua.hpp"
#include "runtime/package_path.hpp"

namespace luaguard::audit {

namespace {

struct Options {
    std::string config;
    std::string format = "text";
    Severity fail_on = Severity::High;
    bool fail_never = false;
    bool luacheck = true;
    std::string luacheck_bin = "luacheck";
};

class Auditor {
 public:
    Auditor(Config &cfg, const Options &opts) : cfg_(cfg), opts_(opts) {}

    std::vector<Finding> run()
    {
        for (const auto &p : cfg_.problems) {
            add("config-error", p.file, p.line, p.message);
        }
        L_ = luaL_newstate();
        // By index: modules found by require are appended as we go.
        for (size_t i = 0; i < cfg_.chunks.size(); i++) {
            chunk(*cfg_.chunks[i]);
        }
        // ngx.ctx carries data between the phases of a request: chunks
        // that read what another filled are looked at again with it.
        if (!ctx_.empty()) {
            second_pass_ = true;
            for (size_t i = 0; i < cfg_.chunks.size(); i++) {
                chunk(*cfg_.chunks[i]);
            }
        }
        lua_close(L_);
        settings();
        packagePaths();
        sharedDicts();
        proxyPass();
        for (auto &e : pending_) {
            std::string msg = e.second.message;
            if (!e.second.locations.empty()) {
                msg += " (";
                for (size_t i = 0; i < e.second.locations.size(); i++) {
                    msg += (i ? "; " : "") + e.second.locations[i];
                }
                msg += ")";
            }
            add(e.first.first, e.first.second->file, e.first.second->line,
                msg, e.second.severity);
        }
        std::sort(out_.begin(), out_.end(),
                  [](const Finding &a, const Finding &b) {
                      return std::tie(a.file, a.line, a.rule)
                             < std::tie(b.file, b.line, b.rule);
                  });
        return out_;
    }

 private:
    struct Pending {
        std::string message;
        Severity severity;
        std::vector<std::string> locations;
    };

    Config &cfg_;
    const Options &opts_;
    lua_State *L_ = nullptr;
    std::vector<Finding> out_;
    std::set<std::tuple<std::string, std::string, int>> seen_;
    // Findings about one directive, listing the locations it affects.
    std::map<std::pair<std::string, const Directive *>, Pending> pending_;
    std::set<const Scope *> cosocket_scopes_;  // egress judged already
    std::set<const Scope *> request_code_;
    std::set<std::string> tainted_vars_;
    std::string init_globals_;   // for luacheck: set by init handlers
    std::set<std::string> modules_;  // audited already
    std::map<const Scope *, std::vector<std::string>> ctx_;
    bool second_pass_ = false;

    void add(const std::string &rule, const std::string &file, int line,
             const std::string &msg, int severity = -1)
    {
        if (!seen_.insert({rule, file, line}).second) {
            return;
        }
        const Rule *r = findRule(rule);
        Severity sev = severity >= 0 ? static_cast<Severity>(severity)
                                     : (r ? r->severity : Severity::Low);
        out_.push_back({rule, sev, file, line, msg});
    }

    void add(const std::string &rule, const std::string &file, int line,
             const std::string &msg, Severity sev)
    {
        add(rule, file, line, msg, static_cast<int>(sev));
    }

    void pend(const std::string &rule, const Directive *d,
              const std::string &msg, const std::string &location)
    {
        auto &p = pending_[{rule, d}];
        if (p.message.empty()) {
            p.message = msg;
            p.severity = findRule(rule)->severity;
        }
        affects(&p, location);
    }

    static void affects(Pending *p, const std::string &location)
    {
        if (!location.empty()
            && std::find(p->locations.begin(), p->locations.end(), location)
                   == p->locations.end())
        {
            p->locations.push_back(location);
        }
    }

    // LuaJIT's own parser decides what compiles.
    bool syntax(const Chunk &c)
    {
        if (luaL_loadbuffer(L_, c.code.data(), c.code.size(), "=chunk") == 0) {
            lua_pop(L_, 1);
            return true;
        }
        std::string err = lua_tostring(L_, -1);
        lua_pop(L_, 1);
        int line = 1;
        if (err.compare(0, 6, "chunk:") == 0) {
            line = atoi(err.c_str() + 6);
            size_t colon = err.find(':', 6);
            if (colon != std::string::npos) {
                err = err.substr(colon + 1);
                if (!err.empty() && err[0] == ' ') {
                    err.erase(0, 1);
                }
            }
        }
        add("lua-syntax", c.file, c.line + line - 1,
            c.directive + ": " + err);
        return false;
    }

    void chunk(Chunk &c)
    {
        const Settings &s = c.scope->settings;
        if (!c.loaded) {
            if (hasVariable(c.path)) {
                // The request picks the script: request-derived code.
                request_code_.insert(c.scope.get());
                if (!s.get("lua_file_root")) {
                    add("lua-file-variable-path", c.file, c.line,
                        c.directive + " " + c.path + " in " + c.location
                            + ": the request chooses the script and no "
                              "lua_file_root confines it");
                }
            } else {
                add("lua-file-missing", c.file, c.line,
                    c.directive + " " + c.path + " not found under the "
                                                 "prefix " + cfg_.prefix);
            }
            return;
        }
        if (!syntax(c)) {
            return;
        }
        LuaOptions lo;
        lo.args_tainted = c.args_from_vars;
        if (second_pass_) {
            // Fields set in this place or in a place enclosing it (a
            // server's rewrite_by_lua runs for its locations).
            for (const Scope *sc = c.scope.get(); sc; sc = sc->parent.get()) {
                auto it = ctx_.find(sc);
                if (it != ctx_.end()) {
                    lo.tainted_ctx.insert(lo.tainted_ctx.end(),
                                          it->second.begin(),
                                          it->second.end());
                }
            }
            for (const auto &e : ctx_) {
                // A location's fields are seen by the server-level chunks
                // that run for it too.
                for (const Scope *sc = e.first; sc; sc = sc->parent.get()) {
                    if (sc == c.scope.get()) {
                        lo.tainted_ctx.insert(lo.tainted_ctx.end(),
                                              e.second.begin(),
                                              e.second.end());
                        break;
                    }
                }
            }
            if (lo.tainted_ctx.empty()) {
                return;
            }
        }
        LuaFacts f = analyzeLua(c.code, lo);
        auto at = [&](int l) { return c.line + l - 1; };
        std::string ct = f.content_type;
        bool explicit_type = f.content_type_line && !ct.empty();
        bool html = explicit_type
                        ? ct.find("html") != std::string::npos
                        : s.value("default_type", "text/plain").find("html")
                              != std::string::npos;
        for (const auto &lf : f.findings) {
            Severity sev = findRule(lf.rule)->severity;
            std::string msg = lf.message;
            if (lf.rule == "xss") {
                if (explicit_type && !html) {
                    continue;  // the script says what it sends: not HTML
                }
                if (!html) {
                    sev = Severity::Low;
                    msg += " (response is " + s.value("default_type",
                                                      "text/plain")
                           + ", not HTML)";
                }
            }
            if (lf.rule == "code-injection") {
                request_code_.insert(c.scope.get());
            }
            add(lf.rule, c.file, at(lf.line), msg + " [" + c.location + "]",
                sev);
        }
        for (const auto &k : f.tainted_ctx) {
            ctx_[c.scope.get()].push_back(k);
        }
        if (second_pass_) {
            return;  // the rest was recorded by the first pass
        }
        for (const auto &w : f.tainted_var_writes) {
            tainted_vars_.insert(w.first);
        }
        // set_by_lua* $var: what the chunk returns goes to $var.
        if (c.phase == "set" && f.returns_tainted && !c.where->args.empty()
            && c.where->args[0].size() > 1)
        {
            tainted_vars_.insert(c.where->args[0].substr(1));
        }
        if (f.cosocket_line && cosocket_scopes_.insert(c.scope.get()).second) {
            cosocket(c, at(f.cosocket_line));
        }
        if (f.sleep_loop_line
            && (c.phase == "content" || c.phase == "access"
                || c.phase == "rewrite")
            && s.value("lua_check_client_abort", "off") == "off")
        {
            add("client-abort", c.file, at(f.sleep_loop_line),
                c.directive + " waits in a loop in " + c.location
                    + " and lua_check_client_abort is off");
        }
        if (opts_.luacheck) {
            luacheck(c);
        }
        for (const auto &name : f.requires) {
            module(name, c);
        }
    }

    // A module the chunk requires from the configuration's
    // lua_package_path (LuaJIT's default path, ";;", is the system's
    // libraries: not audited) is audited as one more chunk, in the place
    // of the first chunk that requires it.
    void module(const std::string &name, const Chunk &by)
    {
        std::string path;
        for (const Directive *d : cfg_.http_directives) {
            if (d->name != "lua_package_path" || d->args.empty()) {
                continue;
            }
            std::string rel = name;
            std::replace(rel.begin(), rel.end(), '.', '/');
            std::string v = expandPackagePath(d->args[0], "", cfg_.prefix)
                            + ";";
            for (size_t start = 0, semi; path.empty()
                 && (semi = v.find(';', start)) != std::string::npos;
                 start = semi + 1)
            {
                std::string e = v.substr(start, semi - start);
                if (e.empty()) {
                    continue;
                }
                for (size_t q; (q = e.find('?')) != std::string::npos;) {
                    e.replace(q, 1, rel);
                }
                if (e[0] != '/') {
                    e = cfg_.prefix + "/" + e;
                }
                if (access(e.c_str(), R_OK) == 0) {
                    path = e;
                }
            }
        }
        if (path.empty() || !modules_.insert(path).second) {
            return;
        }
        auto m = std::make_unique<Chunk>();
        m->directive = "require \"" + name + "\"";
        m->phase = "module";
        m->kind = "module";
        m->file = path;
        m->line = 1;
        m->scope = by.scope;
        m->location = "module " + name + ", required in " + by.location;
        bool ok = false;
        m->code = readFile(path, &ok);
        if (ok) {
            cfg_.chunks.push_back(std::move(m));
        }
    }

    void cosocket(const Chunk &c, int line)
    {
        const Settings &s = c.scope->settings;
        if (s.value("lua_egress_default", "allow") != "allow") {
            return;
        }
        if (s.egress_rules.empty()) {
            add("egress-no-rule", c.file, line,
                "cosockets opened in " + c.location
                    + " with no lua_egress rule: any destination but the "
                      "metadata addresses is reachable");
            return;
        }
        const Directive *d = s.get("lua_egress_default");
        pend("egress-default-allow", d ? d : s.egress_rules.front(),
             "cosockets are used and destinations no lua_egress rule names "
             "are allowed", c.location);
    }

    static bool metadataTarget(const std::string &a)
    {
        static const std::set<std::string> addrs = {
            "metadata", "169.254.169.254", "169.254.169.254/32",
            "169.254.170.2", "169.254.170.2/32", "100.100.100.200",
            "fd00:ec2::254", "169.254.0.23", "192.0.0.192",
            "169.254.42.42", "fd20:ce::254", "fe80::a9fe:a9fe"};
        return addrs.count(a) > 0;
    }

    // Directives that switch a protection off, with the locations running
    // Lua under them.
    void settings()
    {
        std::set<const Scope *> lua_scopes;
        for (const auto &c : cfg_.chunks) {
            lua_scopes.insert(c->scope.get());
        }
        // A sandbox that is off where request data becomes code gets the
        // stronger rule instead.
        std::set<const Directive *> hot;
        for (const Scope *scope : request_code_) {
            hot.insert(scope->settings.get("lua_sandbox"));
        }
        for (const auto &scope : cfg_.scopes) {
            for (const Directive *d : scope->directives) {
                std::string a0 = d->args.empty() ? "" : d->args[0];
                if (d->name.compare(0, 11, "lua_budget_") == 0 && a0 == "off") {
                    pend("budget-off", d, d->name + " off in " + scope->label
                         + ": runaway loops and memory bombs run unchecked",
                         "");
                } else if (d->name == "lua_file_check_writable"
                           && a0 == "off")
                {
                    pend("file-check-writable-off", d,
                         "lua_file_check_writable off in " + scope->label
                             + ": scripts others can write are run", "");
                } else if (d->name == "lua_code_cache" && a0 == "off") {
                    pend("code-cache-off", d, "lua_code_cache off in "
                         + scope->label + ": every request recompiles the "
                         "scripts from disk", "");
                } else if (d->name == "lua_egress" && a0 == "allow") {
                    for (size_t i = 1; i < d->args.size(); i++) {
                        if (metadataTarget(d->args[i])) {
                            pend("egress-metadata", d, "lua_egress allow "
                                 + d->args[i] + " in " + scope->label
                                 + ": Lua may reach instance credentials", "");
                        }
                    }
                } else if (d->name == "lua_sandbox" && a0 == "off"
                           && !hot.count(d))
                {
                    pend("sandbox-off", d, "lua_sandbox off in " + scope->label
                         + ": shared globals, writable libraries, bytecode and "
                           "package.loadlib", "");
                }
            }
        }
        // Which locations inherit them.
        for (const Scope *scope : lua_scopes) {
            const Settings &s = scope->settings;
            for (auto &e : pending_) {
                const Directive *d = e.first.second;
                const Directive *eff = s.get(d->name);
                bool inherits = eff == d;
                if (d->name == "lua_egress") {
                    inherits = std::find(s.egress_rules.begin(),
                                         s.egress_rules.end(), d)
                               != s.egress_rules.end();
                }
                if (inherits) {
                    affects(&e.second, scope->label);
                }
            }
            const Directive *sb = s.get("lua_sandbox");
            if (sb && !sb->args.empty() && sb->args[0] == "off"
                && request_code_.count(scope))
            {
                pend("sandbox-off-request-code", sb,
                     "lua_sandbox off where request data is compiled as code",
                     scope->label);
            }
        }
    }

    void packagePaths()
    {
        for (const Directive *d : cfg_.http_directives) {
            if ((d->name != "lua_package_path"
                 && d->name != "lua_package_cpath") || d->args.empty())
            {
                continue;
            }
            // The module's own expansion ($prefix, ${prefix}); ";;",
            // LuaJIT's default path, becomes an empty entry.
            std::string v = expandPackagePath(d->args[0], "", cfg_.prefix);
            size_t start = 0;
            while (start <= v.size()) {
                size_t semi = v.find(';', start);
                std::string e = v.substr(start, semi == std::string::npos
                                                     ? std::string::npos
                                                     : semi - start);
                start = semi == std::string::npos ? v.size() + 1 : semi + 1;
                if (e.empty()) {
                    continue;  // ";;": LuaJIT's default path
                }
                if (e[0] != '/') {
                    add("package-path-relative", d->file, d->line,
                        d->name + " entry \"" + e + "\" is relative to the "
                        "worker's working directory");
                    continue;
                }
                std::string dir = e.substr(0, e.find('?'));
                dir = dir.substr(0, dir.rfind('/'));
                // The directory itself, and any ancestor without the
                // sticky bit, must not be writable by others.
                std::string path = dir;
                bool self = true;
                while (!path.empty()) {
                    struct stat st {};
                    if (stat(path.c_str(), &st) == 0
                        && (st.st_mode & S_IWOTH)
                        && (self || !(st.st_mode & S_ISVTX)))
                    {
                        add("package-path-writable", d->file, d->line,
                            d->name + " entry \"" + e + "\": " + path
                                + " is writable by every user");
                        break;
                    }
                    self = false;
                    size_t slash = path.rfind('/');
                    path = slash == std::string::npos ? ""
                                                      : path.substr(0, slash);
                }
            }
        }
    }

    static bool grantsShared(const Settings &s, const std::string &dict)
    {
        const Directive *d = s.get("lua_sandbox");
        std::string profile = d && !d->args.empty() ? d->args[0] : "default";
        bool all = profile != "strict";
        bool listed = false;
        if (d) {
            for (size_t i = 1; i < d->args.size(); i++) {
                const std::string &a = d->args[i];
                if (a == "-shared") {
                    all = false;
                } else if (a == "+shared") {
                    all = true;
                } else if (a.compare(0, 8, "+shared=") == 0) {
                    all = false;
                    std::string list = "," + a.substr(8) + ",";
                    listed = list.find("," + dict + ",") != std::string::npos;
                }
            }
        }
        return all || listed;
    }

    void sharedDicts()
    {
        std::vector<const Scope *> handlers;
        for (const auto &scope : cfg_.scopes) {
            bool runs = false;
            for (const Chunk *c : scope->chunks) {
                runs = runs || (c->phase != "init" && c->phase != "init_worker"
                                && c->phase != "exit_worker");
            }
            if (runs && scope->kind == "location") {
                handlers.push_back(scope.get());
            }
        }
        if (handlers.size() < 2) {
            return;
        }
        for (const Directive *d : cfg_.http_directives) {
            if (d->name != "lua_shared_dict" || d->args.empty()) {
                continue;
            }
            bool everywhere = true;
            for (const Scope *s : handlers) {
                everywhere = everywhere
                             && grantsShared(s->settings, d->args[0]);
            }
            if (everywhere) {
                add("shared-dict-everywhere", d->file, d->line,
                    "ngx.shared." + d->args[0] + " is readable and writable "
                    "from all " + std::to_string(handlers.size())
                    + " locations that run Lua");
            }
        }
    }

    void proxyPass()
    {
        static const std::set<std::string> passes = {
            "proxy_pass", "fastcgi_pass", "scgi_pass", "uwsgi_pass",
            "grpc_pass"};
        for (const auto &scope : cfg_.scopes) {
            for (const Directive *d : scope->directives) {
                if (!passes.count(d->name) || d->args.empty()) {
                    continue;
                }
                for (const auto &v : tainted_vars_) {
                    const std::string &a = d->args[0];
                    size_t at = a.find("$" + v);
                    size_t end = at + v.size() + 1;
                    if (at != std::string::npos
                        && (end >= a.size()
                            || !(isalnum(static_cast<unsigned char>(a[end]))
                                 || a[end] == '_')))
                    {
                        add("ssrf-proxy-pass", d->file, d->line,
                            d->name + " " + a + " in " + scope->label
                                + ": Lua sets $" + v + " from request data");
                    }
                }
            }
        }
    }

    // luacheck knows Lua hygiene; we tell it nginx's globals and map its
    // lines back to the configuration.
    void luacheck(const Chunk &c)
    {
        static int available = -1;
        if (available < 0) {
            std::string probe = opts_.luacheck_bin
                                + " --version >/dev/null 2>&1";
            available = system(probe.c_str()) == 0;
        }
        if (!available) {
            return;
        }
        char tmpl[] = "/tmp/luaguard-audit-XXXXXX";
        int fd = mkstemp(tmpl);
        if (fd < 0) {
            return;
        }
        ssize_t wr = write(fd, c.code.data(), c.code.size());
        close(fd);
        if (wr != static_cast<ssize_t>(c.code.size())) {
            unlink(tmpl);
            return;
        }
        std::string cmd = opts_.luacheck_bin
            + " --formatter plain --codes --no-color --std luajit"
              " --ignore 61 --no-max-line-length --globals ngx ndk"
            + init_globals_ + " -- "
            + std::string(tmpl) + " 2>/dev/null";
        FILE *pipe = popen(cmd.c_str(), "r");
        if (pipe) {
            char buf[4096];
            std::string prefix = std::string(tmpl) + ":";
            while (fgets(buf, sizeof buf, pipe)) {
                std::string l(buf);
                if (l.compare(0, prefix.size(), prefix) != 0) {
                    continue;
                }
                l = l.substr(prefix.size());
                int line = atoi(l.c_str());
                size_t paren = l.find("(");
                if (line <= 0 || paren == std::string::npos
                    || l.compare(paren, 2, "(E") == 0)
                {
                    continue;  // syntax errors are LuaJIT's to report
                }
                std::string msg = l.substr(paren + 1);
                while (!msg.empty() && (msg.back() == '\n')) {
                    msg.pop_back();
                }
                size_t close = msg.find(')');
                if (close != std::string::npos) {
                    msg = msg.substr(0, close) + ":" + msg.substr(close + 1);
                }
                // Globals an init handler sets are the documented way to
                // share modules with the handlers: known from then on.
                bool init = c.phase == "init" || c.phase == "init_worker";
                if (init && msg.compare(0, 5, "W111:") == 0) {
                    size_t q = msg.find('\'');
                    size_t q2 = msg.rfind('\'');
                    if (q != std::string::npos && q2 > q) {
                        init_globals_ += " " + msg.substr(q + 1, q2 - q - 1);
                    }
                    continue;
                }
                add("luacheck", c.file, c.line + line - 1, msg);
            }
            pclose(pipe);
        }
        unlink(tmpl);
    }
};


void usage()
{
    std::cerr <<
        "usage: luaguard-audit [options] nginx.conf\n"
        "       luaguard-audit --explain RULE | --list-rules\n"
        "  -p, --prefix DIR       nginx prefix (*_by_lua_file, $prefix); "
        "default: the config's directory\n"
        "  -D, --define NAME=VAL  replace NAME in the config text first\n"
        "  --format text|sarif    output format (default text)\n"
        "  --fail-on SEVERITY     exit 1 on findings at or above it: info,\n"
        "                         low, medium, high (default) or never\n"
        "  --no-luacheck          do not run luacheck even when installed\n"
        "  --luacheck PATH        the luacheck to run (default: luacheck)\n";
}

}  // namespace


int auditMain(int argc, char **argv)
{
    Options opts;
    Config cfg;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) {
                usage();
                exit(2);
            }
            return argv[++i];
        };
        if (a == "-h" || a == "--help") {
            usage();
            return 0;
        } else if (a == "--explain") {
            std::string id = value();
            const Rule *r = findRule(id);
            if (!r) {
                std::cerr << "luaguard-audit: no rule " << id
                          << " (--list-rules)\n";
                return 2;
            }
            std::cout << explain(*r);
            return 0;
        } else if (a == "--list-rules") {
            for (const auto &r : rules()) {
                std::cout << r.id << "\t" << severityName(r.severity) << "\t"
                          << r.title << "\n";
            }
            return 0;
        } else if (a == "-p" || a == "--prefix") {
            cfg.prefix = value();
        } else if (a == "-D" || a == "--define") {
            std::string d = value();
            size_t eq = d.find('=');
            if (eq == std::string::npos || eq == 0) {
                std::cerr << "luaguard-audit: -D wants NAME=VALUE\n";
                return 2;
            }
            cfg.defines.push_back({d.substr(0, eq), d.substr(eq + 1)});
        } else if (a == "--format") {
            opts.format = value();
            if (opts.format != "text" && opts.format != "sarif") {
                usage();
                return 2;
            }
        } else if (a == "--fail-on") {
            std::string s = value();
            if (s == "never") {
                opts.fail_never = true;
            } else if (!parseSeverity(s, &opts.fail_on)) {
                usage();
                return 2;
            }
        } else if (a == "--no-luacheck") {
            opts.luacheck = false;
        } else if (a == "--luacheck") {
            opts.luacheck_bin = value();
        } else if (!a.empty() && a[0] == '-') {
            usage();
            return 2;
        } else {
            opts.config = a;
        }
    }
    if (opts.config.empty()) {
        usage();
        return 2;
    }
    if (!cfg.load(opts.config)) {
        std::cerr << "luaguard-audit: cannot read " << opts.config << ": "
                  << strerror(errno) << "\n";
        return 2;
    }
    Auditor auditor(cfg, opts);
    std::vector<Finding> findings = auditor.run();
    if (opts.format == "sarif") {
        std::cout << formatSarif(findings);
    } else {
        std::cout << formatText(findings);
    }
    if (opts.fail_never) {
        return 0;
    }
    for (const auto &f : findings) {
        if (f.severity >= opts.fail_on) {
            return 1;
        }
    }
    return 0;
}

}  // namespace luaguard::audit


int main(int argc, char **argv)
{
    return luaguard::audit::auditMain(argc, argv);
}
