import pytest

from harness import Nginx


@pytest.fixture
def nginx(tmp_path, request):
    """Factory: nginx(server=..., http=..., main=..., workers=1,
    module="luaguard"|"reference") starts a server. Every server started
    is stopped at teardown and its error log checked for alerts, crashes
    and sanitizer reports. Tests marked `workers_as_root` get `user root;`:
    their workers read modules and files from the test prefix, which is
    private to root."""
    started = []
    as_root = request.node.get_closest_marker("workers_as_root") is not None

    def start(**kw):
        if as_root:
            kw["main"] = "user root;\n" + kw.get("main", "")
        sub = tmp_path / f"n{len(started)}"
        n = Nginx(sub, **kw)
        started.append(n)
        return n.start()

    start.servers = started
    yield start
    problems = []
    for n in started:
        try:
            n.stop()
        except RuntimeError as e:
            problems.append(str(e))
        bad = n.fatal_lines()
        if bad:
            problems.append(f"{n.prefix}: " + "\n".join(bad[:20]))
    if problems:
        pytest.fail("nginx reported problems:\n" + "\n".join(problems))


@pytest.fixture
def nginx_conf(tmp_path):
    """Factory for configurations that are only tested (`nginx -t`)."""
    made = []

    def make(**kw):
        n = Nginx(tmp_path / f"t{len(made)}", **kw)
        made.append(n)
        return n

    return make


@pytest.fixture
def netns():
    """A private network namespace with lo up and the cloud metadata
    address on it: traffic to it never leaves the machine, even when the
    code under test is wrong. Yields its name."""
    import os
    import subprocess
    name = f"lgtest{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", "169.254.169.254/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name])
