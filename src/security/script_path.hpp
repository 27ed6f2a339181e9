// Loading *_by_lua_file scripts safely. A path built from request data
// (nginx variables) must stay inside a root directory: no NUL byte, no
// ".." segment, nothing outside the root, and no symlink leading out of it
// (checked by the kernel while opening, so a swap during the request
// cannot race the check). A script anyone may rewrite is not run.
#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>
#include <vector>

namespace luaguard::script {

enum class Writable { Off, World, Group };

struct Policy {
    std::string        root;       // absolute, no trailing slash
    Writable           writable = Writable::World;
    std::vector<uid_t> owners;     // empty: any owner
};

enum class Verdict {
    Ok,
    NotFound,     // 404, as lua-nginx-module answers a missing file
    Forbidden,    // 503, as lua-nginx-module answers EACCES
    Refused,      // the policy refused it: 404 to the client, logged
    Unsafe,       // the file's permissions are unsafe: 500, logged
};

// For a path built from variables: the lexical checks and the path of the
// script relative to the root. `full` is absolute.
Verdict confine(std::string_view full, const Policy &policy,
                std::string *relative, std::string *why);

// Opens `relative` beneath the root (openat2 RESOLVE_BENEATH) or, for a
// path fixed in the configuration, `full` as it is; checks the result and
// reads it. `confined` selects the first.
Verdict load(const std::string &full, const std::string &relative,
             bool confined, const Policy &policy, std::string *code,
             std::string *why);

}  // namespace luaguard::script
