#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the benchmarks need,
# only when something is missing, so `make` on a prepared machine stays quiet.
# Never libluajit-5.1-dev: it conflicts with libluajit2-5.1-dev and removes
# libnginx-mod-http-lua, our compatibility oracle.
set -euo pipefail

BUILD_PKGS=(g++ make cmake pkg-config dpkg-dev nginx nginx-dev
  libluajit2-5.1-dev libpcre2-dev libssl-dev zlib1g-dev libgtest-dev)
TEST_PKGS=(python3 python3-pytest libnginx-mod-http-lua lua-cjson
  libnginx-mod-http-ndk libnginx-mod-http-set-misc
  redis-server memcached openssl iproute2 util-linux procps valgrind
  lintian lua-check python3-jsonschema lua-resty-core lua-resty-lrucache)
BENCH_PKGS=(wrk)
DEB_PKGS=(lintian)

want=("${BUILD_PKGS[@]}")
case "${1:-build}" in
  build) ;;
  test) want+=("${TEST_PKGS[@]}") ;;
  deb) want+=("${DEB_PKGS[@]}") ;;
  bench|all) want+=("${TEST_PKGS[@]}" "${BENCH_PKGS[@]}") ;;
  *) echo "usage: $0 [build|test|deb|bench|all]" >&2; exit 2 ;;
esac

missing=()
for p in "${want[@]}"; do
  st=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$st" = installed ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "install-deps: missing packages: ${missing[*]} (run as root)" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's nginx package starts a daemon on :80 where an init system runs;
# our tests and `make run` start their own instances.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q nginx 2>/dev/null; then
  systemctl stop nginx || true
fi
