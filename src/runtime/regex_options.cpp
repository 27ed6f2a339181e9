#include "runtime/regex_options.hpp"

namespace luaguard::regex {

bool parseOptions(std::string_view opts, Options *out, char *bad)
{
    Options o;
    for (char c : opts) {
        switch (c) {
        case 'a': o.flags |= kAnchored; break;
        case 'd': o.flags |= kDfa; break;
        case 'D': o.flags |= kDupNames; break;
        case 'i': o.flags |= kCaseless; break;
        case 'j': o.flags |= kJit; break;
        case 'J': o.flags |= kJsCompat; break;
        case 'm': o.flags |= kMultiline; break;
        case 'o': o.once = true; break;
        case 's': o.flags |= kDotAll; break;
        case 'u': o.flags |= kUtf; break;
        case 'U': o.flags |= kUtf; o.no_utf_check = true; break;
        case 'x': o.flags |= kExtended; break;
        default:
            *bad = c;
            return false;
        }
    }
    *out = o;
    return true;
}

}  // namespace luaguard::regex
