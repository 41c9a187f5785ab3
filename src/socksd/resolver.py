"""Name resolution for CONNECT targets: one small interface, several sources.

A :class:`Resolver` turns ``(host, port)`` into a list of :data:`AddrInfo` tuples, the shape
``getaddrinfo`` returns, because the server hands that list straight to
``aiohappyeyeballs.start_connection``. Every resolver returns IP literals as they are, without a
lookup, and raises :class:`ResolutionError` (an ``OSError``, so callers that map ``OSError`` to a
SOCKS reply code keep working) when a name has no address or the lookup times out.

A fully qualified name (one trailing dot) is the same host as without it: every resolver looks up
and compares names in the form of ``_normalize`` (lower case, no trailing dot), so ``localhost.``
finds /etc/hosts' ``localhost`` and ``db.internal.`` the hosts map's ``db.internal``, for CONNECT,
BIND's expected peer and UDP alike (they all resolve here; the rules compare the same form).

Sources:

- :class:`SystemResolver`: the platform's ``getaddrinfo`` (``/etc/hosts``, nsswitch, the system's
  DNS), run by the event loop in its thread pool and bounded by a timeout. The timeout frees the
  caller, not the thread: a hung lookup keeps its worker thread until libc gives up.
- :class:`StaticResolver`: a fixed name -> addresses map checked first, like ``/etc/hosts``, with a
  fallback resolver for the names it does not hold.
- :class:`DnsResolver`: asks configured DNS servers directly, with no thread per lookup, through
  dnspython's asyncio stub resolver (the wire format, UDP with TCP when an answer is truncated,
  random IDs and source ports, replies checked against the query, CNAME chains: all dnspython's;
  we only connect its UDP sockets, see :class:`_ConnectedUdpBackend`).
  A and AAAA are asked at the same time; the answer is AAAA addresses then A addresses
  (aiohappyeyeballs interleaves families). It never reads ``/etc/resolv.conf``: only the given
  servers are asked, and a name is asked as it is, absolute, with no search domain appended.

What :class:`DnsResolver` adds to dnspython: a cache of one entry per name (positive answers for
their TTL, at most :data:`MAX_CACHE_TTL`; NXDOMAIN and "no A or AAAA" for the negative TTL of
RFC 2308, at most :data:`MAX_NEGATIVE_TTL`; failures and timeouts are not cached), bounded in
size; the deadline; and the reasons given in :class:`ResolutionError`.

Time: ``timeout`` bounds a whole ``resolve()`` call for every resolver. :class:`DnsResolver` lets
each query to one server wait an equal share of it (``attempts`` rounds over the servers, as in
``resolv.conf``); a server that fails (refused, SERVFAIL) is dropped for that lookup and the next
one asked at once. A name whose DNS answers hold only the unspecified address (``0.0.0.0``,
``::``, what sinkhole resolvers answer for blocked names) has no address: connecting there
reaches this host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import dns._asyncio_backend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
"""One ``getaddrinfo`` result: family, type, proto, canonname, sockaddr."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CACHE_TTL = 300
"""Longest time (seconds) a DNS answer is kept, whatever TTL the server gave."""

MAX_NEGATIVE_TTL = 60
"""Longest time (seconds) a name with no address (NXDOMAIN, no A or AAAA) is remembered as such."""


class ResolutionError(OSError):
    """``host`` has no address (no such name or records, a server failure) or timed out."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"cannot resolve {host!r}: {reason}")
        self.host = host
        self.reason = reason


class Resolver(Protocol):
    """Turns a host name or IP literal and a port into addresses to connect to."""

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Return the addresses of ``host`` (never empty); raise :class:`ResolutionError`."""
        ...


def _addrinfo(ip: IPAddress, port: int, host: str) -> AddrInfo:
    """The ``getaddrinfo``-shaped entry for ``ip``; a scoped IPv6 address gets its scope id."""
    if isinstance(ip, ipaddress.IPv4Address):
        return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (str(ip), port))
    scope_id = 0
    if ip.scope_id:
        try:
            scope_id = (
                int(ip.scope_id) if ip.scope_id.isdigit() else socket.if_nametoindex(ip.scope_id)
            )
        except OSError:
            raise ResolutionError(host, f"no network interface {ip.scope_id!r}") from None
        ip = ipaddress.IPv6Address(int(ip))
    return (
        socket.AF_INET6,
        socket.SOCK_STREAM,
        socket.IPPROTO_TCP,
        "",
        (str(ip), port, 0, scope_id),
    )


def _literal(host: str, port: int) -> list[AddrInfo] | None:
    """The single address of ``host`` when it is an IP literal, else None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return [_addrinfo(ip, port, host)]


def _normalize(name: str) -> str:
    """Lower-case ``name`` and drop one trailing dot: the key names are compared by."""
    return name.lower().removesuffix(".")


class SystemResolver:
    """Resolves with the platform's ``getaddrinfo``, bounded by ``timeout`` seconds."""

    def __init__(self, timeout: float = 5.0) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        self.timeout = timeout

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Return ``getaddrinfo``'s IPv4 and IPv6 results for ``host`` in its order (RFC 6724)."""
        literal = _literal(host, port)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                infos = await loop.getaddrinfo(_normalize(host), port, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise ResolutionError(host, f"no answer within {self.timeout:g} s") from None
        except socket.gaierror as exc:
            raise ResolutionError(host, exc.strerror or str(exc)) from exc
        except UnicodeError as exc:  # the IDNA encoding of the name failed
            raise ResolutionError(host, f"not a valid domain name ({exc})") from exc
        result: list[AddrInfo] = [
            (family, kind, proto, canonname, tuple(sockaddr))
            for family, kind, proto, canonname, sockaddr in infos
            if family in (socket.AF_INET, socket.AF_INET6)
            and not ipaddress.ip_address(sockaddr[0]).is_unspecified
        ]
        if not result:
            raise ResolutionError(host, "no IPv4 or IPv6 address")
        return result


class StaticResolver:
    """A fixed ``name -> IP literals`` map; other names go to ``fallback``.

    Names match case-insensitively and with or without a trailing dot. Addresses are returned in
    the order given.
    """

    def __init__(
        self, hosts: Mapping[str, Sequence[str]], fallback: Resolver | None = None
    ) -> None:
        table: dict[str, tuple[IPAddress, ...]] = {}
        for name, values in hosts.items():
            key = _normalize(name)
            if not key:
                raise ValueError(f"hosts entry {name!r}: empty host name")
            if key in table:
                raise ValueError(f"hosts entry {name!r}: host listed twice")
            if isinstance(values, str):  # a lone string would be taken as a list of characters
                raise ValueError(f"hosts entry {name!r}: addresses must be a list, not {values!r}")
            if not values:
                raise ValueError(f"hosts entry {name!r}: no addresses")
            ips: list[IPAddress] = []
            for value in values:
                try:
                    ips.append(ipaddress.ip_address(value))
                except ValueError:
                    raise ValueError(
                        f"hosts entry {name!r}: {value!r} is not an IP address"
                    ) from None
            table[key] = tuple(ips)
        self._table = table
        self.fallback = fallback

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Return the mapped addresses of ``host``, or ask the fallback."""
        literal = _literal(host, port)
        if literal is not None:
            return literal
        ips = self._table.get(_normalize(host))
        if ips is not None:
            return [_addrinfo(ip, port, host) for ip in ips]
        if self.fallback is None:
            raise ResolutionError(host, "not in the hosts map")
        return await self.fallback.resolve(host, port)


class _Status(Enum):
    """How the query for one record type ended."""

    ANSWER = "answer"  # NOERROR: the addresses (possibly none) are final
    NXDOMAIN = "nxdomain"  # the name does not exist
    FAILED = "failed"  # no answer in time, or every server failed (SERVFAIL, REFUSED, I/O error)


@dataclass(frozen=True, slots=True)
class _Outcome:
    """Result of the query for one record type, after dnspython's tries."""

    status: _Status
    addresses: tuple[IPAddress, ...] = ()
    ttl: int = 0  # of the addresses; for an answer without any, how long that may be cached
    detail: str = ""
    cause: BaseException | None = None  # of a failure: the last server's error, when one


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    expires: float  # time.monotonic() deadline
    addresses: tuple[IPAddress, ...]  # empty: a negative entry, ``reason`` says why
    reason: str = ""


def _query_name(host: str) -> dns.name.Name:
    """The absolute, IDNA-encoded name for ``host``; raise ResolutionError if impossible.

    Absolute, so dnspython never appends a search domain: ``db`` is asked as ``db.``.
    """
    try:
        encoded = _normalize(host).encode("idna")
    except UnicodeError as exc:
        raise ResolutionError(host, f"not a valid domain name ({exc})") from None
    if not encoded or len(encoded) > 253:
        raise ResolutionError(host, "not a valid domain name (empty or too long)")
    try:
        # Built from byte labels: from_text() would decode "\DDD" escapes in the name.
        return dns.name.Name([*encoded.split(b"."), b""])
    except dns.exception.DNSException as exc:  # an empty or too long label
        raise ResolutionError(host, f"not a valid domain name ({exc})") from None


def _addresses(answer: dns.resolver.Answer, version: int) -> _Outcome:
    """The usable addresses of a NOERROR answer (CNAMEs already followed by dnspython)."""
    ttl = int(answer.chaining_result.minimum_ttl)  # CNAMEs and addresses, or the SOA's
    if answer.rrset is None:  # no records of that type: a negative answer
        return _Outcome(_Status.ANSWER, (), ttl)
    ips: list[IPAddress] = []
    for rdata in answer.rrset:
        ip = ipaddress.ip_address(rdata.address)
        if ip.version == version and not ip.is_unspecified:  # sinkholes answer 0.0.0.0 / ::
            ips.append(ip)
    return _Outcome(_Status.ANSWER, tuple(ips), ttl)


def _negative_ttl(exc: dns.resolver.NXDOMAIN) -> int:
    """How long an NXDOMAIN may be cached: the SOA's TTL and minimum (RFC 2308), or 0."""
    responses: dict[dns.name.Name, dns.message.Message] = exc.kwargs.get("responses") or {}
    ttls = []
    for response in responses.values():
        if not isinstance(response, dns.message.QueryMessage):
            return 0
        try:
            ttls.append(int(response.resolve_chaining().minimum_ttl))
        except dns.exception.DNSException:
            return 0
    return min(ttls, default=0)


class DnsResolver:
    """Asks DNS ``servers`` (IP literal, port) directly, with dnspython's asyncio stub resolver.

    ``timeout`` bounds a whole ``resolve()``; each query to one server waits at most an equal
    share of it, so that every server is tried ``attempts`` times when all are silent. Answers
    are cached for their TTL (at most :data:`MAX_CACHE_TTL` seconds), names with no address for
    their negative TTL (at most :data:`MAX_NEGATIVE_TTL` seconds), in one LRU of ``cache_size``
    names (0 disables the cache).
    """

    def __init__(
        self,
        servers: Sequence[tuple[str, int]],
        timeout: float = 5.0,
        attempts: int = 2,
        cache_size: int = 4096,
    ) -> None:
        if not servers:
            raise ValueError("no DNS servers given")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must not be negative, not {cache_size!r}")
        checked: list[tuple[str, int]] = []
        for host, port in servers:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"DNS server {host!r} is not an IP address") from None
            if not 0 < port <= 0xFFFF:
                raise ValueError(f"DNS server {host!r}: port {port!r} out of range")
            checked.append((str(ip), port))
        self.servers: tuple[tuple[str, int], ...] = tuple(checked)
        self.timeout = timeout
        self.attempts = attempts
        self.cache_size = cache_size
        # configure=False: no /etc/resolv.conf, so no other server, search list or ndots.
        stub = dns.asyncresolver.Resolver(configure=False)
        nameservers = [dns.nameserver.Do53Nameserver(ip, port) for ip, port in checked]
        stub.nameservers = nameservers
        stub.lifetime = timeout
        stub.timeout = timeout / (attempts * len(checked))
        stub.retry_servfail = False  # a server that answered SERVFAIL is not asked again
        stub.cache = None  # our cache below: per name, capped TTLs, monotonic clock
        self._stub = stub
        self._backend = _ConnectedUdpBackend()
        self._where = "DNS server " + ", ".join(_format_server(s) for s in checked)
        self._names = {
            str(ns): _format_server(s) for ns, s in zip(nameservers, checked, strict=True)
        }
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Return the AAAA then A addresses of ``host`` (from the cache when fresh)."""
        literal = _literal(host, port)
        if literal is not None:
            return literal
        key = _normalize(host)
        cached = self._cache_get(key)
        if cached is not None:
            if not cached.addresses:
                raise ResolutionError(host, cached.reason)
            return [_addrinfo(ip, port, host) for ip in cached.addresses]
        qname = _query_name(host)
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with asyncio.TaskGroup() as group:
            aaaa_task = group.create_task(self._lookup(qname, dns.rdatatype.AAAA, deadline))
            a_task = group.create_task(self._lookup(qname, dns.rdatatype.A, deadline))
        aaaa, a = aaaa_task.result(), a_task.result()
        outcomes = (aaaa, a)
        addresses = aaaa.addresses + a.addresses
        complete = all(o.status is not _Status.FAILED for o in outcomes)
        if addresses:
            if complete:  # a failed family would stay hidden for the TTL
                ttl = min(o.ttl for o in outcomes if o.addresses)
                self._cache_put(key, addresses, min(ttl, MAX_CACHE_TTL))
            return [_addrinfo(ip, port, host) for ip in addresses]
        if not complete:
            failed = a if a.status is _Status.FAILED else aaaa
            raise ResolutionError(host, failed.detail) from failed.cause
        if all(o.status is _Status.NXDOMAIN for o in outcomes):
            reason = "no such domain (NXDOMAIN)"
        else:
            reason = "no A or AAAA records"
        self._cache_put(key, (), min(*(o.ttl for o in outcomes), MAX_NEGATIVE_TTL), reason)
        raise ResolutionError(host, reason)

    def _cache_get(self, key: str) -> _CacheEntry | None:
        """The fresh cache entry of ``key``, or None (expired entries are dropped)."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry

    def _cache_put(
        self, key: str, addresses: tuple[IPAddress, ...], ttl: int, reason: str = ""
    ) -> None:
        """Keep ``addresses`` (none: ``reason``) for ``ttl`` seconds, evicting the least used."""
        if ttl <= 0 or self.cache_size == 0:
            return
        self._cache[key] = _CacheEntry(time.monotonic() + ttl, addresses, reason)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(
        self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType, deadline: float
    ) -> _Outcome:
        """Ask the servers for ``rdtype`` records of ``qname`` until ``deadline``."""
        try:
            # Our deadline, not only dnspython's lifetime: it may sleep (back off) past it.
            async with asyncio.timeout_at(deadline):
                answer = await self._stub.resolve(
                    qname,
                    rdtype,
                    raise_on_no_answer=False,
                    search=False,
                    backend=self._backend,
                )
        except (TimeoutError, dns.exception.Timeout):  # LifetimeTimeout is a Timeout
            return _Outcome(
                _Status.FAILED, detail=f"no answer from {self._where} within {self.timeout:g} s"
            )
        except dns.resolver.NXDOMAIN as exc:
            return _Outcome(_Status.NXDOMAIN, ttl=_negative_ttl(exc))
        except dns.resolver.NoNameservers as exc:
            errors = exc.kwargs.get("errors") or []
            cause = errors[-1][3] if errors else None  # e.g. no descriptor for the query's socket
            return _Outcome(
                _Status.FAILED,
                detail=self._server_failure(exc),
                cause=cause if isinstance(cause, BaseException) else None,
            )
        except dns.exception.DNSException as exc:  # YXDOMAIN, and what dnspython adds later
            return _Outcome(_Status.FAILED, detail=f"{self._where}: {exc}")
        return _addresses(answer, 6 if rdtype == dns.rdatatype.AAAA else 4)

    def _server_failure(self, exc: dns.resolver.NoNameservers) -> str:
        """What the last server tried did: ``DNS server 1.2.3.4:53 answered SERVFAIL``, ..."""
        errors = exc.kwargs.get("errors") or []
        if not errors:
            return "no DNS server answered"
        server, _tcp, _port, error, _response = errors[-1]
        where = f"DNS server {self._names.get(str(server), server)}"
        if isinstance(error, str):  # an rcode dnspython gave up on: SERVFAIL, REFUSED, ...
            return f"{where} answered {error}"
        return f"{where}: {error}"


class _ConnectedUdpBackend(dns._asyncio_backend.Backend):
    """dnspython's asyncio backend (asyncio and uvloop alike), with each query's UDP socket
    connected to its server, as dnspython does for trio: the kernel drops datagrams from any
    other address, and an ICMP port unreachable (no DNS server there) fails the try at once, so
    dnspython drops that server and asks the next instead of waiting out the try's timeout."""

    def datagram_connection_required(self) -> bool:
        return True


def _format_server(server: tuple[str, int]) -> str:
    """``1.2.3.4:53`` or ``[::1]:53``."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_dns_server(text: str) -> tuple[str, int]:
    """Parse ``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]`` or ``[::1]:53`` (port 53 default)."""
    value = text.strip()
    port_text: str | None = None
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"DNS server {text!r}: expected [IPv6] or [IPv6]:port")
        if rest:
            port_text = rest[1:]
        if ":" not in host:
            raise ValueError(f"DNS server {text!r}: brackets are only for IPv6 addresses")
    elif value.count(":") == 1:  # IPv4:port; a bare IPv6 address has at least two colons
        host, _, port_text = value.partition(":")
    else:
        host = value
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"DNS server {text!r}: {host!r} is not an IP address") from None
    port = 53
    if port_text is not None:
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) <= 0xFFFF):
            raise ValueError(f"DNS server {text!r}: port {port_text!r} is not in 1-65535")
        port = int(port_text)
    return str(ip), port


def make_resolver(
    hosts: Mapping[str, Sequence[str]] | None,
    dns_servers: Sequence[str] | None,
    timeout: float,
) -> Resolver:
    """Build the server's resolver: ``hosts`` map first, then the DNS servers or the system's."""
    base: Resolver
    if dns_servers:
        base = DnsResolver([parse_dns_server(s) for s in dns_servers], timeout=timeout)
    else:
        base = SystemResolver(timeout)
    return StaticResolver(hosts, base) if hosts else base
