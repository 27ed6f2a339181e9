"""The Debian package `make deb` builds (packaging/build-deb.sh): laid out
and scripted as Debian's libnginx-mod-* packages, clean for lintian, a
module the stock nginx serves with once unpacked, and an `apt install`
that `apt purge` takes back completely. Debian's own
libnginx-mod-http-lua, installed next to it as the tests' oracle, is the
model and must survive all of it."""

import os
import re
import subprocess
from pathlib import Path

import pytest

import harness
from harness import MODULE, NGINX, REPO

# The package is what `make deb` ships (the release module, stripped); a
# sanitizer build is not packaged.
pytestmark = pytest.mark.skipif(harness.ASAN, reason="packages the release "
                                "module, not a sanitizer build")

PKG = "libnginx-mod-http-luaguard"
VERSION = "0.0.0~test"
LINK = Path("/etc/nginx/modules-enabled/40-mod-http-luaguard.conf")
DEBIAN_SCRIPTS = Path("/var/lib/dpkg/info")
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
# Other sessions may hold the dpkg lock for a while.
APT = ["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=600"]


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(REPO / "packaging" / "build-deb.sh"), MODULE,
                        VERSION, str(out)], capture_output=True, text=True)
    # lintian runs inside: its errors fail the build.
    assert r.returncode == 0, r.stdout + r.stderr
    path = out / f"{PKG}_{VERSION}_amd64.deb"
    assert path.exists(), r.stdout
    return path


def fields(deb):
    text = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True,
                          text=True, check=True).stdout
    return dict(re.findall(r"^([\w-]+): (.*)$", text, re.M))


def contents(deb):
    """Paths of the package's files and links, as installed."""
    text = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True,
                          text=True, check=True).stdout
    return [line.split()[5][1:] for line in text.splitlines()
            if not line.startswith("d")]


def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", pkg],
                       capture_output=True, text=True)
    return r.stdout == "installed"


def script_body(path):
    """A maintainer script without comments and layout, with the module's
    names made generic: what is left is what it does."""
    text = path.read_text()
    text = text.replace("mod-http-lua.conf:50-mod-http-lua.conf",
                        "CONFPAIR")
    text = text.replace("mod-http-luaguard.conf:40-mod-http-luaguard.conf",
                        "CONFPAIR")
    lines = [" ".join(ln.split("#", 1)[0].split())
             if not ln.startswith("#!") else ln for ln in text.splitlines()]
    return [ln for ln in lines if ln]


def test_package_is_laid_out_as_debians_nginx_modules(deb):
    f = fields(deb)
    assert f["Package"] == PKG and f["Version"] == VERSION
    assert f["Architecture"] == "amd64"
    depends = [d.strip() for d in f["Depends"].split(",")]
    # The exact ABI of the stock nginx, as Debian's module packages say it.
    assert "nginx-abi-1.22.1-7" in depends
    assert "lua-cjson" in f["Recommends"]
    # Installing it must not take lua-nginx-module away.
    for rel in ("Conflicts", "Breaks", "Replaces"):
        assert "libnginx-mod-http-lua" not in f.get(rel, "")
    # ... and says how the two share one nginx.
    description = subprocess.run(["dpkg-deb", "-f", str(deb), "Description"],
                                 capture_output=True, text=True,
                                 check=True).stdout
    assert "libnginx-mod-http-lua" in description
    files = contents(deb)
    assert "/usr/lib/nginx/modules/ngx_http_luaguard_module.so" in files
    assert "/usr/share/nginx/modules-available/mod-http-luaguard.conf" in files
    assert f"/usr/share/doc/{PKG}/copyright" in files
    # The link is the maintainer scripts' business, never a shipped file.
    assert not any(p.startswith("/etc/") for p in files)


@pytest.mark.parametrize("script", ["postinst", "prerm", "postrm"])
def test_maintainer_scripts_do_what_debians_do(script):
    theirs = DEBIAN_SCRIPTS / f"libnginx-mod-http-lua.{script}"
    if not theirs.exists():
        pytest.skip("libnginx-mod-http-lua is not installed")
    ours = REPO / "packaging" / "debian" / script
    assert script_body(ours) == script_body(theirs)


def test_unpacked_module_serves_with_the_stock_nginx(deb, nginx, tmp_path,
                                                     monkeypatch):
    root = tmp_path / "root"
    subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    modules = root / "usr" / "lib" / "nginx" / "modules"
    snippet = (root / "usr" / "share" / "nginx" / "modules-available"
               / "mod-http-luaguard.conf")

    # The snippet as the stock nginx.conf includes it: "modules/" is
    # relative to nginx's prefix, where Debian has a link to the modules.
    prefix = tmp_path / "prefix"
    (prefix / "logs").mkdir(parents=True)
    (prefix / "modules").symlink_to(modules)
    conf = prefix / "nginx.conf"
    conf.write_text(f"include {snippet};\nerror_log {prefix}/logs/e.log;\n"
                    f"pid {prefix}/nginx.pid;\nevents {{}}\n"
                    "http { server { location / {"
                    " content_by_lua_block { ngx.say('hi') } } } }\n")
    r = subprocess.run([NGINX, "-t", "-p", str(prefix), "-c", str(conf)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    monkeypatch.setattr(harness, "MODULE", str(
        modules / "ngx_http_luaguard_module.so"))
    n = nginx(http="lua_shared_dict d 1m;", server="""
        location /t { content_by_lua_block {
            ngx.shared.d:set("k", "from the package")
            ngx.say(ngx.shared.d:get("k"), " ", type(ngx.req.lua_usage))
        } }""")
    assert n.get("/t").text == "from the package function\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="apt install needs root")
def test_apt_install_then_purge_leaves_nothing(deb):
    oracle = installed("libnginx-mod-http-lua")
    if installed(PKG):
        subprocess.run(APT + ["purge", PKG], env=APT_ENV, check=True,
                       capture_output=True)
    files = contents(deb)
    for p in files:
        assert not Path(p).exists(), f"{p} exists before the install"
    try:
        r = subprocess.run(APT + ["install", str(deb)], env=APT_ENV,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert installed(PKG)
        for p in files:
            assert Path(p).exists(), f"{p} was not installed"
        assert LINK.is_symlink()
        assert os.readlink(LINK) == (
            "/usr/share/nginx/modules-available/mod-http-luaguard.conf")
        # The stock configuration loads it (next to lua-nginx-module's
        # link, when that is installed).
        r = subprocess.run([NGINX, "-t"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    finally:
        r = subprocess.run(APT + ["purge", PKG], env=APT_ENV,
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not installed(PKG)
    left = [p for p in files if Path(p).exists()]
    left += [str(p) for p in (LINK, Path(f"{LINK}.removed"),
                              Path(f"/usr/share/doc/{PKG}"))
             if p.exists() or p.is_symlink()]
    assert not left, f"left after purge: {left}"
    r = subprocess.run(["dpkg-query", "-W", PKG], capture_output=True)
    assert r.returncode != 0, "dpkg still knows the package"
    assert installed("libnginx-mod-http-lua") == oracle
