#!/usr/bin/env bash
# Builds libnginx-mod-http-luaguard_VERSION_amd64.deb from a built module,
# laid out as Debian's libnginx-mod-* packages are, with dpkg-deb, and
# checks it with lintian (errors fail the build).
# usage: packaging/build-deb.sh MODULE.so VERSION OUTDIR
set -euo pipefail

module=$1 version=$2 out=$3
# Who built it, as Debian's tools take it (DEBFULLNAME/DEBEMAIL), else git's
# identity.
name=${DEBFULLNAME:-$(git -C "$(dirname "$0")" config user.name || true)}
email=${DEBEMAIL:-$(git -C "$(dirname "$0")" config user.email || true)}
if [ -z "$name" ] || [ -z "$email" ]; then
    echo "build-deb: set DEBFULLNAME and DEBEMAIL (the package maintainer)" >&2
    exit 1
fi
maintainer="$name <$email>"
here=$(cd "$(dirname "$0")" && pwd)
pkg=libnginx-mod-http-luaguard
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
doc=$root/usr/share/doc/$pkg

install -D -m 0644 "$module" "$root/usr/lib/nginx/modules/ngx_http_luaguard_module.so"
# The build keeps debug information (9 MB); Debian ships it in -dbgsym.
strip --strip-unneeded --remove-section=.comment --remove-section=.note \
    "$root/usr/lib/nginx/modules/ngx_http_luaguard_module.so"
install -D -m 0644 "$here/mod-http-luaguard.conf" \
    "$root/usr/share/nginx/modules-available/mod-http-luaguard.conf"
install -D -m 0644 "$here/debian/copyright" "$doc/copyright"
install -D -m 0644 "$here/debian/README.Debian" "$doc/README.Debian"
# A native package: its changelog is changelog.gz (lintian's check).
sed -e "s/@VERSION@/$version/" -e "s|@MAINTAINER@|$maintainer|" -e "s/@DATE@/$(date -R -u -d @"${SOURCE_DATE_EPOCH:-$(date +%s)}")/" \
    "$here/debian/changelog" | gzip -9n > "$doc/changelog.gz"
chmod 0644 "$doc/changelog.gz"

# Shared library dependencies as dh_shlibdeps computes them: dpkg-shlibdeps
# wants a debian/control to read, which a throw-away one satisfies.
mkdir -p "$work/debian"
printf 'Source: luaguard\n\nPackage: %s\nArchitecture: amd64\n' "$pkg" \
    > "$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O \
    root/usr/lib/nginx/modules/ngx_http_luaguard_module.so 2>/dev/null \
    | sed -n 's/^shlibs:Depends=//p')

mkdir -p "$root/DEBIAN"
size=$(du -k -s --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" \
    -e "s|@MAINTAINER@|$maintainer|" \
    "$here/debian/control.in" > "$root/DEBIAN/control"
for s in postinst prerm postrm; do
    install -m 0755 "$here/debian/$s" "$root/DEBIAN/$s"
done
(cd "$root" && find usr -type f -print0 | sort -z | xargs -0 md5sum) \
    > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"
find "$root" -type d -exec chmod 0755 {} +

mkdir -p "$out"
deb=$out/${pkg}_${version}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
# lintian runs as root here only when told to; its errors fail the build.
lintian --allow-root --fail-on error "$deb"
echo "$deb"
