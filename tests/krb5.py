"""A throwaway MIT Kerberos realm for the GSSAPI tests (k5test, Debian's krb5-kdc).

``TestRealm.start()`` creates KRBTEST.COM in a temporary directory with its KDC on loopback ports
picked free, the user ``user@KRBTEST.COM`` with a ticket in the realm's credential cache, and a
keytab for socksd holding ``rcmd/localhost`` (the default service), ``socks/localhost`` and
``host/localhost`` (a key socksd has but must refuse unless it is the configured service). The
KDC also knows ``nokey/localhost``, for which no keytab has a key.

Everything is resolved as ``localhost`` with reverse DNS and hostname canonicalisation off, so no
DNS query leaves the machine. ``env`` holds the variables a process needs to use the realm.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from k5test.realm import MITRealm

from tests.helpers import free_port_base

REALM = "KRBTEST.COM"
USER = f"user@{REALM}"
HOST = "localhost"
SERVICES = ("rcmd", "socks", "host")


class _LoopbackRealm(MITRealm):  # type: ignore[misc]
    @property
    def hostname(self) -> str:
        return HOST


class TestRealm:
    """A running test realm; ``stop()`` ends its KDC and removes its files."""

    __test__ = False  # not a pytest test class

    def __init__(self, realm: Any) -> None:
        self._realm = realm
        self.tmpdir = Path(realm.tmpdir)
        self.env: dict[str, str] = dict(realm.env)
        self.keytab = self.tmpdir / "socksd.keytab"
        self.ccache = Path(realm.ccache)

    @classmethod
    def start(cls, attempts: int = 5) -> TestRealm:
        """A new realm with its KDC running. The KDC cannot listen on port 0: ports are picked
        free, and when another process takes one before the KDC binds it, the KDC fails to start
        and the realm is made again on other ports."""
        for attempt in range(attempts):
            realm = _LoopbackRealm(
                realm=REALM,
                portbase=free_port_base(),
                krb5_conf={
                    "libdefaults": {
                        "rdns": "false",
                        "dns_canonicalize_hostname": "false",
                        "dns_lookup_realm": "false",
                        "dns_lookup_kdc": "false",
                    },
                    "domain_realm": {HOST: REALM},
                },
                start_kdc=False,
            )
            try:
                realm.start_kdc()  # k5test raises when krb5kdc exits before "starting..."
                realm.kinit(realm.user_princ, realm.password("user"))  # as k5test does then
                break
            except Exception:
                realm.stop()
                if attempt == attempts - 1:
                    raise
        try:
            self = cls(realm)
            for service in (*SERVICES, "nokey"):
                realm.addprinc(f"{service}/{HOST}")
            for service in SERVICES:
                realm.extract_keytab(f"{service}/{HOST}", str(self.keytab))
        except BaseException:
            realm.stop()
            raise
        return self

    def add_keytab(self, path: Path, *services: str) -> Path:
        """A keytab at ``path`` with the keys of ``service/localhost`` for each service."""
        for service in services:
            self._realm.extract_keytab(f"{service}/{HOST}", str(path))
        return path

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._realm.stop()

    @contextlib.contextmanager
    def environment(self) -> Any:
        """This process uses the realm (KRB5_CONFIG, ticket cache, replay cache) meanwhile."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
