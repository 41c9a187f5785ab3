#!/usr/bin/env bash
# Install everything the test suite needs, then run lint, types and the tests.
# System packages: curl, iproute2 (ip, for the network-namespace tests), HAProxy (the PROXY
# protocol tests put socksd nodes behind it), Redis (the fleet tests share limits through a
# redis-server they start), logrotate (the contrib/logrotate config is run for real), ncat, htpasswd,
# db_load (db-util: the PAM tests' pam_userdb database), OpenLDAP (slapd and ldap-utils: the LDAP
# tests start a throwaway directory)
# (apache2-utils), Dante (server and socksify client), gcc
# (it builds the small C programs socksify runs), and MIT Kerberos for the GSSAPI tests (a KDC and
# its admin tools for k5test's throwaway realm, kinit, and libkrb5-dev with a C compiler, which the
# Python package gssapi is built against), installed with apt-get when missing. Python packages:
# socksd with its [test] extra. Then Dante is built with GSSAPI for the interop tests
# (scripts/build-dante-gssapi.sh, cached outside the repo).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v ip >/dev/null || need+=(iproute2)  # network namespaces for the remote-client tests
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need+=(haproxy)  # PROXY protocol tests
command -v logrotate >/dev/null || [ -x /usr/sbin/logrotate ] || need+=(logrotate)  # contrib/logrotate/socksd, run for real
command -v ncat >/dev/null || need+=(ncat)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v socksify >/dev/null || need+=(dante-client)
command -v sockd >/dev/null || command -v danted >/dev/null || need+=(dante-server)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
[ -x /usr/sbin/krb5kdc ] || need+=(krb5-kdc)
[ -x /usr/sbin/kadmin.local ] || need+=(krb5-admin-server)
command -v kinit >/dev/null || need+=(krb5-user)
command -v krb5-config >/dev/null || need+=(libkrb5-dev)
command -v cc >/dev/null || need+=(build-essential)
command -v promtool >/dev/null || need+=(prometheus)  # the metrics tests: promtool lints the endpoint, a real Prometheus runs the dashboard's queries
command -v proxychains4 >/dev/null || need+=(proxychains4)  # SOCKS4 through the mixed listener
command -v chromium >/dev/null || need+=(chromium)  # a browser through HTTP CONNECT
command -v openssl >/dev/null || need+=(openssl)  # the self-signed certificate of the browser test's origin
command -v db_load >/dev/null || command -v db5.3_load >/dev/null || need+=(db-util)  # the PAM tests: pam_userdb's Berkeley DB
ls /usr/lib/*/security/pam_userdb.so >/dev/null 2>&1 || need+=(libpam-modules)  # pam_userdb, pam_exec for the PAM tests
command -v redis-server >/dev/null || need+=(redis-server)  # the fleet tests: a shared limit store, started by the tests
[ -x /usr/sbin/slapd ] || need+=(slapd)  # the LDAP user-store tests run a throwaway OpenLDAP directory
command -v ldapadd >/dev/null || need+=(ldap-utils)  # ldapadd/ldapdelete load and change it
if ((${#need[@]})); then
    echo "test.sh: installing system packages: ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null  # env: sudo would drop the variable (slapd and krb5 ask debconf questions)
fi

# Debian's own python3 refuses pip installs outside a venv (PEP 668); this machine is a test box.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check -e ".[test]"

# Dante with GSSAPI for tests/e2e/test_dante_gssapi.py (minutes the first time, then cached). The
# script says why on failure; those tests then skip (they only look for the build, never make it).
./scripts/build-dante-gssapi.sh >/dev/null || echo "test.sh: Dante with GSSAPI was not built"

echo "== ruff"; python3 -m ruff check src tests
echo "== mypy"; python3 -m mypy
echo "== pytest"; python3 -m pytest "$@"
