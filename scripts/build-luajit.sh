#!/usr/bin/env bash
#
# build-luajit.sh - build OpenResty's LuaJIT 2.1 (Debian source package
# "luajit2") as a static, position-independent library with
# -DLUAJIT_ENABLE_CHECKHOOK, for linking into the luaguard nginx module.
#
# Usage:
#   scripts/build-luajit.sh [--selftest] OUTDIR
#
# Produces:
#   OUTDIR/include/luajit-2.1/{lua.h,lualib.h,lauxlib.h,luaconf.h,luajit.h,lua.hpp}
#   OUTDIR/lib/libluajit-5.1.a     static library, all objects built with -fPIC
#   OUTDIR/lib/lj_init.o           OpenResty's CPU-feature constructor (selects
#                                  the SSE4.2 string hash). The upstream
#                                  Makefile leaves it out of the .a; link it
#                                  explicitly to match Debian's libluajit .so.
#   OUTDIR/share/luajit-2.1/jit/*.lua   jit.* Lua modules (incl. generated vmdef.lua)
#   OUTDIR/luajit.stamp            source version + build flags of the outputs
#   OUTDIR/build.log               full log of the last build
#   OUTDIR/src/                    cache: apt lists, downloaded source, build tree
#
# A rerun with the outputs present and a matching stamp does nothing except
# print one line.  Changing the source version or the flags (or the compiler)
# rebuilds.  --selftest additionally compiles and runs
# tests/luajit/checkhook_test.c against the result.
#
# The source is fetched with apt-get using a private deb-src list and private
# state/cache directories under OUTDIR/src/apt; /etc/apt and /var/lib/apt are
# never modified.  The mirror and suite are taken from this machine's apt
# configuration (first Debian "main" entry with a plain suite name).
#
# Environment overrides:
#   LUAJIT2_VERSION  Debian version of the luajit2 source (default 2.1-20230119-1)
#   LUAJIT2_MIRROR   archive URI (default: detected, else http://deb.debian.org/debian)
#   LUAJIT2_SUITE    suite       (default: detected, else bookworm)
#   CC               C compiler  (default gcc)

set -euo pipefail

readonly RECIPE_REV=4            # bump when the build/install recipe changes
readonly PKG=luajit2
readonly PKG_VERSION="${LUAJIT2_VERSION:-2.1-20230119-1}"
readonly LJ_XCFLAGS="-DLUAJIT_ENABLE_CHECKHOOK"
readonly LJ_CFLAGS="-fPIC"
readonly JOBS=2
readonly DEFAULT_MIRROR="http://deb.debian.org/debian"
readonly DEFAULT_SUITE="bookworm"
readonly DEBIAN_KEYRING="/usr/share/keyrings/debian-archive-keyring.gpg"
CC="${CC:-gcc}"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
SELFTEST_SRC="$REPO_ROOT/tests/luajit/checkhook_test.c"

say() { printf 'luajit: %s\n' "$*"; }
die() { printf 'build-luajit.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
  echo "usage: ${BASH_SOURCE[0]##*/} [--selftest] OUTDIR" >&2
  exit 2
}

# ---------------------------------------------------------------------------
# Arguments

selftest=0
outdir=""
for arg in "$@"; do
  case "$arg" in
    --selftest) selftest=1 ;;
    -h|--help) usage ;;
    -*) die "unknown option: $arg" ;;
    *) [[ -z "$outdir" ]] || die "more than one OUTDIR given"; outdir="$arg" ;;
  esac
done
[[ -n "$outdir" ]] || usage

mkdir -p "$outdir"
OUTDIR="$(cd "$outdir" && pwd)"
SRCDIR="$OUTDIR/src"
LOG="$OUTDIR/build.log"
STAMP="$OUTDIR/luajit.stamp"
mkdir -p "$SRCDIR"

# Serialise concurrent invocations on the same OUTDIR.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$OUTDIR/.build-luajit.lock"
  flock 9
fi

# Don't let a parent make (or the environment) inject flags into LuaJIT's
# Makefiles; everything that matters is passed explicitly below.
unset MAKEFLAGS MFLAGS GNUMAKEFLAGS MAKELEVEL CFLAGS LDFLAGS XCFLAGS \
      HOST_CC HOST_CFLAGS HOST_LDFLAGS TARGET_CFLAGS TARGET_LDFLAGS \
      TARGET_FLAGS TARGET_SYS CROSS BUILDMODE PREFIX MULTILIB DESTDIR

command -v "${CC%% *}" >/dev/null 2>&1 || die "C compiler '$CC' not found (apt-get install build-essential)"
# One compiler under several names (gcc, cc, /usr/bin/cc: CMake, make and
# dpkg-buildpackage each export a different one) is one stamp: otherwise
# every build that spells it differently rebuilds LuaJIT under the others.
if [[ "$CC" != *" "* ]]; then
  CC="$(readlink -f "$(command -v "$CC")")"
fi
command -v make >/dev/null 2>&1 || die "make not found (apt-get install build-essential)"

MULTIARCH="$($CC -print-multiarch 2>/dev/null || true)"
[[ -n "$MULTIARCH" ]] || MULTIARCH="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || true)"
[[ -n "$MULTIARCH" ]] || die "cannot determine the multiarch triplet of '$CC'"

# Same make invocation as debian/rules (amalgamated build, PREFIX=/usr, Debian
# multiarch libdir, so the default package.path/cpath match Debian's
# libluajit2), plus static + PIC + CHECKHOOK.
MAKE_ARGS=(
  amalg
  PREFIX=/usr "MULTILIB=lib/$MULTIARCH"
  BUILDMODE=static
  "XCFLAGS=$LJ_XCFLAGS"
  "CFLAGS=$LJ_CFLAGS"
  "CC=$CC"
  Q= "E=@:"
)

expected_stamp() {
  printf 'recipe=%s\n' "$RECIPE_REV"
  printf 'source=%s %s\n' "$PKG" "$PKG_VERSION"
  printf 'make=make %s\n' "${MAKE_ARGS[*]}"
  printf 'cc=%s\n' "$($CC --version 2>/dev/null | head -n1)"
  printf 'patches=%s\n' "$(patches_hash)"
}

# Our patches: editing one unpacks and rebuilds LuaJIT.
patches_hash() {
  cat "$REPO_ROOT"/scripts/luajit-patches/*.patch 2>/dev/null |
    sha256sum | cut -c1-16
}

OUTPUTS=(
  include/luajit-2.1/lua.h include/luajit-2.1/lualib.h
  include/luajit-2.1/lauxlib.h include/luajit-2.1/luaconf.h
  include/luajit-2.1/luajit.h include/luajit-2.1/lua.hpp
  lib/libluajit-5.1.a lib/lj_init.o
  share/luajit-2.1/jit/bc.lua share/luajit-2.1/jit/dump.lua
  share/luajit-2.1/jit/v.lua share/luajit-2.1/jit/vmdef.lua
)

up_to_date() {
  local f
  [[ -f "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP")" == "$(expected_stamp)" ]] || return 1
  for f in "${OUTPUTS[@]}"; do
    [[ -s "$OUTDIR/$f" ]] || return 1
  done
  return 0
}

# ---------------------------------------------------------------------------
# Logging helpers (build mode)

fail_with_log() {
  printf 'build-luajit.sh: error: %s\n' "$*" >&2
  if [[ -s "$LOG" ]]; then
    printf -- '--- last lines of %s ---\n' "$LOG" >&2
    tail -n 25 "$LOG" >&2
    printf -- '---\n' >&2
  fi
  exit 1
}

# run_logged "what" cmd args...: run with output appended to the build log.
run_logged() {
  local what="$1" rc=0
  shift
  {
    printf '\n### %s\n$' "$what"
    printf ' %q' "$@"
    printf '\n'
  } >>"$LOG"
  "$@" >>"$LOG" 2>&1 || rc=$?
  return "$rc"
}

# ---------------------------------------------------------------------------
# Private deb-src list derived from this machine's apt configuration.
#
# Prints a sources file on stdout and returns 0.  Its format (".sources"
# deb822 or ".list" one-line) is reported via the global SRC_LIST_EXT; the
# chosen URI/suite via SRC_DESC.  For deb822 input the matching stanza is
# copied (Signed-By, Check-Valid-Until, ... are preserved) with Types,
# URIs, Suites and Components rewritten.

SRC_LIST_EXT=""
SRC_DESC=""

pick_deb822() {  # file -> stanza on stdout, or nothing
  awk -v want_uri="${LUAJIT2_MIRROR:-}" -v want_suite="${LUAJIT2_SUITE:-}" '
    function has_word(list, w,   n, a, i) {
      n = split(list, a, /[ \t]+/)
      for (i = 1; i <= n; i++) if (a[i] == w) return 1
      return 0
    }
    function flush(   n, u, m, s, i, j, uri, suite, k) {
      if (!done && nkeys > 0 && (has_word(f["types"], "deb") || has_word(f["types"], "deb-src")) \
          && tolower(f["enabled"]) != "no" && has_word(f["components"], "main")) {
        n = split(f["uris"], u, /[ \t]+/); m = split(f["suites"], s, /[ \t]+/)
        for (i = 1; i <= n && !done; i++) {
          if (u[i] !~ /\/debian\/?$/) continue
          for (j = 1; j <= m && !done; j++) {
            if (s[j] !~ /^[a-z]+$/) continue
            uri = (want_uri != "") ? want_uri : u[i]
            suite = (want_suite != "") ? want_suite : s[j]
            print "Types: deb-src"
            print "URIs: " uri
            print "Suites: " suite
            print "Components: main"
            for (k = 1; k <= nother; k++) print other[k]
            done = 1
          }
        }
      }
      delete f; nkeys = 0; nother = 0; skipcont = 0
    }
    /^[ \t]*#/ { next }
    /^[ \t]*$/ { flush(); next }
    /^[ \t]/ { if (!skipcont) other[++nother] = $0; next }   # continuation line
    {
      p = index($0, ":"); if (p == 0) next
      key = tolower(substr($0, 1, p - 1)); val = substr($0, p + 1)
      gsub(/^[ \t]+|[ \t]+$/, "", val)
      nkeys++
      if (key ~ /^(types|uris|suites|components|enabled|architectures)$/) {
        f[key] = val; skipcont = 1
      } else {
        other[++nother] = $0; skipcont = 0
      }
    }
    END { flush() }
  ' "$1"
}

pick_oneline() {  # file -> line on stdout, or nothing
  awk -v want_uri="${LUAJIT2_MIRROR:-}" -v want_suite="${LUAJIT2_SUITE:-}" '
    done { next }
    {
      sub(/#.*/, "")
      if ($1 != "deb" && $1 != "deb-src") next
      i = 2; opts = ""
      if ($2 ~ /^\[/) {
        while (i <= NF) { opts = opts (opts == "" ? "" : " ") $i; if ($i ~ /\]$/) { i++; break } i++ }
      }
      uri = $i; suite = $(i + 1); main = 0
      for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
      if (!main || uri !~ /\/debian\/?$/ || suite !~ /^[a-z]+$/) next
      if (want_uri != "") uri = want_uri
      if (want_suite != "") suite = want_suite
      print "deb-src" (opts == "" ? "" : " " opts) " " uri " " suite " main"
      done = 1
    }
  ' "$1"
}

make_source_list() {
  local f out
  local -a files=()
  if [[ -f /etc/apt/sources.list ]]; then files+=(/etc/apt/sources.list); fi
  for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    if [[ -f "$f" ]]; then files+=("$f"); fi
  done
  for f in "${files[@]}"; do
    case "$f" in
      *.sources) out="$(pick_deb822 "$f")"; SRC_LIST_EXT=sources ;;
      *) out="$(pick_oneline "$f")"; SRC_LIST_EXT=list ;;
    esac
    if [[ -n "$out" ]]; then
      if [[ "$SRC_LIST_EXT" == sources ]]; then
        SRC_DESC="$(awk '/^URIs:/{u=$2} /^Suites:/{s=$2} END{print u " " s}' <<<"$out") (from $f)"
      else
        SRC_DESC="$(sed -E 's/^deb-src( \[[^]]*\])? //' <<<"$out" | awk '{print $1 " " $2}') (from $f)"
      fi
      printf '%s\n' "$out"
      return 0
    fi
  done
  # Nothing usable configured: fall back to the official mirror.
  SRC_LIST_EXT=list
  local uri="${LUAJIT2_MIRROR:-$DEFAULT_MIRROR}" suite="${LUAJIT2_SUITE:-$DEFAULT_SUITE}"
  SRC_DESC="$uri $suite (default)"
  if [[ -f "$DEBIAN_KEYRING" ]]; then
    printf 'deb-src [signed-by=%s] %s %s main\n' "$DEBIAN_KEYRING" "$uri" "$suite"
  else
    printf 'deb-src %s %s main\n' "$uri" "$suite"
  fi
}

# ---------------------------------------------------------------------------
# Steps

DL_DIR="$SRCDIR/download"
DSC="$DL_DIR/${PKG}_${PKG_VERSION}.dsc"
TREE="$SRCDIR/${PKG}-${PKG_VERSION}"

dsc_files_present() {
  local name
  [[ -s "$DSC" ]] || return 1
  # File names listed in the .dsc's Checksums-Sha256 (or Files) section.
  while read -r name; do
    [[ -s "$DL_DIR/$name" ]] || return 1
  done < <(awk '/^(Checksums-Sha256|Files):/{f=1; next} /^[^ ]/{f=0} f && NF==3 {print $3}' "$DSC" | sort -u)
  return 0
}

fetch_source() {
  if dsc_files_present; then
    printf '\n### source: using cached %s\n' "$DSC" >>"$LOG"
    return 0
  fi
  local aptdir="$SRCDIR/apt" list tmp rc=0
  mkdir -p "$aptdir/lists/partial" "$aptdir/cache/archives/partial"
  # Not in a subshell: make_source_list sets SRC_LIST_EXT and SRC_DESC.
  make_source_list >"$aptdir/sources.new"
  list="$aptdir/sources.$SRC_LIST_EXT"   # apt picks the format by extension
  rm -f "$aptdir"/sources.list "$aptdir"/sources.sources
  mv "$aptdir/sources.new" "$list"
  say "fetching $PKG $PKG_VERSION source from $SRC_DESC"
  { printf '\n### private apt source list %s:\n' "$list"; cat "$list"; } >>"$LOG"

  local -a apt_opts=(
    -o "Dir::Etc::sourcelist=$list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::lists=$aptdir/lists"
    -o "Dir::Cache=$aptdir/cache"
    -o "APT::Get::List-Cleanup=0"
  )
  # As root apt drops privileges to _apt for downloads, which fails (or warns)
  # when _apt cannot traverse OUTDIR; integrity is ensured by the signed
  # Sources index either way.
  [[ "$(id -u)" != 0 ]] || apt_opts+=(-o "APT::Sandbox::User=root")

  run_logged "apt-get update (private lists)" apt-get "${apt_opts[@]}" update || rc=$?
  if (( rc != 0 )); then
    fail_with_log "'apt-get update' for the private deb-src list failed (exit $rc); source: $SRC_DESC"
  fi

  tmp="$SRCDIR/download.tmp"
  rm -rf "$tmp"
  mkdir -p "$tmp"
  (cd "$tmp" && run_logged "apt-get source" apt-get "${apt_opts[@]}" source --only-source --download-only "$PKG=$PKG_VERSION") || rc=$?
  if (( rc != 0 )); then
    rm -rf "$tmp"
    fail_with_log "'apt-get source $PKG=$PKG_VERSION' failed (exit $rc). Is source version $PKG_VERSION available from $SRC_DESC? (override with LUAJIT2_VERSION / LUAJIT2_MIRROR / LUAJIT2_SUITE)"
  fi
  [[ -s "$tmp/$(basename "$DSC")" ]] ||
    fail_with_log "'apt-get source' succeeded but $(basename "$DSC") was not downloaded"
  rm -rf "$DL_DIR"
  mv "$tmp" "$DL_DIR"
  dsc_files_present || fail_with_log "downloaded source is incomplete (files listed in $DSC missing)"
}

unpack_source() {
  if [[ -f "$TREE/.luajit-unpacked-r$RECIPE_REV-$(patches_hash)" ]]; then
    printf '\n### unpack: using cached tree %s\n' "$TREE" >>"$LOG"
    return 0
  fi
  if ! command -v dpkg-source >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || die "dpkg-source not found; install dpkg-dev (apt-get install dpkg-dev)"
    say "installing dpkg-dev (for dpkg-source)"
    run_logged "apt-get install dpkg-dev" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends dpkg-dev ||
      { run_logged "apt-get update" apt-get update &&
        run_logged "apt-get install dpkg-dev" env DEBIAN_FRONTEND=noninteractive \
          apt-get install -y --no-install-recommends dpkg-dev; } ||
      fail_with_log "could not install dpkg-dev"
  fi
  local old
  for old in "$SRCDIR/$PKG"-*; do   # stale trees of other versions
    if [[ -d "$old" && "$old" != "$TREE" ]]; then rm -rf "$old"; fi
  done
  rm -rf "$TREE"
  # dpkg-source verifies the checksums from the .dsc and applies
  # debian/patches (3.0 quilt).  Its "cannot verify inline signature" warning
  # is expected: the .dsc was already authenticated by apt.
  run_logged "dpkg-source -x" dpkg-source --no-copy -x "$DSC" "$TREE" ||
    fail_with_log "dpkg-source -x $DSC failed (delete $DL_DIR to re-download)"
  # Our fixes of LuaJIT bugs (scripts/luajit-patches/*.patch, each says why).
  local p
  for p in "$REPO_ROOT"/scripts/luajit-patches/*.patch; do
    [[ -e "$p" ]] || continue
    run_logged "patch $(basename "$p")" patch -d "$TREE" -p1 -i "$p" ||
      fail_with_log "applying $p failed"
  done
  touch "$TREE/.luajit-unpacked-r$RECIPE_REV-$(patches_hash)"
}

build_tree() {
  run_logged "make clean" make -C "$TREE" clean ||
    fail_with_log "'make clean' failed in $TREE"
  run_logged "make" make -C "$TREE" -j"$JOBS" "${MAKE_ARGS[@]}" ||
    fail_with_log "LuaJIT build failed (make ${MAKE_ARGS[*]})"
  local f
  for f in libluajit.a lj_init.o jit/vmdef.lua; do
    [[ -s "$TREE/src/$f" ]] || fail_with_log "build did not produce src/$f"
  done
}

# The objects must be PIC: on x86-64 no absolute 32-bit (R_X86_64_32/32S)
# or local-exec TLS (R_X86_64_TPOFF*) relocations outside debug sections --
# Debian's default -fPIE leaves exactly such TPOFF32 relocations in
# ljamalg.o -- and on any arch the whole archive must link into a shared
# object with -z text (no text relocations) and -z defs (no undefined symbols).
verify_pic() {
  local tmp="$SRCDIR/pic-check" bad=""
  rm -rf "$tmp"
  mkdir -p "$tmp"
  if [[ "$($CC -dumpmachine)" == x86_64-* ]] && command -v readelf >/dev/null 2>&1; then
    local o
    for o in "$TREE"/src/lj_vm.o "$TREE"/src/ljamalg.o "$TREE"/src/lj_str_hash.o "$TREE"/src/lj_init.o; do
      if readelf -rW "$o" | awk '/^Relocation section/ {sec = $3}
            $3 ~ /^R_X86_64_(32|32S|TPOFF32|TPOFF64)$/ && sec !~ /debug/ {bad = 1} END {exit !bad}'; then
        bad+=" $(basename "$o")"
      fi
    done
    [[ -z "$bad" ]] || fail_with_log "non-PIC relocations (R_X86_64_32/32S/TPOFF) in:$bad"
  fi
  printf 'int luaguard_pic_probe(void) { return 0; }\n' >"$tmp/probe.c"
  run_logged "PIC check: link libluajit.a into a shared object" \
      "$CC" -shared -fPIC -o "$tmp/probe.so" "$tmp/probe.c" \
      -Wl,--whole-archive "$TREE/src/libluajit.a" "$TREE/src/lj_init.o" -Wl,--no-whole-archive \
      -Wl,-z,text -Wl,-z,defs -lm -ldl ||
    fail_with_log "libluajit.a does not link into a shared object (not PIC?)"
  rm -rf "$tmp"
}

install_outputs() {
  local stage="$OUTDIR/.stage"
  rm -rf "$stage"
  mkdir -p "$stage/include/luajit-2.1" "$stage/lib" "$stage/share/luajit-2.1/jit"
  local h
  for h in lua.h lualib.h lauxlib.h luaconf.h luajit.h lua.hpp; do
    install -m 0644 "$TREE/src/$h" "$stage/include/luajit-2.1/$h"
  done
  install -m 0644 "$TREE/src/libluajit.a" "$stage/lib/libluajit-5.1.a"
  install -m 0644 "$TREE/src/lj_init.o" "$stage/lib/lj_init.o"
  install -m 0644 "$TREE"/src/jit/*.lua "$stage/share/luajit-2.1/jit/"

  rm -f "$STAMP"   # outputs are inconsistent until the stamp is rewritten
  mkdir -p "$OUTDIR/include" "$OUTDIR/lib" "$OUTDIR/share"
  rm -rf "$OUTDIR/include/luajit-2.1" "$OUTDIR/share/luajit-2.1"
  mv "$stage/include/luajit-2.1" "$OUTDIR/include/luajit-2.1"
  mv "$stage/share/luajit-2.1" "$OUTDIR/share/luajit-2.1"
  mv -f "$stage/lib/libluajit-5.1.a" "$OUTDIR/lib/libluajit-5.1.a"
  mv -f "$stage/lib/lj_init.o" "$OUTDIR/lib/lj_init.o"
  rm -rf "$stage"
  expected_stamp >"$STAMP.tmp"
  mv -f "$STAMP.tmp" "$STAMP"
}

run_selftest() {
  [[ -f "$SELFTEST_SRC" ]] || die "self-test source not found: $SELFTEST_SRC"
  local bin="$SRCDIR/checkhook_test"
  say "self-test: compiling $SELFTEST_SRC"
  "$CC" -O2 -Wall -Wextra -I"$OUTDIR/include/luajit-2.1" -o "$bin" "$SELFTEST_SRC" \
      "$OUTDIR/lib/libluajit-5.1.a" -Wl,-E -lm -ldl ||
    die "self-test failed to compile"
  local rc=0
  if command -v timeout >/dev/null 2>&1; then
    timeout 120 "$bin" || rc=$?
  else
    "$bin" || rc=$?
  fi
  (( rc == 0 )) || die "self-test FAILED (exit $rc)"
  say "self-test passed"
}

# ---------------------------------------------------------------------------
# Main

if up_to_date; then
  say "up to date: $PKG $PKG_VERSION (static PIC, $LJ_XCFLAGS) in $OUTDIR"
else
  start=$SECONDS
  {
    printf '# build-luajit.sh %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')"
    expected_stamp
  } >"$LOG"
  fetch_source
  unpack_source
  say "building $PKG $PKG_VERSION (make -j$JOBS ${MAKE_ARGS[*]}); log: $LOG"
  build_tree
  verify_pic
  install_outputs
  say "installed into $OUTDIR in $((SECONDS - start))s"
fi

if (( selftest )); then
  run_selftest
fi
