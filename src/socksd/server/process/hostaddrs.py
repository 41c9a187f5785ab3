"""The addresses of this host, for the ``protect_local`` rule (no proxying into the proxy host).

On Linux they come from the kernel over rtnetlink (an RTM_GETADDR dump, what ``ip address``
shows: every address of every interface, secondary ones included, in the server's network
namespace). If that is not possible, ``/proc/net/fib_trie`` (IPv4 LOCAL routes) and
``/proc/net/if_inet6`` are read; elsewhere, the addresses the host name resolves to are used.
They are read at start and on each reload (SIGHUP): an address added later is guarded from the
next reload on.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import struct
from pathlib import Path

from socksd.config import Config
from socksd.rules import Network, RuleSet

log = logging.getLogger("socksd")

_FIB_LOCAL = re.compile(r"\|-- (\d+\.\d+\.\d+\.\d+)\n\s+/(\d+) host LOCAL")


def parse_fib_trie(text: str) -> set[Network]:
    """The LOCAL host routes of ``/proc/net/fib_trie`` as networks."""
    out: set[Network] = set()
    for address, prefix in _FIB_LOCAL.findall(text):
        try:
            out.add(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        except ValueError:
            continue
    return out


def parse_if_inet6(text: str) -> set[Network]:
    """The addresses of ``/proc/net/if_inet6`` (32 hex digits first on each line) as /128s."""
    out: set[Network] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                out.add(ipaddress.IPv6Network((int(fields[0], 16), 128)))
            except ValueError:
                continue
    return out


_NLMSG = struct.Struct("=LHHLL")  # nlmsghdr: length, type, flags, sequence, port id
_IFADDRMSG = struct.Struct("=BBBBL")  # family, prefix length, flags, scope, interface index
_RTATTR = struct.Struct("=HH")  # length, type
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2


def parse_rtm_newaddr(body: bytes) -> bytes | None:
    """The packed local address of one RTM_NEWADDR body: IFA_LOCAL, else IFA_ADDRESS (on a
    point-to-point link IFA_ADDRESS is the peer's, IFA_LOCAL this host's)."""
    if len(body) < _IFADDRMSG.size:
        return None
    family = body[0]
    attrs: dict[int, bytes] = {}
    offset = _IFADDRMSG.size
    while offset + _RTATTR.size <= len(body):
        length, kind = _RTATTR.unpack_from(body, offset)
        if length < _RTATTR.size:
            break
        attrs[kind] = body[offset + _RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    value = attrs.get(_IFA_LOCAL) or attrs.get(_IFA_ADDRESS)
    if value is None or (family, len(value)) not in ((socket.AF_INET, 4), (socket.AF_INET6, 16)):
        return None
    return value


def netlink_addresses(timeout: float = 2.0) -> set[Network]:
    """Every address of every interface, from an rtnetlink RTM_GETADDR dump (Linux)."""
    found: set[Network] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:  # NETLINK_ROUTE
        sock.settimeout(timeout)
        sock.bind((0, 0))
        request = _NLMSG.pack(
            _NLMSG.size + _IFADDRMSG.size, _RTM_GETADDR, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
        ) + _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.sendall(request)
        for _ in range(10_000):  # bounded: one datagram holds many addresses
            data = sock.recv(1 << 16)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    return found
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    raise OSError("rtnetlink answered an error")
                if kind == _RTM_NEWADDR:
                    raw = parse_rtm_newaddr(data[offset + _NLMSG.size : offset + length])
                    if raw is not None:
                        found.add(ipaddress.ip_network(ipaddress.ip_address(raw)))
                offset += (length + 3) & ~3
    return found


def host_networks(proc: Path = Path("/proc/net")) -> tuple[Network, ...]:
    """This host's own addresses (sorted), from the kernel when possible."""
    found: set[Network] = set()
    try:
        found = netlink_addresses()
    except (OSError, AttributeError, ValueError):  # not Linux, or netlink refused
        found = set()
    if not found:
        try:
            found |= parse_fib_trie((proc / "fib_trie").read_text())
            found |= parse_if_inet6((proc / "if_inet6").read_text())
        except OSError:
            found.clear()
    if not found:
        try:
            infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("protect_local: cannot list this host's addresses (%s)", e)
            infos = []
        for info in infos:
            host = str(info[4][0]).partition("%")[0]
            found.add(ipaddress.ip_network(host))
    return tuple(sorted(found, key=lambda n: (n.version, n)))


def effective_rules(config: Config) -> RuleSet:
    """The config's rules, guarding this host's addresses when ``protect_local`` is on."""
    if config.rules.protect_local:
        return config.rules.with_host_addresses(host_networks())
    return config.rules
