"""luaguard-audit (docs/audit.md) on the corpus under tests/audit/cases.

Every finding the corpus expects is marked where it must be reported:
`-- expect: RULE` on a Lua line, `# expect: RULE` on a configuration line
(several rules: `expect: a, b`). A case reports exactly its markers, with
file and line: the vulnerable and obfuscated variants theirs, the fixed
twins none. No nginx runs here: the checker is static."""

import glob
import json
import os
import re
import shutil
import subprocess
from collections import Counter

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
AUDIT = os.environ.get("LUAGUARD_AUDIT",
                       os.path.join(ROOT, "build", "luaguard-audit"))
CASES = os.path.join(ROOT, "tests", "audit", "cases")
MARK = re.compile(r"(?:--|#)\s*expect(-miss|-fp)?:\s*([a-z0-9, -]+)")


def audit(*args, cwd=ROOT):
    return subprocess.run([AUDIT, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def sarif(conf, *extra):
    r = audit("--no-luacheck", "--format", "sarif", "--fail-on", "never",
              *extra, conf)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def results(doc):
    found = set()
    for res in doc["runs"][0]["results"]:
        loc = res["locations"][0]["physicalLocation"]
        uri = loc["artifactLocation"]["uri"]
        path = uri[len("file://"):] if uri.startswith("file://") else \
            os.path.join(ROOT, uri)
        line = loc.get("region", {}).get("startLine", 0)
        found.add((os.path.normpath(path), line, res["ruleId"]))
    return found


def markers(path, kind=""):
    """kind "": findings that must be reported; "-miss": known false
    negatives (counted in recall, not asserted); "-fp": known false
    positives (counted in precision, not asserted)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            m = MARK.search(text)
            if m and (m.group(1) or "") == kind:
                for rule in m.group(2).split(","):
                    if rule.strip():
                        out.add((os.path.normpath(path), n, rule.strip()))
    return out


def files_of(conf):
    """The case file and what it pulls in (includes, *_by_lua_file)."""
    files = [conf]
    text = open(conf, encoding="utf-8").read()
    for pat in re.findall(r"^\s*include\s+(\S+?)\s*;", text, re.M):
        files += sorted(glob.glob(os.path.join(CASES, pat)))
    for p in re.findall(r"_by_lua_file\s+['\"]?([^;'\"$]+?)['\"]?\s*;", text):
        if os.path.isfile(os.path.join(CASES, p)):
            files.append(os.path.join(CASES, p))
    for m in re.findall(r"require[ (]*[\"']([\w.]+)[\"']", text):
        p = os.path.join(CASES, "lua", m.replace(".", "/") + ".lua")
        if os.path.isfile(p):
            files.append(p)
    return files


def case_files():
    return sorted(glob.glob(os.path.join(CASES, "*.conf")))


def test_corpus_findings_precision_and_recall(capsys):
    tp, fp, fn = Counter(), Counter(), Counter()
    wrong = []
    clean = fixed = 0
    for conf in case_files():
        expected, misses, fps = set(), set(), set()
        for f in files_of(conf):
            expected |= markers(f)
            misses |= markers(f, "-miss")
            fps |= markers(f, "-fp")
        got = results(sarif(conf))
        name = os.path.basename(conf)
        if "fixed" in name:
            fixed += 1
            clean += not (got - expected)
        for e in expected & got:
            tp[e[2]] += 1
        for e in got - expected:
            fp[e[2]] += 1
            if e not in fps:
                wrong.append(f"{name}: unexpected {e[2]} at "
                             f"{os.path.relpath(e[0], ROOT)}:{e[1]}")
        for e in (expected | misses) - got:
            fn[e[2]] += 1
            if e not in misses:
                wrong.append(f"{name}: missed {e[2]} at "
                             f"{os.path.relpath(e[0], ROOT)}:{e[1]}")
        for e in misses & got:
            wrong.append(f"{name}: {e[2]} at {e[1]} is found now: make it "
                         f"an expect marker")
    rules = sorted(set(tp) | set(fp) | set(fn))
    t, p, n = sum(tp.values()), sum(fp.values()), sum(fn.values())
    precision = t / (t + p) if t + p else 1.0
    recall = t / (t + n) if t + n else 1.0
    with capsys.disabled():  # printed on success too
        print(f"\n{'rule':28} {'tp':>4} {'fp':>4} {'fn':>4}")
        for r in rules:
            print(f"{r:28} {tp[r]:4} {fp[r]:4} {fn[r]:4}")
        print(f"corpus: {len(case_files())} cases, precision "
              f"{precision:.3f}, recall {recall:.3f}; fixed twins without "
              f"a finding of their own: {clean}/{fixed}")
    assert not wrong, "\n".join(wrong)


def test_corpus_has_every_rule_three_ways():
    r = audit("--list-rules")
    assert r.returncode == 0
    ids = [line.split("\t")[0] for line in r.stdout.splitlines()]
    assert "code-injection" in ids and "xss" in ids
    names = {os.path.basename(c) for c in case_files()}
    assert len(names) >= 40
    missing = []
    for rule in ids:
        if rule == "luacheck":
            continue  # its own test; needs Debian's lua-check
        for kind in ("vuln", "fixed", "obfuscated"):
            if f"{rule}_{kind}.conf" not in names:
                missing.append(f"{rule}_{kind}.conf")
    assert not missing, missing
    # Each vulnerable and obfuscated case carries its rule's marker.
    for rule in ids:
        for kind in ("vuln", "obfuscated"):
            conf = os.path.join(CASES, f"{rule}_{kind}.conf")
            if not os.path.exists(conf):
                continue
            marks = set()
            for f in files_of(conf):
                marks |= {m[2] for m in markers(f)}
            assert rule in marks, conf


def test_sarif_has_the_required_fields_of_2_1_0():
    # The official schema needs the network; the fields SARIF 2.1.0
    # requires (and that CI annotators read) are checked here instead.
    doc = sarif(os.path.join(CASES, "code-injection_vuln.conf"))
    assert doc["version"] == "2.1.0"
    assert "sarif-2.1.0" in doc["$schema"]
    assert isinstance(doc["runs"], list) and len(doc["runs"]) == 1
    driver = doc["runs"][0]["tool"]["driver"]
    assert driver["name"] == "luaguard-audit"
    rule_ids = [r["id"] for r in driver["rules"]]
    assert len(rule_ids) == len(set(rule_ids))
    for r in driver["rules"]:
        assert r["shortDescription"]["text"]
        assert r["defaultConfiguration"]["level"] in ("error", "warning",
                                                      "note")
    res = doc["runs"][0]["results"]
    assert res, "the vulnerable case has findings"
    for x in res:
        assert x["ruleId"] in rule_ids
        assert rule_ids[x["ruleIndex"]] == x["ruleId"]
        assert x["level"] in ("error", "warning", "note", "none")
        assert x["message"]["text"]
        assert x["locations"]
        phys = x["locations"][0]["physicalLocation"]
        assert phys["artifactLocation"]["uri"]
        assert phys["region"]["startLine"] >= 1
    inj = [x for x in res if x["ruleId"] == "code-injection"]
    assert inj[0]["level"] == "error"
    assert inj[0]["locations"][0]["physicalLocation"]["artifactLocation"][
        "uri"] == "tests/audit/cases/code-injection_vuln.conf"


# The parts of the SARIF 2.1.0 schema (sarif-schema-2.1.0.json, OASIS) a
# result needs, transcribed: the official file needs the network.
SARIF_SUBSET = {
    "type": "object",
    "required": ["version", "runs"],
    "properties": {
        "version": {"enum": ["2.1.0"]},
        "runs": {"type": "array", "items": {
            "type": "object", "required": ["tool"],
            "properties": {
                "tool": {"type": "object", "required": ["driver"],
                         "properties": {"driver": {
                             "type": "object", "required": ["name"],
                             "properties": {
                                 "name": {"type": "string"},
                                 "rules": {"type": "array", "items": {
                                     "type": "object", "required": ["id"],
                                 }},
                             }}}},
                "results": {"type": "array", "items": {
                    "type": "object", "required": ["message"],
                    "properties": {
                        "ruleId": {"type": "string"},
                        "ruleIndex": {"type": "integer", "minimum": -1},
                        "level": {"enum": ["none", "note", "warning",
                                           "error"]},
                        "message": {"anyOf": [{"required": ["text"]},
                                              {"required": ["id"]}]},
                        "locations": {"type": "array", "items": {
                            "type": "object", "properties": {
                                "physicalLocation": {
                                    "type": "object", "properties": {
                                        "artifactLocation": {
                                            "type": "object",
                                            "properties": {"uri": {
                                                "type": "string",
                                                "format": "uri-reference",
                                            }}},
                                        "region": {
                                            "type": "object",
                                            "properties": {"startLine": {
                                                "type": "integer",
                                                "minimum": 1}}},
                                    }}}}},
                    }}},
            }}},
    },
}


def test_sarif_validates_against_the_schema_subset():
    jsonschema = pytest.importorskip("jsonschema")
    for name in ("code-injection_vuln.conf", "config-error_vuln.conf",
                 "shared-dict-everywhere_vuln.conf"):
        jsonschema.validate(sarif(os.path.join(CASES, name)), SARIF_SUBSET)


def test_text_output_names_file_line_severity_rule_and_fix():
    r = audit("--no-luacheck", os.path.join(CASES, "xss_vuln.conf"))
    lines = r.stdout.splitlines()
    assert re.match(r"^\S+/tests/audit/cases/xss_vuln\.conf:7: high xss: "
                    r"ngx\.say\(\) writes ngx\.var\.arg_q", lines[0]), lines
    assert lines[1].startswith("    fix: ")


def test_relative_config_path_and_prefix():
    # $prefix and the default prefix are absolute, as nginx -p makes them,
    # whatever path the configuration was given by.
    r = audit("--no-luacheck", "--fail-on", "never",
              "tests/audit/cases/code-injection_module.conf")
    assert "package-path-relative" not in r.stdout, r.stdout
    assert "/tests/audit/cases/lua/handlers.lua:10: high code-injection:" \
        in r.stdout, r.stdout


def test_exit_status_follows_fail_on():
    vuln = os.path.join(CASES, "code-injection_vuln.conf")
    medium = os.path.join(CASES, "code-cache-off_vuln.conf")
    fixed = os.path.join(CASES, "code-injection_fixed.conf")
    assert audit("--no-luacheck", vuln).returncode == 1  # default: high
    assert audit("--no-luacheck", "--fail-on", "never", vuln).returncode == 0
    assert audit("--no-luacheck", fixed).returncode == 0
    assert audit("--no-luacheck", "--fail-on", "low", fixed).returncode == 0
    assert audit("--no-luacheck", medium).returncode == 0
    assert audit("--no-luacheck", "--fail-on", "medium",
                 medium).returncode == 1
    assert audit("--fail-on", "severe", vuln).returncode == 2
    assert audit().returncode == 2
    missing = audit("tests/audit/cases/no-such.conf")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_explain_prints_why_and_fix():
    r = audit("--explain", "ssrf")
    assert r.returncode == 0
    assert "Why it matters:" in r.stdout and "lua_egress" in r.stdout
    assert "Fix:" in r.stdout
    bad = audit("--explain", "no-such-rule")
    assert bad.returncode == 2 and "no rule" in bad.stderr


def test_example_app_has_no_high_finding():
    r = audit("--no-luacheck", "-D", f"EXAMPLES={ROOT}/examples",
              "-D", "PREFIX=/tmp/luaguard-example", "-D", "PORT=8080",
              "examples/nginx.conf")
    assert r.returncode == 0, r.stdout
    assert " high " not in r.stdout, r.stdout
    # It does see the example's Lua, modules included: the services
    # echo the request URI into a JSON (not HTML) response.
    assert "examples/lua/gateway/services.lua:21: low xss:" in r.stdout


@pytest.mark.skipif(shutil.which("luacheck") is None,
                    reason="Debian's lua-check is not installed")
def test_luacheck_findings_are_merged_at_config_lines():
    r = audit("--format", "sarif", "--fail-on", "never",
              os.path.join(CASES, "lua-syntax_fixed.conf"))
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert not [x for x in doc["runs"][0]["results"]
                if x["ruleId"] == "luacheck"]
    r = audit("--fail-on", "never", "-D", f"EXAMPLES={ROOT}/examples",
              "-D", "PREFIX=/tmp/x", "-D", "PORT=8080", "examples/nginx.conf")
    # The example's /demo/global location sets a global on purpose; the
    # one its init handler sets (app) is known to the later handlers.
    assert ("examples/nginx.conf:201: low luacheck: W111: setting "
            "non-standard global variable 'leaked'") in r.stdout
    assert "variable 'app'" not in r.stdout
