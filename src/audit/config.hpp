// luaguard-audit: the nginx side. Reads a configuration with its includes
// the way nginx tokenizes it, keeps every directive with file:line, and
// collects the Lua chunks with their phase, location and the effective
// luaguard settings there.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace luaguard::audit {

struct Directive {
    std::string name;
    std::vector<std::string> args;
    std::vector<int> arg_lines;           // where each argument starts
    std::string file;
    int line = 0;
    bool block = false;                   // had a { } body
    std::vector<Directive> children;
    // *_by_lua_block: the Lua text between the braces, which starts on
    // body_line of file.
    bool lua_block = false;
    std::string lua_body;
    int body_line = 0;
};

// The settings a location ends up with after nginx's merge
// (http -> server -> location, an inner level overriding).
struct Settings {
    // Single-valued directives, by name; absent when nobody set them.
    std::map<std::string, const Directive *> values;
    // lua_egress rules are inherited as a whole (a level with rules of
    // its own does not see its parent's).
    std::vector<const Directive *> egress_rules;
    bool own_egress_rules = false;

    const Directive *get(const std::string &name) const;
    // First argument of the directive, or def when it is absent.
    std::string value(const std::string &name, const std::string &def) const;
};

struct Scope;  // a server, location or upstream block

struct Chunk {
    std::string directive;     // e.g. content_by_lua_block
    std::string phase;         // e.g. content
    std::string kind;          // block, string or file
    std::string code;
    std::string file;          // where code line 1 is
    int line = 1;              // config line of code line 1
    const Directive *where = nullptr;
    std::string location;      // "server X, location /y" for messages
    std::shared_ptr<Scope> scope;
    bool loaded = true;        // false: a file that could not be read
    std::string path;          // *_by_lua_file: the path argument
    bool args_from_vars = false;  // set_by_lua with $variables as args
};

struct Scope {
    std::string kind;          // http, server, location, upstream
    std::string label;
    const Directive *dir = nullptr;
    std::shared_ptr<Scope> parent;
    Settings settings;
    std::vector<const Directive *> directives;  // its own, if bodies too
    std::vector<Chunk *> chunks;
};

struct Problem {
    std::string file;
    int line;
    std::string message;
};

class Config {
 public:
    // Substitutions applied to the text before parsing, as the example's
    // run script does with sed (PREFIX, EXAMPLES, ...).
    std::vector<std::pair<std::string, std::string>> defines;
    std::string prefix;        // nginx -p; where *_by_lua_file resolve

    // False when the file cannot be read at all.
    bool load(const std::string &path);

    std::vector<Directive> root;
    std::vector<std::unique_ptr<Chunk>> chunks;
    std::vector<std::shared_ptr<Scope>> scopes;
    std::vector<Problem> problems;    // unreadable files, bad syntax
    // http-level directives (lua_package_path, lua_shared_dict, ...)
    std::vector<const Directive *> http_directives;
    std::string conf_dir;

 private:
    bool parseFile(const std::string &path, std::vector<Directive> *out,
                   int depth);
    bool parseText(const std::string &text, const std::string &file,
                   std::vector<Directive> *out, int depth);
    void walk(const std::vector<Directive> &list,
              const std::shared_ptr<Scope> &scope);
    void addChunk(const Directive &d, const std::shared_ptr<Scope> &scope);
};

std::string readFile(const std::string &path, bool *ok);
std::string phaseOf(const std::string &directive);
bool hasVariable(const std::string &s);

}  // namespace luaguard::audit
