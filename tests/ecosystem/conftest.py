"""The ecosystem suite (`make ecosystem`): real OpenResty libraries from
$ECOSYSTEM (default ../shared/ecosystem) used as their READMEs show, on
luaguard and on Debian's lua-nginx-module side by side. It reuses the e2e
harness and its `nginx` fixture; each test's outcome per library and module
is written to $ECOSYSTEM_RESULTS (JSON) for scripts/ecosystem-matrix.py."""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
E2E = HERE.parent / "e2e"
REPO = HERE.parents[1]
sys.path.insert(0, str(E2E))

from harness import free_port  # noqa: E402

# The e2e fixtures themselves (nginx, nginx_conf, netns), not copies.
_spec = importlib.util.spec_from_file_location("e2e_conftest",
                                               E2E / "conftest.py")
_e2e = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_e2e)
nginx = _e2e.nginx
nginx_conf = _e2e.nginx_conf

ECOSYSTEM = Path(os.environ.get("ECOSYSTEM", REPO.parent / "shared" /
                                "ecosystem")).resolve()
MODULES = ["luaguard", "reference"]
RESULTS = {}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "library(name, deps, exercised): the ecosystem library a "
        "test exercises, the other ecosystem folders it needs on "
        "lua_package_path, and what it exercises (one line each)")


@pytest.fixture(params=MODULES)
def module(request):
    return request.param


@pytest.fixture
def lib(request):
    """The library folder of the test's `library` marker; the test is
    skipped when $ECOSYSTEM does not hold it or a dependency."""
    m = request.node.get_closest_marker("library")
    for name in [m.args[0], *m.kwargs.get("deps", ())]:
        if not (ECOSYSTEM / name / "lib").is_dir():
            pytest.skip(f"{ECOSYSTEM / name} is absent")
    return ECOSYSTEM / m.args[0]


def package_path(names, extra=()):
    paths = [str(ECOSYSTEM / n / "lib" / "?.lua") for n in names]
    paths += [str(ECOSYSTEM / n / "lib" / "?" / "init.lua") for n in names]
    return ";".join([*paths, *extra, "/usr/share/lua/5.1/?.lua", ";"])


@pytest.fixture
def serve(request, nginx, module):
    """serve(server=..., http=..., cpath=...) starts nginx on the test's
    module with the library and its dependencies on lua_package_path, as
    the READMEs say to configure it."""
    m = request.node.get_closest_marker("library")
    names = [m.args[0], *m.kwargs.get("deps", ())]

    def start(server="", http="", cpath=None, **kw):
        conf = f'lua_package_path "{package_path(names)}";\n'
        if cpath:
            conf += f'lua_package_cpath "{cpath};;";\n'
        return nginx(module=module, server=server, http=conf + http, **kw)

    return start


def wait_port(port, proc, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{proc.args[0]} did not listen on {port}")


def daemon(argv, port, tmp_path):
    log = open(tmp_path / (Path(argv[0]).name + ".log"), "w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    try:
        wait_port(port, proc)
    except RuntimeError:
        proc.kill()
        proc.wait()
        raise
    return proc


def stop(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def redis_server(tmp_path):
    """A redis-server of its own on loopback, nothing persisted: yields its
    port."""
    port = free_port()
    p = daemon(["/usr/bin/redis-server", "--port", str(port), "--bind",
                "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(tmp_path)], port, tmp_path)
    yield port
    stop(p)


@pytest.fixture
def memcached_server(tmp_path):
    port = free_port()
    argv = ["/usr/bin/memcached", "-l", "127.0.0.1", "-p", str(port),
            "-U", "0", "-m", "16"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]      # memcached refuses root otherwise
    p = daemon(argv, port, tmp_path)
    yield port
    stop(p)


@pytest.fixture(scope="session")
def restysignal():
    """librestysignal.so, which lua-resty-signal loads from
    lua_package_cpath: the ecosystem folder ships the Lua part only, so the
    suite builds the one function the Lua part declares. In a directory
    of its own readable by nginx's workers (they do not run as root, and
    pytest's tmp_path is private). Yields the cpath entry."""
    if not shutil.which("gcc"):
        pytest.skip("no gcc to build librestysignal.so")
    out = Path(tempfile.mkdtemp(prefix="luaguard-eco-"))
    out.chmod(0o755)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o",
                    str(out / "librestysignal.so"),
                    str(HERE / "restysignal.c")], check=True)
    yield str(out / "?.so")
    shutil.rmtree(out)


# ---- results for the matrix ----

def _short(rep, call):
    if call.excinfo is not None:
        text = call.excinfo.exconly()
    else:
        text = rep.longreprtext
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = " ".join(lines[:3])
    return text[:300]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    m = item.get_closest_marker("library")
    if m is None or not hasattr(item, "callspec"):
        return
    modname = item.callspec.params.get("module")
    key = f"{m.args[0]}|{modname}"
    r = RESULTS.setdefault(key, {
        "library": m.args[0], "module": modname, "outcome": "pass",
        "message": "", "test": item.nodeid,
        "deps": list(m.kwargs.get("deps", ())),
        "exercised": list(m.kwargs.get("exercised", ()))})
    if rep.skipped and r["outcome"] == "pass":
        r["outcome"], r["message"] = "skip", _short(rep, call)
    elif rep.failed and r["outcome"] != "fail":
        where = "" if rep.when == "call" else f"({rep.when}) "
        r["outcome"], r["message"] = "fail", where + _short(rep, call)


def pytest_sessionfinish(session):
    out = os.environ.get("ECOSYSTEM_RESULTS")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(
            {"ecosystem": str(ECOSYSTEM),
             "results": sorted(RESULTS.values(),
                               key=lambda r: (r["library"], r["module"]))},
            indent=1))
