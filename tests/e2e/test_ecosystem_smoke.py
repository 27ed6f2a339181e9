"""`make ecosystem` is too slow for `make test`: this runs one library of
it (lua-tablepool) on both modules, so a change that breaks the suite's
collection, fixtures or result file shows up here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ECOSYSTEM = Path(os.environ.get("ECOSYSTEM",
                                REPO.parent / "shared" / "ecosystem"))


@pytest.mark.skipif(not (ECOSYSTEM / "lua-tablepool" / "lib").is_dir(),
                    reason=f"no {ECOSYSTEM}/lua-tablepool")
def test_ecosystem_suite_runs_one_library(tmp_path):
    results = tmp_path / "ecosystem.json"
    env = dict(os.environ, ECOSYSTEM=str(ECOSYSTEM),
               ECOSYSTEM_RESULTS=str(results))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--basetemp", str(tmp_path / "t"), "-k", "test_tablepool",
         str(REPO / "tests" / "ecosystem")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    got = json.loads(results.read_text())["results"]
    assert [(x["library"], x["module"], x["outcome"]) for x in got] == [
        ("lua-tablepool", "luaguard", "pass"),
        ("lua-tablepool", "reference", "pass")]
    assert got[0]["exercised"]
