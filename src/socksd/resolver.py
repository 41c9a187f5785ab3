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
- :class:`DnsResolver`: asks configured DNS servers directly over UDP (TCP when the UDP answer is
  truncated), with no thread per lookup and a small positive cache. A and AAAA are asked at the same
  time; the answer is AAAA addresses then A addresses (aiohappyeyeballs interleaves families).

Defences of :class:`DnsResolver` against forged answers: each query goes out on a fresh UDP socket
(a random source port from the kernel) that is connected to the server (the kernel drops datagrams
from any other address), with a random 16-bit ID; a datagram whose ID, QR flag or question does
not match the query is ignored and the wait goes on.

Time: ``timeout`` bounds a whole ``resolve()`` call for every resolver. :class:`DnsResolver` shares
it among its tries (``attempts`` rounds over the servers, as in ``resolv.conf``): each try gets an
equal share of the time still left, so a server that fails fast leaves more time to the next.
A name whose DNS answers hold only the unspecified address (``0.0.0.0``, ``::``, what sinkhole
resolvers answer for blocked names) has no address: connecting there reaches this host.
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import dnslib

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
"""One ``getaddrinfo`` result: family, type, proto, canonname, sockaddr."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_CACHE_TTL = 300
"""Longest time (seconds) a DNS answer is kept, whatever TTL the server gave."""

_MAX_CNAME_CHAIN = 16
_TCP_LENGTH = struct.Struct("!H")


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
    """How one query (one name, one record type) ended."""

    ANSWER = "answer"  # NOERROR: the addresses (possibly none) are final
    NXDOMAIN = "nxdomain"  # the name does not exist
    FAILED = "failed"  # every try timed out, failed, or got SERVFAIL/REFUSED/...


@dataclass(frozen=True, slots=True)
class _Outcome:
    """Result of one query after all its tries."""

    status: _Status
    addresses: tuple[IPAddress, ...] = ()
    ttl: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _CacheEntry:
    expires: float  # time.monotonic() deadline
    addresses: tuple[IPAddress, ...]


def _query_name(host: str) -> Any:
    """The ``dnslib.DNSLabel`` for ``host``, IDNA-encoded; raise ResolutionError if impossible."""
    try:
        encoded = _normalize(host).encode("idna")
    except UnicodeError as exc:
        raise ResolutionError(host, f"not a valid domain name ({exc})") from None
    if not encoded or len(encoded) > 253:
        raise ResolutionError(host, "not a valid domain name (empty or too long)")
    # Built from byte labels: a str would go through dnslib's "\DDD" escape decoding.
    return dnslib.DNSLabel(tuple(encoded.split(b".")))


def _match_reply(data: bytes, query: Any) -> Any | None:
    """Parse ``data`` as the answer to ``query``; None if it is not (wrong ID or question, junk)."""
    if data[:2] != query.header.id.to_bytes(2, "big"):  # cheap check before a full parse
        return None
    try:
        reply = dnslib.DNSRecord.parse(data)
    except Exception:  # untrusted bytes: dnslib raises more than DNSError on some malformed rdata
        return None
    if not reply.header.qr or reply.questions != query.questions:
        return None
    return reply


def _addresses(reply: Any, qname: Any, qtype: int) -> tuple[tuple[IPAddress, ...], int]:
    """Addresses of type ``qtype`` for ``qname`` in the answer section, following CNAMEs.

    Also returns the smallest TTL of the records used (the CNAMEs and the address set).
    """
    version = 4 if qtype == dnslib.QTYPE.A else 6
    name = qname
    ttl = MAX_CACHE_TTL
    for _ in range(_MAX_CNAME_CHAIN):
        records = [rr for rr in reply.rr if rr.rclass == dnslib.CLASS.IN and rr.rname == name]
        found = [rr for rr in records if rr.rtype == qtype]
        if found:
            ips: list[IPAddress] = []
            for rr in found:
                ttl = min(ttl, int(rr.ttl))
                try:
                    ip = ipaddress.ip_address(str(rr.rdata))
                except ValueError:  # malformed rdata: skip the record, keep the others
                    continue
                if ip.version == version and not ip.is_unspecified:
                    ips.append(ip)
            return tuple(ips), ttl
        cname = next((rr for rr in records if rr.rtype == dnslib.QTYPE.CNAME), None)
        if cname is None:
            break
        ttl = min(ttl, int(cname.ttl))
        name = cname.rdata.label
    return (), 0


def _rcode_name(rcode: int) -> str:
    """``SERVFAIL`` for 2, and so on; the number for codes dnslib does not know."""
    return str(dnslib.RCODE.get(rcode, str(rcode)))


class _UdpExchange(asyncio.DatagramProtocol):
    """Waits on a connected UDP socket for the datagram that answers ``query``."""

    def __init__(self, query: Any, waiter: asyncio.Future[Any]) -> None:
        self._query = query
        self._waiter = waiter

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Complete the wait with a matching reply; ignore anything else."""
        if self._waiter.done():
            return
        reply = _match_reply(data, self._query)
        if reply is not None:
            self._waiter.set_result(reply)

    def error_received(self, exc: Exception) -> None:
        """An ICMP error (port unreachable: no DNS server there) ends this try."""
        if not self._waiter.done():
            self._waiter.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """The socket closed before a reply came."""
        if not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionError("DNS socket closed"))


class DnsResolver:
    """Asks DNS ``servers`` (IP literal, port) directly over UDP, TCP for truncated answers.

    ``timeout`` bounds a whole ``resolve()``; ``attempts`` is the number of rounds over the
    servers. Positive answers are cached for their TTL (at most :data:`MAX_CACHE_TTL` seconds) in
    an LRU of ``cache_size`` names (0 disables the cache).
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
        self._tries = [server for _ in range(attempts) for server in self.servers]
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        """Return the AAAA then A addresses of ``host`` (from the cache when fresh)."""
        literal = _literal(host, port)
        if literal is not None:
            return literal
        key = _normalize(host)
        cached = self._cache_get(key)
        if cached is not None:
            return [_addrinfo(ip, port, host) for ip in cached]
        qname = _query_name(host)
        deadline = asyncio.get_running_loop().time() + self.timeout
        async with asyncio.TaskGroup() as group:
            aaaa_task = group.create_task(self._lookup(qname, dnslib.QTYPE.AAAA, deadline))
            a_task = group.create_task(self._lookup(qname, dnslib.QTYPE.A, deadline))
        aaaa, a = aaaa_task.result(), a_task.result()
        addresses = aaaa.addresses + a.addresses
        if addresses:
            if aaaa.status is not _Status.FAILED and a.status is not _Status.FAILED:
                # Cache only complete answers: a failed family would stay hidden for the TTL.
                ttl = min(o.ttl for o in (aaaa, a) if o.addresses)
                self._cache_put(key, addresses, ttl)
            return [_addrinfo(ip, port, host) for ip in addresses]
        if aaaa.status is _Status.NXDOMAIN and a.status is _Status.NXDOMAIN:
            raise ResolutionError(host, "no such domain (NXDOMAIN)")
        for outcome in (a, aaaa):
            if outcome.status is _Status.FAILED:
                raise ResolutionError(host, outcome.detail)
        raise ResolutionError(host, "no A or AAAA records")

    def _cache_get(self, key: str) -> tuple[IPAddress, ...] | None:
        """Fresh cached addresses of ``key``, or None (expired entries are dropped)."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.addresses

    def _cache_put(self, key: str, addresses: tuple[IPAddress, ...], ttl: int) -> None:
        """Keep ``addresses`` for ``ttl`` seconds (capped), evicting the least recently used."""
        ttl = min(ttl, MAX_CACHE_TTL)
        if ttl <= 0 or self.cache_size == 0:
            return
        self._cache[key] = _CacheEntry(time.monotonic() + ttl, addresses)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    async def _lookup(self, qname: Any, qtype: int, deadline: float) -> _Outcome:
        """Ask for ``qtype`` records of ``qname``, trying servers in turn until one answers."""
        loop = asyncio.get_running_loop()
        detail = "no DNS server tried"
        for index, server in enumerate(self._tries):
            budget = (deadline - loop.time()) / (len(self._tries) - index)
            if budget <= 0:
                break
            where = f"DNS server {_format_server(server)}"
            try:
                async with asyncio.timeout(budget):
                    reply = await self._exchange(server, qname, qtype)
            except TimeoutError:
                detail = f"no answer from {where} within {self.timeout:g} s"
                continue
            except OSError as exc:
                detail = f"{where}: {exc}"
                continue
            rcode = reply.header.rcode
            if rcode == dnslib.RCODE.NOERROR:
                addresses, ttl = _addresses(reply, qname, qtype)
                return _Outcome(_Status.ANSWER, addresses, ttl)
            if rcode == dnslib.RCODE.NXDOMAIN:
                return _Outcome(_Status.NXDOMAIN)
            detail = f"{where} answered {_rcode_name(rcode)}"
        return _Outcome(_Status.FAILED, detail=detail)

    async def _exchange(self, server: tuple[str, int], qname: Any, qtype: int) -> Any:
        """Send one query to ``server`` and return its reply (over TCP if UDP's is truncated)."""
        header = dnslib.DNSHeader(id=secrets.randbelow(0x10000), rd=1)
        query = dnslib.DNSRecord(header, q=dnslib.DNSQuestion(qname, qtype))
        packet: bytes = query.pack()
        reply = await _udp_exchange(server, query, packet)
        if reply.header.tc:
            reply = await _tcp_exchange(server, query, packet)
        return reply


def _format_server(server: tuple[str, int]) -> str:
    """``1.2.3.4:53`` or ``[::1]:53``."""
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _udp_exchange(server: tuple[str, int], query: Any, packet: bytes) -> Any:
    """Send ``packet`` from a fresh connected UDP socket and wait for the matching reply."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UdpExchange(query, waiter), remote_addr=server, family=family
    )
    try:
        transport.sendto(packet)
        return await waiter
    finally:
        transport.close()


async def _tcp_exchange(server: tuple[str, int], query: Any, packet: bytes) -> Any:
    """Send ``packet`` over TCP (2-byte length prefix, RFC 1035 4.2.2) and read the reply."""
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(_TCP_LENGTH.pack(len(packet)) + packet)
        await writer.drain()
        (length,) = _TCP_LENGTH.unpack(await reader.readexactly(_TCP_LENGTH.size))
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ConnectionError("DNS server closed the TCP connection mid-reply") from None
    finally:
        writer.close()
    reply = _match_reply(data, query)
    if reply is None:
        raise ConnectionError("DNS server sent a TCP reply that does not match the query")
    return reply


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
