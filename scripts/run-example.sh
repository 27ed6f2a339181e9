#!/usr/bin/env bash
# Serves examples/ with the module in the foreground (make run).
set -euo pipefail
module=$(realpath "$1")
port=${2:-8080}
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=$root/build/example
mkdir -p "$prefix"/{logs,tmp,conf}
sed -e "s|LUAGUARD_MODULE|$module|" -e "s|PREFIX|$prefix|g" \
    -e "s|EXAMPLES|$root/examples|g" -e "s|PORT|$port|g" \
    "$root/examples/nginx.conf" > "$prefix/conf/nginx.conf"
/usr/sbin/nginx -t -q -p "$prefix" -c "$prefix/conf/nginx.conf"
echo "luaguard example on http://127.0.0.1:$port/ (error log: $prefix/logs/error.log; Ctrl-C stops)"
exec /usr/sbin/nginx -p "$prefix" -c "$prefix/conf/nginx.conf"
