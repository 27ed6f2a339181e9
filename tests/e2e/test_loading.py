"""Safe script loading: *_by_lua_file paths built from request data stay
under lua_file_root; scripts anyone may rewrite are not run; nginx -t warns
about unsafe module search paths."""

import os
import re
import threading

import pytest

FILES = {
    "lua/hello.lua": "ngx.say('hello from file')",
    "lua/sub/deep.lua": "ngx.say('deep')",
    "secret/secret.lua": "ngx.say('SECRET CODE RAN')",
}

SERVER = """
    location /f { content_by_lua_file lua/$arg_n.lua; }
    location /root { lua_file_root lua; content_by_lua_file $arg_p; }
"""


def start(nginx, **kw):
    kw.setdefault("files", FILES)
    # pytest's directories are root-only: the workers run as root here.
    kw.setdefault("main", "user root;")
    return nginx(server=kw.pop("server", SERVER), **kw)


@pytest.mark.asan_fast
def test_plain_file_loads(nginx):
    n = start(nginx)
    assert n.get("/f?n=hello").text == "hello from file\n"
    assert n.get("/f?n=sub/deep").text == "deep\n"


@pytest.mark.parametrize("arg", [
    "../secret/secret",             # plain traversal
    "sub/../../secret/secret",      # traversal after a real directory
    "%2e%2e/secret/secret",         # encoded: $arg_ is not decoded
    "%252e%252e/secret/secret",     # double-encoded
    "..%2fsecret%2fsecret",
])
def test_traversal_is_refused(nginx, arg):
    n = start(nginx)
    r = n.get("/f?n=" + arg)
    assert r.status == 404
    assert b"SECRET" not in r.body
    assert "SECRET CODE RAN" not in n.read_log()


def test_absolute_path_from_variable_is_refused(nginx):
    n = start(nginx)
    secret = n.prefix / "secret" / "secret.lua"
    r = n.get("/root?p=" + str(secret))
    assert r.status == 404
    n.wait_log(r'luaguard refused to load Lua file .*outside the Lua file root')
    r = n.get("/root?p=" + str(n.prefix / "lua" / "hello.lua"))
    assert r.text == "hello from file\n"


def test_nul_byte_is_refused(nginx):
    n = start(nginx)
    # nginx passes %00 in args through undecoded: $arg_p holds "%00"; a
    # literal NUL from set_by_lua is percent-encoded on its way into the
    # variable (a Lua-written variable may reach a header), so it never
    # reaches the loader either (the NUL check itself: script_path_test).
    n2 = start(nginx, server="""
        location /nul {
            set_by_lua_block $p { return "lua/hello.lua\\0.txt" }
            lua_file_root lua;
            content_by_lua_file $p;
        }
    """)
    r = n2.get("/nul")
    assert r.status == 404
    n2.wait_log(r'failed to load .*"[^"]*/lua/hello\.lua%00\.txt"|'
                r'lua/hello\.lua%00\.txt')


def test_symlink_out_of_root_is_refused(nginx):
    n = start(nginx)
    os.symlink(n.prefix / "secret", n.prefix / "lua" / "escape")
    # Relative: RESOLVE_BENEATH refuses absolute symlinks even when they
    # point inside the root.
    os.symlink("hello.lua", n.prefix / "lua" / "inside.lua")
    r = n.get("/f?n=escape/secret")
    assert r.status == 404
    n.wait_log(r"the path leaves the Lua file root")
    # A symlink that stays inside the root is fine.
    assert n.get("/f?n=inside").text == "hello from file\n"


def test_symlink_swap_during_requests_never_escapes(nginx):
    n = start(nginx, http="lua_code_cache off;")
    lua = n.prefix / "lua"
    (lua / "real").mkdir()
    (lua / "real" / "x.lua").write_text("ngx.say('inside')")
    link = lua / "swap"
    os.symlink(lua / "real", link)
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            tmp = lua / f"tmp{i}"
            target = n.prefix / "secret" if i % 2 else lua / "real"
            os.symlink(target, tmp)
            os.replace(tmp, link)
            i += 1

    t = threading.Thread(target=swapper)
    t.start()
    try:
        bodies = set()
        for _ in range(300):
            r = n.get("/f?n=swap/" + ("x" if _ % 2 else "secret"))
            bodies.add((r.status, r.body))
    finally:
        stop.set()
        t.join()
    assert all(b"SECRET" not in body for _, body in bodies)
    assert "SECRET CODE RAN" not in n.read_log()


@pytest.mark.parametrize("mode,policy,refused", [
    (0o646, "world", True),
    (0o664, "world", False),
    (0o664, "group", True),
    (0o646, "off", False),
])
def test_writable_scripts(nginx, mode, policy, refused):
    n = start(nginx, http=f"lua_file_check_writable {policy};")
    os.chmod(n.prefix / "lua" / "hello.lua", mode)
    r = n.get("/f?n=hello")
    if refused:
        assert r.status == 500
        n.wait_log(r"luaguard refused to load Lua file .*hello\.lua.*"
                   r"(world|group)-writable")
    else:
        assert r.text == "hello from file\n"


def test_writable_directory_is_refused(nginx):
    n = start(nginx)
    os.chmod(n.prefix / "lua" / "sub", 0o777)
    assert n.get("/f?n=sub/deep").status == 500
    n.wait_log(r'directory "[^"]*/lua/sub" is world-writable')


def test_fixed_path_world_writable_is_refused(nginx):
    n = start(nginx, server="location /x { content_by_lua_file lua/hello.lua; }")
    os.chmod(n.prefix / "lua" / "hello.lua", 0o666)
    assert n.get("/x").status == 500


APP_FILES = dict(FILES, **{"app/lua/x.lua": "ngx.say('app script')"})
APP_SERVER = """
    location /fixed { content_by_lua_file app/lua/x.lua; }
    location /confined {
        lua_file_root app/lua;
        content_by_lua_file app/lua/$arg_p;
    }
"""


@pytest.mark.parametrize("path", ["/fixed", "/confined?p=x.lua"])
@pytest.mark.parametrize("mode,refused", [
    (0o777, True),      # anyone may rename app/lua away and put theirs
    (0o1777, False),    # sticky: only the owner may
    (0o755, False),
])
def test_writable_ancestor_directory(nginx, path, mode, refused):
    """Every directory up to / counts, for fixed and confined paths alike
    (above lua_file_root too), as sshd checks authorized_keys."""
    n = start(nginx, files=APP_FILES, server=APP_SERVER)
    os.chmod(n.prefix / "app", mode)
    r = n.get(path)
    if refused:
        assert r.status == 500
        n.wait_log(r"luaguard refused to load Lua file .*x\.lua.*"
                   r'directory "[^"]*/app" is world-writable')
    else:
        assert r.text == "app script\n", n.read_log()


def test_directory_owners_count_with_lua_file_owners(nginx):
    """With lua_file_owners, a directory above the script that belongs
    to someone else (who could swap it) refuses the script."""
    n = start(nginx, files=APP_FILES, server=APP_SERVER,
              http="lua_file_owners root;")
    os.chown(n.prefix / "app", 65534, -1)
    assert n.get("/fixed").status == 500
    n.wait_log(r'directory "[^"]*/app" belongs to uid 65534, neither root '
               r"nor in lua_file_owners")


def test_owner_list(nginx):
    n = start(nginx, http="lua_file_owners nobody;")
    assert n.get("/f?n=hello").status == 500
    n.wait_log(r"is not in lua_file_owners")
    n2 = start(nginx, http="lua_file_owners root;")
    assert n2.get("/f?n=hello").text == "hello from file\n"


def test_unknown_owner_fails_nginx_t(nginx_conf):
    ok, out = nginx_conf(http="lua_file_owners no-such-user-here;").test_config()
    assert not ok and "unknown user" in out


def test_missing_file_is_404_like_the_reference(nginx):
    for module in ("luaguard", "reference"):
        n = start(nginx, module=module,
                  server="location /f { content_by_lua_file lua/$arg_n.lua; }")
        assert n.get("/f?n=nope").status == 404


def test_nginx_t_warns_about_unsafe_package_paths(nginx_conf, tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    conf = nginx_conf(http=f'lua_package_path "./?.lua;{open_dir}/?.lua;;";'
                           f'\nlua_package_cpath "/usr/lib/x86_64-linux-gnu/lua/5.1/?.so;;";')
    ok, out = conf.test_config()
    assert ok, out
    assert re.search(r'\[warn\].*entry "\./\?\.lua" is relative', out), out
    assert re.search(r"\[warn\].*world-writable directory", out), out
    assert "lua_package_cpath" not in out  # a safe entry: no warning
