// luaguard-audit: the rule catalogue and the two output formats.
#pragma once

#include <string>
#include <vector>

namespace luaguard::audit {

enum class Severity { Info, Low, Medium, High };

struct Rule {
    const char *id;
    Severity severity;      // the usual one; a finding may lower it
    const char *title;
    const char *why;        // --explain: what it exposes
    const char *fix;
};

struct Finding {
    std::string rule;
    Severity severity;
    std::string file;
    int line;               // 0: the whole file
    std::string message;
};

const std::vector<Rule> &rules();
const Rule *findRule(const std::string &id);
const char *severityName(Severity s);
bool parseSeverity(const std::string &s, Severity *out);

std::string formatText(const std::vector<Finding> &findings);
std::string formatSarif(const std::vector<Finding> &findings);
std::string explain(const Rule &r);

}  // namespace luaguard::audit
