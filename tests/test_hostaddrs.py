"""This host's addresses for protect_local: rtnetlink against ``ip address``, and the parsers."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import sys

import pytest

from socksd.server.process.hostaddrs import (
    host_networks,
    netlink_addresses,
    parse_fib_trie,
    parse_if_inet6,
    parse_rtm_newaddr,
)

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 192.0.2.0/24 2 0 2
           |-- 192.0.2.0
              /24 link UNICAST
           |-- 192.0.2.2
              /32 host LOCAL
           |-- 192.0.2.9
              /32 host LOCAL
"""

IF_INET6 = """fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
garbage
"""


def test_parse_fib_trie_takes_local_routes_only() -> None:
    assert {str(n) for n in parse_fib_trie(FIB_TRIE)} == {
        "127.0.0.0/8",
        "127.0.0.1/32",
        "192.0.2.2/32",
        "192.0.2.9/32",
    }


def test_parse_if_inet6() -> None:
    assert {str(n) for n in parse_if_inet6(IF_INET6)} == {"fd00::2/128", "::1/128"}


def _rtattr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def test_parse_rtm_newaddr_prefers_ifa_local() -> None:
    head = struct.pack("=BBBBL", socket.AF_INET, 32, 0, 0, 3)
    peer, local = socket.inet_aton("10.0.0.2"), socket.inet_aton("10.0.0.1")
    assert parse_rtm_newaddr(head + _rtattr(1, peer) + _rtattr(2, local)) == local
    assert parse_rtm_newaddr(head + _rtattr(1, peer)) == peer
    head6 = struct.pack("=BBBBL", socket.AF_INET6, 64, 0, 0, 3)
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    assert parse_rtm_newaddr(head6 + _rtattr(3, b"eth0\0") + _rtattr(1, v6)) == v6
    assert parse_rtm_newaddr(head + _rtattr(1, v6)) is None  # wrong length for the family
    assert parse_rtm_newaddr(b"\x02") is None
    assert parse_rtm_newaddr(head + struct.pack("=HH", 2, 1)) is None  # broken attribute


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="rtnetlink is Linux")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 is not installed")
def test_netlink_agrees_with_ip_address() -> None:
    shown = json.loads(
        subprocess.run(
            ["ip", "-j", "address"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    )
    expected = {
        ipaddress.ip_network(info["local"])
        for link in shown
        for info in link.get("addr_info", [])
        if info.get("family") in ("inet", "inet6")
    }
    assert netlink_addresses() == expected
    networks = host_networks()
    assert set(networks) >= expected
    assert list(networks) == sorted(networks, key=lambda n: (n.version, n))
