#!/usr/bin/env bash
# Serves the example gateway (examples/) with the module (make run).
#
#   run-example.sh MODULE [PORT]
#       renders build/example/conf/nginx.conf, prints the lines to try and
#       runs nginx in the foreground (Ctrl-C stops it);
#   run-example.sh --render-only MODULE PORT PREFIX
#       renders PREFIX/conf/nginx.conf, checks it with `nginx -t` and prints
#       the same lines, without starting nginx (tests/e2e/test_example.py
#       starts it through the test harness).
set -euo pipefail

render_only=
if [[ ${1:-} == --render-only ]]; then
    render_only=1
    shift
fi
module=$(realpath "$1")
port=${2:-8080}
root=$(cd "$(dirname "$0")/.." && pwd)
if [[ $render_only ]]; then
    prefix=$(realpath "$3")
else
    prefix=$root/build/example
fi

mkdir -p "$prefix"/{logs,tmp,conf}
sed -e "s|LUAGUARD_MODULE|$module|" -e "s|PREFIX|$prefix|g" \
    -e "s|EXAMPLES|$root/examples|g" -e "s|PORT|$port|g" \
    "$root/examples/nginx.conf" > "$prefix/conf/nginx.conf"
/usr/sbin/nginx -t -q -p "$prefix" -c "$prefix/conf/nginx.conf"

cat <<EOF
luaguard example gateway on http://127.0.0.1:$port/
error log: $prefix/logs/error.log, access log (JSON): $prefix/logs/access.json

Try, from another shell (the TOKEN line sets the variable the later lines use):

EOF
sed -e "s|PORT|$port|g" -e "s|PREFIX|$prefix|g" -e 's|^#|\n#|' \
    "$root/examples/try.txt" | sed -e '1{/^$/d}'
echo

[[ $render_only ]] && exit 0
echo "Ctrl-C stops nginx."
exec /usr/sbin/nginx -p "$prefix" -c "$prefix/conf/nginx.conf" \
    -g "daemon off;"
