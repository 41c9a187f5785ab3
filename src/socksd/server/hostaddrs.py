"""The addresses of this host, for the ``protect_local`` rule (no proxying into the proxy host).

On Linux they come from the kernel: ``/proc/net/fib_trie`` lists the IPv4 routes of type LOCAL
(every address of every interface, and all of 127.0.0.0/8) and ``/proc/net/if_inet6`` every IPv6
address. Both are read in the server's network namespace. Elsewhere, or when they cannot be read,
the addresses the host name resolves to are used. They are read at start and on each reload
(SIGHUP): an address added later is guarded from the next reload on.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
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


def host_networks(proc: Path = Path("/proc/net")) -> tuple[Network, ...]:
    """This host's own addresses (sorted), from the kernel when possible."""
    found: set[Network] = set()
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
