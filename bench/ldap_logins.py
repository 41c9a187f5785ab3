"""Sequential RFC 1929 logins/s through socksd with users from a throwaway slapd
(``tests.e2e.ldap``, on free loopback ports): ``users_cache_ttl = 0`` (a search and a bind each) against
cached logins, in one run. Indicative; run under the shared lock::

    PYTHONPATH=$PWD/src flock /tmp/socksd-bench.lock python3 bench/ldap_logins.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.e2e.ldap import Slapd, slapd_port
from tests.e2e.test_ldap import PASSWORD, ldap_config, login
from tests.servers import start_server

N = 300


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="socksd-ldap-bench-"))
    slapd = Slapd(root / "slapd", slapd_port())
    slapd.start()
    try:
        slapd.load_base()
        slapd.add_user("alice", PASSWORD)
        rates = {}
        for label, ttl in (("users_cache_ttl=0 (search+bind each)", 0), ("cached", 300)):
            path = root / f"{ttl}.toml"
            body = ldap_config(slapd, root, ttl=ttl)
            path.write_text(f'listen = ["127.0.0.1:0"]\naccess_log = "off"\n{body}')
            server = start_server(root, "--config", str(path))
            try:
                assert login(server, "alice", PASSWORD) == b"\x01\x00"  # warm: pool, cache
                start = time.perf_counter()
                for _ in range(N):
                    assert login(server, "alice", PASSWORD) == b"\x01\x00"
                rates[label] = N / (time.perf_counter() - start)
            finally:
                server.stop()
        for label, rate in rates.items():
            print(f"ldap, {label}: {rate:.0f} logins/s ({rate / rates['cached']:.2f}x cached)")
    finally:
        slapd.stop()


if __name__ == "__main__":
    main()
