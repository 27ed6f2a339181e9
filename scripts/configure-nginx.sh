#!/usr/bin/env bash
# Configure a private copy of Debian's nginx-dev sources with the flags the
# stock /usr/sbin/nginx was built with, so our module's binary signature
# matches it ("not binary compatible" otherwise).
set -euo pipefail
src=${NGINX_SRC:-/usr/share/nginx/src}
out=$1
stamp="$out/.luaguard-configured"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$(md5sum "$src/conf_flags")" ]; then
  exit 0
fi
[ -f "$src/conf_flags" ] || { echo "configure-nginx: $src/conf_flags missing (install nginx-dev)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out"
cp -r "$src/." "$out/"
cd "$out"
# shellcheck disable=SC1091
. ./conf_flags
if ! ./configure "${NGX_CONF_FLAGS[@]}" > configure.log 2>&1; then
  tail -30 configure.log >&2
  echo "configure-nginx: nginx configure failed, see $out/configure.log" >&2
  exit 1
fi
md5sum "$src/conf_flags" > "$stamp"
echo "configure-nginx: configured $out"
