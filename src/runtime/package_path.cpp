#include "runtime/package_path.hpp"

namespace luaguard {

std::string expandPackagePath(std::string_view configured,
                              std::string_view defaults,
                              std::string_view prefix)
{
    std::string out;
    size_t i = 0;

    while (i < configured.size()) {
        std::string_view rest = configured.substr(i);

        if (rest.substr(0, 2) == ";;") {
            out.push_back(';');
            out.append(defaults);
            out.push_back(';');
            i += 2;
        } else if (rest.substr(0, 9) == "${prefix}") {
            out.append(prefix);
            i += 9;
        } else if (rest.substr(0, 7) == "$prefix") {
            out.append(prefix);
            i += 7;
        } else {
            out.push_back(configured[i]);
            i++;
        }
    }

    // Keep the separator shape Lua expects: no empty leading entry, and a
    // ";;" at the very start or end must not leave ";;" behind.
    while (out.size() >= 2 && out.compare(out.size() - 2, 2, ";;") == 0) {
        out.pop_back();
    }
    if (!out.empty() && out.front() == ';') {
        out.erase(0, 1);
    }
    if (!out.empty() && out.back() == ';') {
        out.pop_back();
    }
    return out;
}

}  // namespace luaguard
