#!/usr/bin/env bash
# Install everything the test suite needs, then run lint, types and the tests.
# System packages: curl, ncat, htpasswd (apache2-utils), Dante (server and socksify client) and gcc
# (it builds the small C programs socksify runs), installed with apt-get when missing. Python
# packages: socksd with its [test] extra.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v curl >/dev/null || need+=(curl)
command -v ncat >/dev/null || need+=(ncat)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v socksify >/dev/null || need+=(dante-client)
command -v sockd >/dev/null || command -v danted >/dev/null || need+=(dante-server)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
if ((${#need[@]})); then
    echo "test.sh: installing system packages: ${need[*]}"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# Debian's own python3 refuses pip installs outside a venv (PEP 668); this machine is a test box.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check -e ".[test]"

echo "== ruff"; python3 -m ruff check src tests
echo "== mypy"; python3 -m mypy
echo "== pytest"; python3 -m pytest "$@"
