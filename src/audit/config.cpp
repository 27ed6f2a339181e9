#include "audit/config.hpp"

#include <glob.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "runtime/block_scanner.hpp"

namespace luaguard::audit {

namespace {

bool endsWith(const std::string &s, const std::string &suffix)
{
    return s.size() >= suffix.size()
           && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}


std::string dirName(const std::string &path)
{
    size_t slash = path.rfind('/');
    if (slash == std::string::npos) {
        return ".";
    }
    return slash == 0 ? "/" : path.substr(0, slash);
}


std::string joinPath(const std::string &dir, const std::string &p)
{
    if (!p.empty() && p[0] == '/') {
        return p;
    }
    return dir + "/" + p;
}


std::string joinArgs(const std::vector<std::string> &args)
{
    std::string out;
    for (const auto &a : args) {
        out += (out.empty() ? "" : " ") + a;
    }
    return out;
}

}  // namespace


std::string readFile(const std::string &path, bool *ok)
{
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        *ok = false;
        return {};
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    *ok = true;
    return ss.str();
}


// content_by_lua_block -> content; set_by_lua -> set.
std::string phaseOf(const std::string &directive)
{
    size_t at = directive.find("_by_lua");
    return at == std::string::npos ? "" : directive.substr(0, at);
}


bool hasVariable(const std::string &s)
{
    for (size_t i = 0; i + 1 < s.size(); i++) {
        if (s[i] == '$' && (isalnum(static_cast<unsigned char>(s[i + 1]))
                            || s[i + 1] == '_' || s[i + 1] == '{'))
        {
            return true;
        }
    }
    return false;
}


const Directive *Settings::get(const std::string &name) const
{
    auto it = values.find(name);
    return it == values.end() ? nullptr : it->second;
}


std::string Settings::value(const std::string &name,
                            const std::string &def) const
{
    const Directive *d = get(name);
    return d && !d->args.empty() ? d->args[0] : def;
}


bool Config::load(const std::string &path)
{
    conf_dir = dirName(path);
    if (prefix.empty()) {
        prefix = conf_dir;
    }
    // $prefix must expand to an absolute path, as nginx's -p does.
    char real[PATH_MAX];
    if (realpath(prefix.c_str(), real)) {
        prefix = real;
    }
    bool ok = false;
    readFile(path, &ok);
    if (!ok) {
        return false;
    }
    // A parse error is a finding; what was read before it is audited.
    parseFile(path, &root, 0);
    auto top = std::make_shared<Scope>();
    top->kind = "main";
    top->label = "main";
    scopes.push_back(top);
    walk(root, top);
    return true;
}


bool Config::parseFile(const std::string &path, std::vector<Directive> *out,
                       int depth)
{
    bool ok = false;
    std::string text = readFile(path, &ok);
    if (!ok) {
        problems.push_back({path, 0, "cannot read " + path + ": "
                                         + strerror(errno)});
        return false;
    }
    for (const auto &def : defines) {
        for (size_t at = text.find(def.first); at != std::string::npos;
             at = text.find(def.first, at + def.second.size()))
        {
            text.replace(at, def.first.size(), def.second);
        }
    }
    return parseText(text, path, out, depth);
}


// nginx's tokenizer (ngx_conf_read_token): words, quoted strings with
// \" \' \\ \t \r \n, # comments at the start of a word, ; { } ending a
// directive, and ${var} keeping its braces inside a word. A *_by_lua_block
// body is handed to the project's block scanner, as the module does.
bool Config::parseText(const std::string &text, const std::string &file,
                       std::vector<Directive> *out, int depth)
{
    struct Frame {
        std::vector<Directive> *list;
    };
    std::vector<Frame> stack{{out}};
    Directive cur;
    bool have = false;
    int line = 1;
    size_t i = 0;
    size_t n = text.size();

    auto fail = [&](const std::string &msg) {
        problems.push_back({file, line, msg});
        return false;
    };

    while (i < n) {
        char ch = text[i];
        if (ch == '\n') {
            line++;
            i++;
            continue;
        }
        if (isspace(static_cast<unsigned char>(ch))) {
            i++;
            continue;
        }
        if (ch == '#') {
            while (i < n && text[i] != '\n') {
                i++;
            }
            continue;
        }
        if (ch == ';' || ch == '{') {
            if (!have) {
                return fail(std::string("unexpected \"") + ch + "\"");
            }
            i++;
            if (ch == ';') {
                if (cur.name == "include" && !cur.args.empty()) {
                    if (depth > 16) {
                        return fail("include nested too deep");
                    }
                    std::string pat = joinPath(conf_dir, cur.args[0]);
                    glob_t g{};
                    int rc = glob(pat.c_str(), 0, nullptr, &g);
                    if (rc == 0) {
                        for (size_t k = 0; k < g.gl_pathc; k++) {
                            parseFile(g.gl_pathv[k], stack.back().list,
                                      depth + 1);
                        }
                    } else if (pat.find_first_of("*?[") == std::string::npos) {
                        problems.push_back({file, line,
                                            "include " + pat + " not found"});
                    }
                    globfree(&g);
                } else {
                    stack.back().list->push_back(cur);
                }
                cur = Directive();
                have = false;
                continue;
            }
            cur.block = true;
            if (endsWith(cur.name, "_by_lua_block")) {
                luaguard::BlockScanner scanner;
                size_t used = 0;
                if (scanner.feed(text.data() + i, n - i, &used)
                    != luaguard::BlockScanner::Status::Done)
                {
                    return fail(std::string("unterminated ") + cur.name
                                + " (inside " + scanner.context() + ")");
                }
                cur.lua_block = true;
                cur.lua_body = text.substr(i, used - 1);
                cur.body_line = line;
                line += static_cast<int>(scanner.lines());
                i += used;
                stack.back().list->push_back(cur);
                cur = Directive();
                have = false;
                continue;
            }
            stack.back().list->push_back(cur);
            stack.push_back({&stack.back().list->back().children});
            cur = Directive();
            have = false;
            continue;
        }
        if (ch == '}') {
            if (have) {
                return fail("unexpected \"}\"");
            }
            if (stack.size() == 1) {
                return fail("unexpected \"}\"");
            }
            stack.pop_back();
            i++;
            continue;
        }
        // A word or a quoted string.
        std::string word;
        int word_line = line;
        if (ch == '"' || ch == '\'') {
            char q = ch;
            i++;
            while (i < n && text[i] != q) {
                if (text[i] == '\\' && i + 1 < n) {
                    char e = text[i + 1];
                    if (e == q || e == '\\') {
                        word += e;
                    } else if (e == 't') {
                        word += '\t';
                    } else if (e == 'r') {
                        word += '\r';
                    } else if (e == 'n') {
                        word += '\n';
                    } else {
                        word += '\\';
                        word += e;
                    }
                    if (e == '\n') {
                        line++;
                    }
                    i += 2;
                    continue;
                }
                if (text[i] == '\n') {
                    line++;
                }
                word += text[i++];
            }
            if (i >= n) {
                return fail("unterminated quoted string");
            }
            i++;
        } else {
            while (i < n) {
                char c = text[i];
                if (isspace(static_cast<unsigned char>(c)) || c == ';'
                    || c == '{' || c == '}')
                {
                    if (c == '{' && !word.empty() && word.back() == '$') {
                        size_t close = text.find('}', i);
                        if (close == std::string::npos) {
                            return fail("unterminated ${");
                        }
                        word += text.substr(i, close + 1 - i);
                        i = close + 1;
                        continue;
                    }
                    break;
                }
                word += c;
                i++;
            }
        }
        if (!have) {
            cur.name = word;
            cur.file = file;
            cur.line = word_line;
            have = true;
        } else {
            cur.args.push_back(word);
            cur.arg_lines.push_back(word_line);
        }
    }
    // nginx names the last line of the file, not the one after it.
    if (!text.empty() && text.back() == '\n') {
        line--;
    }
    if (have) {
        return fail("unexpected end of file, expecting \";\" or \"}\"");
    }
    if (stack.size() != 1) {
        return fail("unexpected end of file, expecting \"}\"");
    }
    return true;
}


void Config::walk(const std::vector<Directive> &list,
                  const std::shared_ptr<Scope> &scope)
{
    // Own settings first: nginx merges a level's directives whatever
    // their order relative to the nested blocks.
    for (const auto &d : list) {
        if (d.block) {
            continue;
        }
        scope->directives.push_back(&d);
        if (scope->kind == "http") {
            http_directives.push_back(&d);
        }
        if (d.name == "lua_egress") {
            if (!scope->settings.own_egress_rules) {
                scope->settings.egress_rules.clear();
                scope->settings.own_egress_rules = true;
            }
            scope->settings.egress_rules.push_back(&d);
        } else {
            scope->settings.values[d.name] = &d;
        }
    }
    for (const auto &d : list) {
        bool handler = d.name.find("_by_lua") != std::string::npos
                       && d.name.find("_no_postpone") == std::string::npos;
        if (d.lua_block || (!d.block && handler)) {
            addChunk(d, scope);
            continue;
        }
        if (!d.block) {
            continue;
        }
        std::string kind;
        if (d.name == "http" || d.name == "server" || d.name == "location"
            || d.name == "upstream")
        {
            kind = d.name;
        } else if (d.name == "if" || d.name == "limit_except") {
            // Lua inside `if` runs for the enclosing location.
            walk(d.children, scope);
            continue;
        } else {
            continue;  // events, map, types, geo, stream...
        }
        if (kind == "server" && scope->kind != "http") {
            continue;  // stream or mail servers are not ours
        }
        auto child = std::make_shared<Scope>();
        child->kind = kind;
        child->dir = &d;
        child->parent = scope;
        child->settings = scope->settings;
        child->settings.own_egress_rules = false;
        if (kind == "upstream") {
            child->settings = Settings();
        }
        if (kind == "server") {
            std::string name;
            for (const auto &c : d.children) {
                if (c.name == "server_name" && !c.args.empty()) {
                    name = c.args[0];
                    break;
                }
                if (c.name == "listen" && !c.args.empty() && name.empty()) {
                    name = c.args[0];
                }
            }
            child->label = "server " + (name.empty() ? "_" : name);
        } else if (kind == "location") {
            std::string outer;
            if (scope->kind == "server" || scope->kind == "location") {
                outer = scope->label + ", ";
            }
            child->label = outer + "location " + joinArgs(d.args);
        } else if (kind == "upstream") {
            child->label = "upstream " + joinArgs(d.args);
        } else {
            child->label = "http";
        }
        scopes.push_back(child);
        walk(d.children, child);
    }
}


void Config::addChunk(const Directive &d, const std::shared_ptr<Scope> &scope)
{
    auto c = std::make_unique<Chunk>();
    c->directive = d.name;
    c->phase = phaseOf(d.name);
    c->where = &d;
    c->scope = scope;
    c->location = scope->label;
    c->file = d.file;
    // set_by_lua* names the variable first.
    size_t first = c->phase == "set" ? 1 : 0;
    if (d.lua_block) {
        c->kind = "block";
        c->code = d.lua_body;
        c->line = d.body_line;
    } else if (d.args.size() <= first) {
        return;
    } else if (endsWith(d.name, "_by_lua_file")) {
        c->kind = "file";
        c->path = d.args[first];
        c->line = 1;
        if (hasVariable(c->path)) {
            c->loaded = false;
            c->line = d.line;
        } else {
            std::string full = joinPath(prefix, c->path);
            bool ok = false;
            c->code = readFile(full, &ok);
            c->loaded = ok;
            c->file = full;
            if (!ok) {
                c->file = d.file;
                c->line = d.line;
            }
        }
    } else {
        c->kind = "string";
        c->code = d.args[first];
        c->line = d.arg_lines[first];
    }
    if (c->phase == "set") {
        for (size_t k = first + 1; k < d.args.size(); k++) {
            c->args_from_vars = c->args_from_vars || hasVariable(d.args[k]);
        }
    }
    scope->chunks.push_back(c.get());
    chunks.push_back(std::move(c));
}

}  // namespace luaguard::audit
