#include "audit/lua_taint.hpp"

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <set>

namespace luaguard::audit {

namespace {

// ---- tokens ----

enum class T { Name, String, Number, Op, Eof };

struct Token {
    T type;
    std::string text;  // a string's decoded value
    int line;
};

unsigned char uc(char c)
{
    return static_cast<unsigned char>(c);
}


// Long bracket at s[i] ('[' followed by '='s and '['): its level, or -1.
int longBracket(const std::string &s, size_t i)
{
    if (s[i] != '[') {
        return -1;
    }
    size_t j = i + 1;
    while (j < s.size() && s[j] == '=') {
        j++;
    }
    return j < s.size() && s[j] == '[' ? static_cast<int>(j - i - 1) : -1;
}


// Skips a long string/comment opened at s[i] with the given level; returns
// the index after it and its content.
size_t skipLong(const std::string &s, size_t i, int level, int *line,
                std::string *content)
{
    size_t j = i + level + 2;
    if (j < s.size() && s[j] == '\n') {  // a first newline is not content
        (*line)++;
        j++;
    }
    std::string close = "]" + std::string(level, '=') + "]";
    size_t end = s.find(close, j);
    if (end == std::string::npos) {
        end = s.size();
    }
    for (size_t k = j; k < end; k++) {
        if (s[k] == '\n') {
            (*line)++;
        }
    }
    if (content) {
        *content = s.substr(j, end - j);
    }
    return std::min(s.size(), end + close.size());
}


std::vector<Token> tokenize(const std::string &s)
{
    std::vector<Token> out;
    int line = 1;
    size_t i = 0;
    size_t n = s.size();
    // A shebang line is accepted by LuaJIT's loader.
    if (n > 1 && s[0] == '#') {
        while (i < n && s[i] != '\n') {
            i++;
        }
    }
    while (i < n) {
        char c = s[i];
        if (c == '\n') {
            line++;
            i++;
        } else if (isspace(static_cast<unsigned char>(c))) {
            i++;
        } else if (c == '-' && i + 1 < n && s[i + 1] == '-') {
            int lvl = i + 2 < n ? longBracket(s, i + 2) : -1;
            if (lvl >= 0) {
                i = skipLong(s, i + 2, lvl, &line, nullptr);
            } else {
                while (i < n && s[i] != '\n') {
                    i++;
                }
            }
        } else if (isalpha(static_cast<unsigned char>(c)) || c == '_') {
            size_t j = i;
            while (j < n && (isalnum(static_cast<unsigned char>(s[j]))
                             || s[j] == '_'))
            {
                j++;
            }
            out.push_back({T::Name, s.substr(i, j - i), line});
            i = j;
        } else if (isdigit(static_cast<unsigned char>(c))
                   || (c == '.' && i + 1 < n
                       && isdigit(static_cast<unsigned char>(s[i + 1]))))
        {
            size_t j = i;
            while (j < n && (isalnum(static_cast<unsigned char>(s[j]))
                             || s[j] == '.'
                             || ((s[j] == '+' || s[j] == '-')
                                 && (s[j - 1] == 'e' || s[j - 1] == 'E'
                                     || s[j - 1] == 'p' || s[j - 1] == 'P'))))
            {
                j++;
            }
            out.push_back({T::Number, s.substr(i, j - i), line});
            i = j;
        } else if (c == '"' || c == '\'') {
            int start = line;
            std::string v;
            size_t j = i + 1;
            while (j < n && s[j] != c && s[j] != '\n') {
                if (s[j] == '\\' && j + 1 < n) {
                    char e = s[j + 1];
                    j += 2;
                    switch (e) {
                    case 'n': v += '\n'; break;
                    case 't': v += '\t'; break;
                    case 'r': v += '\r'; break;
                    case 'a': v += '\a'; break;
                    case 'b': v += '\b'; break;
                    case 'f': v += '\f'; break;
                    case 'v': v += '\v'; break;
                    case '\n': v += '\n'; line++; break;
                    case 'x': {
                        size_t k = j;
                        while (k < n && k < j + 2 && isxdigit(uc(s[k]))) {
                            k++;
                        }
                        v += static_cast<char>(
                            strtol(s.substr(j, k - j).c_str(), nullptr, 16));
                        j = k;
                        break;
                    }
                    case 'z':
                        while (j < n && isspace(uc(s[j]))) {
                            if (s[j] == '\n') {
                                line++;
                            }
                            j++;
                        }
                        break;
                    default:
                        if (isdigit(uc(e))) {
                            int val = e - '0';
                            for (int k = 0; k < 2 && j < n && isdigit(uc(s[j]));
                                 k++, j++)
                            {
                                val = val * 10 + (s[j] - '0');
                            }
                            v += static_cast<char>(val);
                        } else {
                            v += e;
                        }
                    }
                    continue;
                }
                v += s[j++];
            }
            out.push_back({T::String, v, start});
            i = j + 1;
        } else if (c == '[' && longBracket(s, i) >= 0) {
            int start = line;
            std::string v;
            i = skipLong(s, i, longBracket(s, i), &line, &v);
            out.push_back({T::String, v, start});
        } else {
            static const char *ops[] = {"...", "..", "==", "~=", "<=", ">=",
                                        "::", nullptr};
            std::string op(1, c);
            for (int k = 0; ops[k]; k++) {
                if (s.compare(i, strlen(ops[k]), ops[k]) == 0) {
                    op = ops[k];
                    break;
                }
            }
            out.push_back({T::Op, op, line});
            i += op.size();
        }
    }
    out.push_back({T::Eof, "", line});
    return out;
}

// ---- abstract values ----

// Which sinks request data may still reach (a sanitizer clears bits).
enum : int {
    kCode = 1,
    kHtml = 2,
    kTarget = 4,
    kHeader = 8,
    kLog = 16,
    kAll = 31,
};

struct Val;
using Fields = std::map<std::string, Val>;

struct Val {
    enum Kind { Plain, Socket, Table, Func, Reader };
    Kind kind = Plain;
    int taint = 0;
    std::string why;     // where the request data came from
    std::string path;    // a known global reached through it: "ngx.var"
    std::shared_ptr<Fields> fields;  // Table
    int func = -1;       // Func: index into Analyzer::funcs_
    bool is_str = false;
    std::string str;
    std::string name;    // the name it was reached by, for sanitizers
};

struct Var {
    Val val;
    int depth;  // block depth it was declared at
};

struct FuncDef {
    size_t body;  // token index of the first statement
    std::vector<std::string> params;
};

const std::set<std::string> kSafeVars = {
    "remote_addr", "remote_port", "server_addr", "server_port",
    "server_protocol", "request_time", "msec", "pid", "connection",
    "connection_requests", "nginx_version", "hostname", "time_local",
    "time_iso8601", "document_root", "realpath_root", "scheme", "https",
    "bytes_sent", "body_bytes_sent", "status", "request_length",
    "content_length", "binary_remote_addr", "request_id",
};

const std::set<std::string> kSourceCalls = {
    "ngx.req.get_uri_args", "ngx.req.get_post_args", "ngx.req.get_headers",
    "ngx.req.get_body_data", "ngx.req.raw_header", "ngx.decode_args",
};

// Results that carry no request-chosen text whatever the arguments.
const std::set<std::string> kClean = {
    "tonumber", "type", "ngx.md5", "ngx.md5_bin", "ngx.sha1_bin",
    "ngx.crc32_short", "ngx.crc32_long", "ngx.encode_base64",
    "ngx.hmac_sha1", "ngx.time", "ngx.now", "ngx.today", "ngx.http_time",
    "ngx.cookie_time", "os.time", "os.clock", "string.len", "ngx.re.find",
    "ngx.get_phase", "ngx.worker.id", "ngx.worker.count", "ngx.worker.pid",
    "require", "ngx.req.read_body", "ngx.req.http_version", "rawlen",
    "select", "ngx.null", "ngx.quote_sql_str",
};

const std::set<std::string> kHtmlEscapers = {
    "escape_html", "html_escape", "escapehtml", "htmlescape", "encode_html",
    "html_encode", "htmlencode", "escape_xml", "xml_escape",
};

const std::set<std::string> kOutgoingModules = {
    "resty.http", "resty.redis", "resty.mysql", "resty.memcached",
    "resty.websocket.client", "resty.dns.resolver", "resty.postgres",
    "pgmoon", "resty.kafka.producer", "resty.smtp",
};

std::string lastPart(const std::string &path)
{
    size_t at = path.find_last_of(".:");
    return at == std::string::npos ? path : path.substr(at + 1);
}


std::string lower(std::string s)
{
    for (auto &c : s) {
        c = static_cast<char>(tolower(static_cast<unsigned char>(c)));
    }
    return s;
}


class Analyzer {
 public:
    Analyzer(std::vector<Token> toks, const LuaOptions &opts)
        : t_(std::move(toks)), opts_(opts)
    {}

    LuaFacts run()
    {
        scopes_.emplace_back();
        returns_.emplace_back();
        block();
        for (const auto &v : returns_.back()) {
            facts_.returns_tainted = facts_.returns_tainted
                                     || (taintOf(v) & kTarget);
        }
        return std::move(facts_);
    }

 private:
    std::vector<Token> t_;
    LuaOptions opts_;
    size_t p_ = 0;
    LuaFacts facts_;
    std::vector<std::map<std::string, Var>> scopes_;
    std::map<std::string, Val> globals_;
    std::vector<FuncDef> funcs_;
    std::vector<std::vector<Val>> returns_;
    std::set<int> active_;          // functions being interpreted
    std::set<std::pair<std::string, int>> reported_;
    int loops_ = 0;
    int steps_ = 0;

    // -- token helpers --
    const Token &cur() const { return t_[p_]; }
    const Token &peek(size_t k = 1) const
    {
        return t_[std::min(p_ + k, t_.size() - 1)];
    }
    bool is(const char *text) const
    {
        return (cur().type == T::Op || cur().type == T::Name)
               && cur().text == text;
    }
    bool accept(const char *text)
    {
        if (is(text)) {
            next();
            return true;
        }
        return false;
    }
    void next()
    {
        if (p_ + 1 < t_.size()) {
            p_++;
        }
    }
    bool atEnd() const { return cur().type == T::Eof; }
    int depth() const { return static_cast<int>(scopes_.size()); }

    static bool isKeyword(const std::string &s)
    {
        static const std::set<std::string> kw = {
            "and", "break", "do", "else", "elseif", "end", "false", "for",
            "function", "goto", "if", "in", "local", "nil", "not", "or",
            "repeat", "return", "then", "true", "until", "while"};
        return kw.count(s) > 0;
    }

    // -- findings --
    void report(const std::string &rule, int line, const std::string &msg)
    {
        if (reported_.insert({rule, line}).second) {
            facts_.findings.push_back({rule, line, msg});
        }
    }

    static int taintOf(const Val &v, int depth = 0)
    {
        int t = v.taint;
        if (v.fields && depth < 4) {
            for (const auto &f : *v.fields) {
                t |= taintOf(f.second, depth + 1);
            }
        }
        return t;
    }

    static std::string whyOf(const Val &v, int depth = 0)
    {
        if (v.taint) {
            return v.why;
        }
        if (v.fields && depth < 4) {
            for (const auto &f : *v.fields) {
                std::string w = whyOf(f.second, depth + 1);
                if (!w.empty()) {
                    return w;
                }
            }
        }
        return "";
    }

    static Val join(const Val &a, const Val &b)
    {
        Val v;
        v.taint = taintOf(a) | taintOf(b);
        v.why = !whyOf(a).empty() ? whyOf(a) : whyOf(b);
        return v;
    }

    static Val tainted(const std::string &why, int bits = kAll)
    {
        Val v;
        v.taint = bits;
        v.why = why;
        return v;
    }

    // -- variables --
    Var *findLocal(const std::string &name)
    {
        for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
            auto f = it->find(name);
            if (f != it->end()) {
                return &f->second;
            }
        }
        return nullptr;
    }

    Val lookup(const std::string &name)
    {
        Val v;
        if (Var *var = findLocal(name)) {
            v = var->val;
        } else if (globals_.count(name)) {
            v = globals_[name];
        }
        if (v.name.empty()) {
            v.name = name;
        }
        if (findLocal(name) || globals_.count(name)) {
            return v;
        }
        v.path = name == "_G" ? "" : name;
        if (name == "_G" || name == "_ENV") {
            v.path = "_G";
        }
        return v;
    }

    void declare(const std::string &name, const Val &v)
    {
        scopes_.back()[name] = {v, depth()};
    }

    void assignName(const std::string &name, const Val &v)
    {
        if (Var *var = findLocal(name)) {
            // A write in a nested block may not happen: keep what the
            // variable held too (taint only ever joins there).
            if (depth() > var->depth) {
                Val j = v;
                j.taint |= taintOf(var->val);
                if (j.why.empty()) {
                    j.why = whyOf(var->val);
                }
                var->val = j;
            } else {
                var->val = v;
            }
            return;
        }
        auto g = globals_.find(name);
        if (g != globals_.end() && depth() > 1) {
            Val j = v;
            j.taint |= taintOf(g->second);
            g->second = j;
        } else {
            globals_[name] = v;
        }
    }

    // -- indexing --
    Val index(const Val &base, const std::string *key, const Val &keyval,
              int line)
    {
        Val r = indexOf(base, key, keyval, line);
        if (key && r.name.empty()) {
            r.name = *key;
        }
        return r;
    }

    Val indexOf(const Val &base, const std::string *key, const Val &keyval,
                int line)
    {
        std::string k = key ? *key : "?";
        if (!base.path.empty()) {
            Val v;
            v.path = base.path == "_G" ? k : base.path + "." + k;
            v.taint = base.taint;
            v.why = base.why;
            if (base.path == "ngx.var") {
                if (!key || !kSafeVars.count(k)) {
                    return {Val::Plain, kAll, "ngx.var." + k, v.path};
                }
                return v;
            }
            if (base.path == "ngx.arg" && opts_.args_tainted) {
                return {Val::Plain, kAll, "ngx.arg (set_by_lua arguments)",
                        v.path};
            }
            if (base.path == "ngx.ctx") {
                for (const auto &c : opts_.tainted_ctx) {
                    if (!key || c == k || c == "?") {
                        return {Val::Plain, kAll, "ngx.ctx." + c
                                + " (set from request data)", v.path};
                    }
                }
            }
            return v;
        }
        if (base.kind == Val::Table && base.fields && key) {
            auto f = base.fields->find(k);
            if (f != base.fields->end()) {
                return f->second;
            }
        }
        // A table from the request, or a field we do not know: anything
        // in it may come out.
        Val v;
        v.taint = taintOf(base);
        v.why = whyOf(base);
        return v;
    }

    // -- calls --
    Val call(const Val &fn, const Val *self, const std::string &method,
             std::vector<Val> args, int line)
    {
        if (++steps_ > 200000) {
            return Val();
        }
        std::string path = fn.path;
        if (self) {
            path = (self->path.empty() ? "?" : self->path) + ":" + method;
            args.insert(args.begin(), *self);
        }
        auto arg = [&](size_t i) { return i < args.size() ? args[i] : Val(); };
        auto anyTaint = [&](size_t from, int bit, std::string *why) {
            for (size_t i = from; i < args.size(); i++) {
                if (taintOf(args[i]) & bit) {
                    *why = whyOf(args[i]);
                    return true;
                }
            }
            return false;
        };
        std::string why;
        std::string last = lower(self ? method : (fn.name.empty()
                                                      ? lastPart(path)
                                                      : fn.name));

        // Sources.
        if (kSourceCalls.count(path)) {
            return tainted(path + "()");
        }
        if (path == "ngx.socket.tcp" || path == "ngx.socket.udp"
            || path == "ngx.socket.stream" || path == "ngx.socket.connect"
            || path == "ngx.req.socket")
        {
            Val s;
            s.kind = Val::Socket;
            if (path != "ngx.req.socket" && !facts_.cosocket_line) {
                facts_.cosocket_line = line;
            }
            if (path == "ngx.socket.connect" && (taintOf(arg(0)) & kTarget)) {
                report("ssrf", line, "ngx.socket.connect target comes from "
                                         + whyOf(arg(0)));
            }
            return s;
        }
        if (fn.kind == Val::Reader) {
            return tainted("a cosocket reply");
        }
        if (self && self->kind == Val::Socket) {
            if (method == "receive" || method == "receiveany") {
                if (loops_ && !facts_.sleep_loop_line) {
                    facts_.sleep_loop_line = line;
                }
                return tainted("a cosocket reply");
            }
            if (method == "receiveuntil") {
                Val r;
                r.kind = Val::Reader;
                return r;
            }
        }

        // Sinks.
        if (path == "load" || path == "loadstring" || path == "dofile"
            || path == "loadfile")
        {
            if (taintOf(arg(0)) & kCode) {
                report("code-injection", line,
                       path + "() runs code built from " + whyOf(arg(0)));
            }
            return Val();
        }
        if (path == "ngx.say" || path == "ngx.print") {
            if (anyTaint(0, kHtml, &why)) {
                report("xss", line, path + "() writes " + why
                                        + " into the response unescaped");
            }
            return Val();
        }
        if (path == "ngx.redirect") {
            if (taintOf(arg(0)) & kHeader) {
                report("open-redirect", line, "ngx.redirect() target comes "
                                              "from " + whyOf(arg(0)));
            }
            return Val();
        }
        if (path == "ngx.log") {
            if (anyTaint(1, kLog, &why)) {
                report("log-injection", line, "ngx.log() writes " + why
                                                  + " into the error log");
            }
            return Val();
        }
        if (path == "ngx.location.capture"
            || path == "ngx.location.capture_multi")
        {
            if (taintOf(arg(0)) & kTarget) {
                report("ssrf", line, path + "() subrequest URI comes from "
                                         + whyOf(arg(0)));
            }
            return Val();
        }
        if (path == "ngx.sleep" && loops_ && !facts_.sleep_loop_line) {
            facts_.sleep_loop_line = line;
        }
        if (self && (method == "connect" || method == "setpeername"
                     || method == "request_uri"))
        {
            if (self->kind == Val::Socket && method != "request_uri"
                && !facts_.cosocket_line)
            {
                facts_.cosocket_line = line;
            }
            // Any object's connect: resty.http, resty.redis and friends
            // connect where their caller says. args[0] is the receiver.
            Val target = arg(1);
            if (taintOf(target) & kTarget) {
                report("ssrf", line, method + "() target comes from "
                                         + whyOf(target));
            }
            return Val();
        }
        if (path == "require") {
            const Val &m = arg(0);
            if (m.is_str) {
                facts_.requires.push_back(m.str);
                if (kOutgoingModules.count(m.str) && !facts_.cosocket_line) {
                    facts_.cosocket_line = line;
                }
            }
            return Val();
        }
        if (path == "rawget" && arg(0).path == "_G" && arg(1).is_str) {
            Val v;
            v.path = arg(1).str;
            return v;
        }
        if ((path == "pcall" || path == "xpcall")
            && (arg(0).kind == Val::Func || !arg(0).path.empty()))
        {
            size_t skip = path == "xpcall" ? 2 : 1;  // f [, handler]
            std::vector<Val> rest(args.begin() + std::min(skip, args.size()),
                                  args.end());
            return call(arg(0), nullptr, "", rest, line);
        }

        // Callbacks run with the arguments given here.
        if ((path == "ngx.timer.at" || path == "ngx.timer.every")
            && arg(1).kind == Val::Func)
        {
            std::vector<Val> rest{Val()};  // premature
            rest.insert(rest.end(), args.begin() + 2, args.end());
            call(arg(1), nullptr, "", rest, line);
            return Val();
        }
        if (path == "ngx.thread.spawn" && arg(0).kind == Val::Func) {
            std::vector<Val> rest(args.begin() + 1, args.end());
            call(arg(0), nullptr, "", rest, line);
            return Val();
        }

        // Sanitizers.
        if (self && (method == "len" || method == "byte" || method == "find")) {
            return Val();  // numbers
        }
        if (kClean.count(path) || path.compare(0, 5, "math.") == 0) {
            return Val();
        }
        if (kHtmlEscapers.count(last)) {
            Val v;
            for (size_t i = self ? 1 : 0; i < args.size(); i++) {
                v = join(v, args[i]);
            }
            v.taint &= ~kHtml;
            return v;
        }
        if (path == "ngx.escape_uri") {
            Val v = join(Val(), arg(0));
            v.taint &= ~(kHtml | kHeader | kLog);
            return v;
        }

        // Functions of the chunk: interpret the body with these arguments.
        if (fn.kind == Val::Func && fn.func >= 0) {
            return interpret(fn.func, args, line);
        }
        if (self && self->kind == Val::Socket) {
            return Val();
        }
        // Anything else (string.*, table.concat, cjson, module
        // functions): what goes in may come out.
        Val v;
        for (const auto &a : args) {
            if (a.kind != Val::Func) {
                v = join(v, a);
            }
        }
        return v;
    }

    Val interpret(int f, const std::vector<Val> &args, int line)
    {
        if (active_.count(f) || active_.size() > 4) {
            return Val();
        }
        active_.insert(f);
        size_t saved = p_;
        int saved_loops = loops_;
        loops_ = 0;
        p_ = funcs_[f].body;
        scopes_.emplace_back();
        for (size_t i = 0; i < funcs_[f].params.size(); i++) {
            declare(funcs_[f].params[i], i < args.size() ? args[i] : Val());
        }
        returns_.emplace_back();
        block();
        Val r;
        for (const auto &v : returns_.back()) {
            r = join(r, v);
            if (v.kind != Val::Plain && returns_.back().size() == 1) {
                r = v;
            }
        }
        returns_.pop_back();
        scopes_.pop_back();
        p_ = saved;
        loops_ = saved_loops;
        active_.erase(f);
        return r;
    }

    // -- expressions --
    std::vector<Val> callArgs()
    {
        std::vector<Val> args;
        if (cur().type == T::String) {
            Val v;
            v.is_str = true;
            v.str = cur().text;
            next();
            args.push_back(v);
        } else if (is("{")) {
            args.push_back(tableCons());
        } else if (accept("(")) {
            if (!is(")")) {
                args = exprList();
            }
            accept(")");
        }
        return args;
    }

    struct Ref {
        enum Kind { None, Name, Field } kind = None;
        std::string name;       // Name
        Val base;               // Field
        bool key_known = false;
        std::string key;
        Val keyval;
        int line = 0;
    };

    // primaryexp { suffix }; *ref describes the last step when it can be
    // assigned to.
    Val suffixedExp(Ref *ref)
    {
        Val v;
        Ref r;
        int line = cur().line;
        if (cur().type == T::Name && !isKeyword(cur().text)) {
            r.kind = Ref::Name;
            r.name = cur().text;
            v = lookup(cur().text);
            next();
        } else if (accept("(")) {
            v = expr();  // (f)() is still f: the value keeps its path
            accept(")");
            r.kind = Ref::None;
        } else {
            next();  // not Lua LuaJIT would accept; keep moving
            return v;
        }
        for (;;) {
            line = cur().line;
            if (accept(".")) {
                std::string k = cur().text;
                next();
                r = {Ref::Field, "", v, true, k, Val(), line};
                v = index(v, &k, Val(), line);
            } else if (accept("[")) {
                Val kv = expr();
                accept("]");
                bool known = kv.is_str;
                r = {Ref::Field, "", v, known, kv.str, kv, line};
                v = index(v, known ? &kv.str : nullptr, kv, line);
            } else if (accept(":")) {
                std::string m = cur().text;
                next();
                std::vector<Val> args = callArgs();
                v = call(Val(), &v, m, args, line);
                r.kind = Ref::None;
            } else if (is("(") || is("{") || cur().type == T::String) {
                // A call's '(' on a new line is ambiguous in Lua 5.1; the
                // loader accepted it, so it is a call.
                std::vector<Val> args = callArgs();
                v = call(v, nullptr, "", args, line);
                r.kind = Ref::None;
            } else {
                break;
            }
        }
        if (ref) {
            *ref = r;
        }
        return v;
    }

    Val tableCons()
    {
        Val t;
        t.kind = Val::Table;
        t.fields = std::make_shared<Fields>();
        accept("{");
        int pos = 1;
        while (!is("}") && !atEnd()) {
            if (accept("[")) {
                Val k = expr();
                accept("]");
                accept("=");
                Val v = expr();
                (*t.fields)[k.is_str ? k.str : "?" + std::to_string(pos)] = v;
                if (!k.is_str) {
                    t.taint |= taintOf(k);
                    if (t.why.empty()) {
                        t.why = whyOf(k);
                    }
                }
            } else if (cur().type == T::Name && peek().type == T::Op
                       && peek().text == "=" && !isKeyword(cur().text))
            {
                std::string k = cur().text;
                next();
                next();
                (*t.fields)[k] = expr();
            } else {
                (*t.fields)[std::to_string(pos++)] = expr();
            }
            if (!accept(",") && !accept(";")) {
                break;
            }
        }
        accept("}");
        return t;
    }

    Val funcBody(bool method, std::vector<std::string> pre = {})
    {
        FuncDef def;
        def.params = std::move(pre);
        if (method) {
            def.params.insert(def.params.begin(), "self");
        }
        accept("(");
        while (!is(")") && !atEnd()) {
            if (cur().type == T::Name) {
                def.params.push_back(cur().text);
            }
            next();
            accept(",");
        }
        accept(")");
        def.body = p_;
        funcs_.push_back(def);
        int f = static_cast<int>(funcs_.size() - 1);
        // Analyzed once as written (parameters clean), then again at
        // every call of the chunk's own code with the arguments it gets.
        active_.insert(f);
        int saved_loops = loops_;
        loops_ = 0;
        scopes_.emplace_back();
        for (const auto &name : funcs_[f].params) {
            declare(name, Val());
        }
        returns_.emplace_back();
        block();
        returns_.pop_back();
        scopes_.pop_back();
        loops_ = saved_loops;
        active_.erase(f);
        accept("end");
        Val v;
        v.kind = Val::Func;
        v.func = f;
        return v;
    }

    Val simpleExp()
    {
        const Token &tk = cur();
        if (tk.type == T::Number) {
            next();
            return Val();
        }
        if (tk.type == T::String) {
            Val v;
            v.is_str = true;
            v.str = tk.text;
            next();
            return v;
        }
        if (is("nil") || is("true") || is("false") || is("...")) {
            next();
            return Val();
        }
        if (is("{")) {
            return tableCons();
        }
        if (accept("function")) {
            return funcBody(false);
        }
        return suffixedExp(nullptr);
    }

    static int precedence(const std::string &op, bool *right)
    {
        *right = false;
        if (op == "or") return 1;
        if (op == "and") return 2;
        if (op == "<" || op == ">" || op == "<=" || op == ">=" || op == "~="
            || op == "==")
        {
            return 3;
        }
        if (op == "..") {
            *right = true;
            return 4;
        }
        if (op == "+" || op == "-") return 5;
        if (op == "*" || op == "/" || op == "%") return 6;
        if (op == "^") {
            *right = true;
            return 8;
        }
        return 0;
    }

    Val expr(int limit = 0)
    {
        Val v;
        if (is("not") || is("-") || is("#")) {
            next();
            expr(7);
            v = Val();  // booleans, numbers, lengths: no text to inject
        } else {
            v = simpleExp();
        }
        for (;;) {
            if (cur().type != T::Op && cur().type != T::Name) {
                break;
            }
            bool right = false;
            std::string op = cur().text;
            int prec = precedence(op, &right);
            if (prec == 0 || prec <= limit) {
                break;
            }
            next();
            Val rhs = expr(right ? prec - 1 : prec);
            if (op == "..") {
                Val j = join(v, rhs);
                if (v.is_str && rhs.is_str) {
                    j.is_str = true;
                    j.str = v.str + rhs.str;
                }
                v = j;
            } else if (op == "or" || op == "and") {
                Val j = join(v, rhs);
                if (op == "or" && !taintOf(v) && v.kind != Val::Plain) {
                    j = v;
                }
                if (op == "or" && v.path.size() && !rhs.taint) {
                    j.path = v.path;  // local var = ngx.var or {}
                }
                v = j;
            } else {
                v = Val();
            }
        }
        return v;
    }

    std::vector<Val> exprList()
    {
        std::vector<Val> out{expr()};
        while (accept(",")) {
            out.push_back(expr());
        }
        return out;
    }

    // -- statements --
    bool blockEnd() const
    {
        return atEnd() || is("end") || is("else") || is("elseif")
               || is("until");
    }

    void block()
    {
        while (!blockEnd()) {
            size_t before = p_;
            if (++steps_ > 200000) {
                return;  // pathological nesting of calls: give up quietly
            }
            if (is("return")) {
                next();
                if (!blockEnd() && !is(";")) {
                    for (auto &v : exprList()) {
                        returns_.back().push_back(v);
                    }
                }
                accept(";");
                continue;
            }
            statement();
            if (p_ == before) {
                next();  // never stall on something unexpected
            }
        }
    }

    void scopedBlock()
    {
        scopes_.emplace_back();
        block();
        scopes_.pop_back();
    }

    void statement()
    {
        int line = cur().line;
        if (accept(";")) {
            return;
        }
        if (accept("::")) {
            next();
            accept("::");
            return;
        }
        if (accept("break")) {
            return;
        }
        if (accept("goto")) {
            next();
            return;
        }
        if (accept("do")) {
            scopedBlock();
            accept("end");
            return;
        }
        if (accept("while")) {
            expr();
            accept("do");
            loops_++;
            scopedBlock();
            loops_--;
            accept("end");
            return;
        }
        if (accept("repeat")) {
            loops_++;
            scopes_.emplace_back();
            block();
            accept("until");
            expr();
            scopes_.pop_back();
            loops_--;
            return;
        }
        if (accept("if")) {
            expr();
            accept("then");
            scopedBlock();
            while (accept("elseif")) {
                expr();
                accept("then");
                scopedBlock();
            }
            if (accept("else")) {
                scopedBlock();
            }
            accept("end");
            return;
        }
        if (accept("for")) {
            forStatement();
            return;
        }
        if (accept("function")) {
            // function a.b.c:m(...)
            std::string name = cur().text;
            next();
            Ref r;
            r.kind = Ref::Name;
            r.name = name;
            Val base = lookup(name);
            bool method = false;
            while (is(".") || is(":")) {
                method = is(":");
                next();
                std::string k = cur().text;
                next();
                r = {Ref::Field, "", base, true, k, Val(), line};
                base = index(base, &k, Val(), line);
            }
            Val f = funcBody(method);
            assign(r, f, line);
            return;
        }
        if (accept("local")) {
            if (accept("function")) {
                std::string name = cur().text;
                next();
                declare(name, Val());  // visible in its own body
                Val f = funcBody(false);
                declare(name, f);
                return;
            }
            std::vector<std::string> names;
            do {
                if (cur().type == T::Name) {
                    names.push_back(cur().text);
                }
                next();
            } while (accept(","));
            std::vector<Val> vals;
            if (accept("=")) {
                vals = exprList();
            }
            for (size_t i = 0; i < names.size(); i++) {
                Val v;
                if (i < vals.size()) {
                    v = vals[i];
                } else if (!vals.empty()) {
                    v = vals.back();  // f() giving several values
                    v.kind = v.kind == Val::Func ? Val::Plain : v.kind;
                }
                declare(names[i], v);
            }
            return;
        }
        // Assignment or call.
        std::vector<Ref> targets;
        Ref r;
        suffixedExp(&r);
        if (!is("=") && !is(",")) {
            return;  // a call statement, evaluated already
        }
        targets.push_back(r);
        while (accept(",")) {
            Ref more;
            suffixedExp(&more);
            targets.push_back(more);
        }
        if (!accept("=")) {
            return;
        }
        std::vector<Val> vals = exprList();
        for (size_t i = 0; i < targets.size(); i++) {
            Val v = i < vals.size() ? vals[i]
                                    : (vals.empty() ? Val() : vals.back());
            assign(targets[i], v, line);
        }
    }

    void forStatement()
    {
        std::vector<std::string> names;
        do {
            if (cur().type == T::Name) {
                names.push_back(cur().text);
            }
            next();
        } while (accept(","));
        scopes_.emplace_back();
        if (accept("=")) {
            exprList();
            for (const auto &n : names) {
                declare(n, Val());
            }
        } else {
            accept("in");
            std::vector<Val> it = exprList();
            Val all;
            for (const auto &v : it) {
                all = join(all, v);
            }
            for (const auto &n : names) {
                declare(n, all);
            }
        }
        accept("do");
        loops_++;
        scopedBlock();
        loops_--;
        accept("end");
        scopes_.pop_back();
    }

    void assign(const Ref &r, const Val &v, int line)
    {
        if (r.kind == Ref::Name) {
            assignName(r.name, v);
            return;
        }
        if (r.kind != Ref::Field) {
            return;
        }
        if (r.base.path == "ngx.header") {
            std::string k = lower(r.key);
            if (r.key_known && (k == "content_type" || k == "content-type")) {
                facts_.content_type_line = line;
                facts_.content_type = v.is_str ? v.str : "";
            }
            if (taintOf(v) & kHeader) {
                report("header-injection", line,
                       "response header " + (r.key_known ? r.key : "[?]")
                           + " is set from " + whyOf(v));
            } else if (taintOf(r.keyval) & kHeader) {
                report("header-injection", line,
                       "response header name comes from " + whyOf(r.keyval));
            }
            return;
        }
        if (r.base.path == "ngx.ctx") {
            if (taintOf(v)) {
                facts_.tainted_ctx.push_back(r.key_known ? r.key : "?");
            }
            return;
        }
        if (r.base.path == "ngx.var") {
            if (taintOf(v) & kTarget) {
                facts_.tainted_var_writes.push_back(
                    {r.key_known ? r.key : "?", line});
            }
            return;
        }
        if (r.base.kind == Val::Table && r.base.fields) {
            std::string k = r.key_known ? r.key : "?";
            if (r.key_known || taintOf(v)) {
                Val &slot = (*r.base.fields)[k];
                slot = r.key_known ? v : join(slot, v);
            }
        }
    }
};

}  // namespace


LuaFacts analyzeLua(const std::string &code, const LuaOptions &opts)
{
    Analyzer a(tokenize(code), opts);
    return a.run();
}

}  // namespace luaguard::audit
