"""A network namespace for tests that need clients which are not on loopback.

Every other test client is on 127.0.0.1: exempt from ``protect_local`` and one address for all.
A remote client, a second client behind another address, a NAT: those need distinct, non-loopback
addresses. :func:`network_namespace` creates a fresh namespace (``ip netns add``, root only), puts
TEST-NET addresses (RFC 5737 192.0.2.0/24 and 198.51.100.0/24, RFC 3849 2001:db8::/32) on its own
``lo`` as host routes, and moves the calling thread into it for the ``with`` block (``setns``).
Sockets created meanwhile, threads started meanwhile and subprocesses started meanwhile (a socksd
server) all live in the namespace: proxy, clients and targets have distinct addresses, and nothing
can leave it (it has no other interface). On exit the thread goes back and the namespace is
deleted; the processes started inside must be stopped by the test before that.

Network namespaces are per thread in Linux, so the test's own thread is the one moved; pytest runs
a test in its main thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import count

import pytest

CLONE_NEWNET = 0x40000000

PROXY = "192.0.2.1"
"""The address tests give socksd's listener (an address of the proxy host)."""
CLIENT_A = "192.0.2.10"
CLIENT_B = "192.0.2.11"
"""Two client hosts."""
TARGET = "198.51.100.7"
"""A target host (another network)."""
PROXY6 = "2001:db8::1"
CLIENT6 = "2001:db8::10"

ADDRESSES = (PROXY, CLIENT_A, CLIENT_B, TARGET, PROXY6, CLIENT6)

_names = count()


def _libc_setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def skip_unless_possible() -> None:
    """Skip the test when this machine cannot create a network namespace."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("ip (iproute2) is not installed")


@contextmanager
def network_namespace(addresses: tuple[str, ...] = ADDRESSES) -> Iterator[str]:
    """Run the ``with`` block in a new network namespace holding ``addresses`` on ``lo``.

    Yields the namespace's name (``ip -n NAME ...`` works on it).
    """
    skip_unless_possible()
    name = f"socksd-test-{os.getpid()}-{next(_names)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        for address in addresses:
            prefix = "128" if ":" in address else "32"
            _ip(
                "-n",
                name,
                "addr",
                "add",
                f"{address}/{prefix}",
                "dev",
                "lo",
                *(("nodad",) if ":" in address else ()),
            )
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        inside = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _libc_setns(inside)
            try:
                yield name
            finally:
                _libc_setns(original)
        finally:
            os.close(inside)
            os.close(original)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30, check=False)
