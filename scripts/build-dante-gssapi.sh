#!/usr/bin/env bash
# Build Dante (sockd server and libdsocksd client library) WITH GSSAPI, for socksd's interop tests.
#
# Debian's dante packages are configured --without-gssapi, so this builds Debian's own source
# package (apt-get source dante, its build dependencies from Debian) configured against MIT
# Kerberos, and installs it into a cache directory outside the repository:
#     ${SOCKSD_TEST_CACHE:-/var/cache/socksd-test}/dante-gssapi/{sbin/sockd,lib/libdsocksd.so}
# A finished build is reused (a stamp file names the source version); a lock keeps two runs apart.
# Prints the install prefix on its last line.
#
# Exit status: 0 built or cached; 3 the sources or build dependencies could not be fetched (a
# package registry problem, outside this project); anything else: the build failed.
#
# --check builds nothing: exit 0 printing the prefix when a finished build is there, else 4 with
# the reason on stderr. The tests use it to find the build (scripts/test.sh builds it first).
set -euo pipefail

cache_root="${SOCKSD_TEST_CACHE:-/var/cache/socksd-test}"
if ! mkdir -p "$cache_root" 2>/dev/null || [ ! -w "$cache_root" ]; then
    cache_root="${XDG_CACHE_HOME:-$HOME/.cache}/socksd-test"
    mkdir -p "$cache_root"
fi
prefix="$cache_root/dante-gssapi"
stamp="$prefix/.built-from"
log="$cache_root/dante-gssapi-build.log"

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_get() { DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 "$@"; }

built() {
    [ -f "$stamp" ] && [ -x "$prefix/sbin/sockd" ] && [ -e "$prefix/lib/libdsocksd.so" ] \
        && ldd "$prefix/sbin/sockd" | grep libgssapi_krb5 >/dev/null
}

if [ "${1:-}" = "--check" ]; then
    if built; then
        echo "$prefix"
        exit 0
    fi
    if [ -s "$log" ]; then
        echo "no finished build in $prefix (last build log: $log)" >&2
    else
        echo "no build in $prefix" >&2
    fi
    exit 4
fi

exec 9>"$cache_root/dante-gssapi.lock"
flock -w 1800 9

if built; then
    echo "dante-gssapi: cached build of $(cat "$stamp")" >&2
    echo "$prefix"
    exit 0
fi

echo "dante-gssapi: building Dante with GSSAPI into $prefix (log: $log)" >&2
: >"$log"

# Source packages: add deb-src lines mirroring the configured deb ones when there are none.
if [ -z "$(apt-cache showsrc dante 2>/dev/null)" ]; then
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        sed -e 's/^Types:.*/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
            | $sudo tee /etc/apt/sources.list.d/socksd-deb-src.sources >/dev/null
    elif [ -f /etc/apt/sources.list ]; then
        grep -E '^deb ' /etc/apt/sources.list | sed -e 's/^deb /deb-src /' \
            | $sudo tee /etc/apt/sources.list.d/socksd-deb-src.list >/dev/null
    fi
    apt_get update -qq >>"$log" 2>&1 || { echo "dante-gssapi: apt-get update failed" >&2; exit 3; }
fi
apt_get install -y -qq --no-install-recommends build-essential libkrb5-dev dpkg-dev autoconf \
    automake libtool >>"$log" 2>&1 \
    || { echo "dante-gssapi: cannot install the build tools (see $log)" >&2; exit 3; }
apt_get build-dep -y -qq dante >>"$log" 2>&1 \
    || { echo "dante-gssapi: apt-get build-dep dante failed (see $log)" >&2; exit 3; }

work="$(mktemp -d "$cache_root/dante-src.XXXXXX")"
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get source -qq dante >>"$log" 2>&1 \
    || { echo "dante-gssapi: apt-get source dante failed (see $log)" >&2; exit 3; }
src="$(find . -maxdepth 1 -type d -name 'dante-*' | head -n 1)"
version="$(cd "$src" && dpkg-parsechangelog -S Version)"
cd "$src"

# As debian/rules does (dh_autoreconf, then configure), but with GSSAPI instead of
# --without-gssapi, and only the parts the tests use.
{
    autoreconf -fi
    ./configure --prefix="$prefix" --with-krb5-config="$(command -v krb5-config)" \
        --without-libwrap --without-pam --without-bsdauth --without-upnp --without-ldap \
        --without-sasl --disable-dependency-tracking
    cp lib/config_parse.c lib/config_scan.c dlib/
    cp lib/config_parse.c lib/config_scan.c sockd/
} >>"$log" 2>&1
if ! grep -qE '^GSSAPI:[[:space:]]+Enabled' "$log"; then
    echo "dante-gssapi: configure did not enable GSSAPI (see $log)" >&2
    exit 1
fi
rm -rf "$prefix"
make -j"$(nproc)" >>"$log" 2>&1
make install >>"$log" 2>&1
ln -sf libdsocksd.so.0.0.0 "$prefix/lib/libdsocksd.so"
echo "dante $version (GSSAPI)" >"$stamp"
built || { echo "dante-gssapi: the build does not link MIT GSSAPI (see $log)" >&2; exit 1; }
echo "dante-gssapi: built dante $version with GSSAPI" >&2
echo "$prefix"
