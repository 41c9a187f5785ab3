"""Tests of socksd.resolver.

No DNS query leaves the machine: the system resolver is only asked about ``localhost`` and IP
literals (its failure paths are tested with a patched ``getaddrinfo``), and DnsResolver only talks
to the stub DNS server below, which runs in a thread on 127.0.0.1 (UDP and TCP on the same port).
"""

from __future__ import annotations

import asyncio
import re
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord

from socksd import resolver as resolver_module
from socksd.resolver import (
    MAX_CACHE_TTL,
    AddrInfo,
    DnsResolver,
    ResolutionError,
    Resolver,
    StaticResolver,
    SystemResolver,
    make_resolver,
    parse_dns_server,
)
from tests.helpers import refused_port

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

TIMEOUT = 0.3

# name -> record type -> (records, ttl). Names not here (and not special below) are NXDOMAIN.
ZONE: dict[str, dict[str, tuple[list[str], int]]] = {
    "a.test": {"A": (["192.0.2.1", "192.0.2.2"], 60), "AAAA": (["2001:db8::1"], 60)},
    "v4only.test": {"A": (["192.0.2.3"], 60)},
    "ttl0.test": {"A": (["192.0.2.8"], 0)},
    "long.test": {"A": (["192.0.2.9"], 86400)},
    "sinkhole.test": {"A": (["0.0.0.0"], 60), "AAAA": (["::"], 60)},
    "big.test": {"A": (["192.0.2.50", "192.0.2.51"], 60), "AAAA": (["2001:db8::50"], 60)},
    "spoof.test": {"A": (["192.0.2.7"], 60)},
}
CNAMES = {"alias.test": "alias2.test", "alias2.test": "a.test", "loop.test": "loop.test"}
SERVFAIL = {"servfail.test"}
SILENT = {"silent.test"}
TRUNCATED = {"big.test"}
SPOOFED = {"spoof.test"}


class StubDns:
    """A tiny authoritative-ish DNS server for the names above, counting the queries it gets."""

    def __init__(self, *, servfail_all: bool = False) -> None:
        self.servfail_all = servfail_all
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self.udp, self.tcp = _bind_pair()
        self.address: tuple[str, int] = self.udp.getsockname()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def count(self, name: str, qtype: str | None = None, transport: str | None = None) -> int:
        """How many queries for ``name`` (of ``qtype``, over ``transport``) came in."""
        return sum(
            n
            for (qname, t, tr), n in self.queries.items()
            if qname == name and qtype in (None, t) and transport in (None, tr)
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.udp.close()
        self.tcp.close()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.udp, selectors.EVENT_READ)
            sel.register(self.tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.fileobj is self.udp:
                        data, peer = self.udp.recvfrom(4096)
                        for datagram in self._answer(data, "udp"):
                            self.udp.sendto(datagram, peer)
                    else:
                        conn, _ = self.tcp.accept()
                        with conn:
                            self._serve_tcp(conn)

    def _serve_tcp(self, conn: socket.socket) -> None:
        conn.settimeout(2)
        (length,) = struct.unpack("!H", _recv_exactly(conn, 2))
        for message in self._answer(_recv_exactly(conn, length), "tcp"):
            conn.sendall(struct.pack("!H", len(message)) + message)

    def _answer(self, data: bytes, transport: str) -> list[bytes]:
        query = DNSRecord.parse(data)
        name = str(query.q.qname).lower().rstrip(".")
        qtype = QTYPE[query.q.qtype]
        self.queries[name, qtype, transport] += 1
        reply = query.reply()
        if self.servfail_all or name in SERVFAIL:
            reply.header.rcode = RCODE.SERVFAIL
            return [reply.pack()]
        if name in SILENT:
            return []
        if name in TRUNCATED and transport == "udp":
            reply.header.tc = 1
            return [reply.pack()]
        owner = name
        while owner in CNAMES and len(reply.rr) < 8:
            reply.add_answer(RR(owner, QTYPE.CNAME, rdata=CNAME(CNAMES[owner]), ttl=60))
            owner = CNAMES[owner]
        if owner not in ZONE and owner not in CNAMES:
            reply.header.rcode = RCODE.NXDOMAIN
            return [reply.pack()]
        values, ttl = ZONE.get(owner, {}).get(qtype, ([], 60))
        rdata = A if qtype == "A" else AAAA
        for value in values:
            reply.add_answer(RR(owner, query.q.qtype, rdata=rdata(value), ttl=ttl))
        if name not in SPOOFED:
            return [reply.pack()]
        # Forgeries first: wrong ID, right ID with junk, right ID with another question.
        forged = query.reply()
        forged.header.id = (query.header.id + 1) % 0x10000
        forged.add_answer(RR(name, QTYPE.A, rdata=A("203.0.113.66"), ttl=60))
        other = DNSRecord.question("other.test", qtype).reply()
        other.header.id = query.header.id
        other.add_answer(RR("other.test", QTYPE.A, rdata=A("203.0.113.67"), ttl=60))
        junk = data[:2] + b"\xff" * 5
        return [forged.pack(), junk, other.pack(), reply.pack()]


def _bind_pair() -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on the same free 127.0.0.1 port."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind(udp.getsockname())
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen()
        return udp, tcp
    raise RuntimeError("no free port pair")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


@pytest.fixture
def stub() -> Iterator[StubDns]:
    server = StubDns()
    yield server
    server.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner[Any]:
    """Run a coroutine on a fresh loop of either implementation (the server may use both)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.SelectorEventLoop

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        with asyncio.Runner(loop_factory=factory) as r:
            return r.run(coro)

    return runner


def ips(infos: Sequence[AddrInfo]) -> list[str]:
    return [info[4][0] for info in infos]


def dns(stub: StubDns, **kwargs: Any) -> DnsResolver:
    kwargs.setdefault("timeout", TIMEOUT)
    return DnsResolver([stub.address], **kwargs)


# --- IP literals: returned as they are by every resolver ---------------------------------------


def _all_resolvers() -> list[Resolver]:
    dead = ("127.0.0.1", refused_port(kind=socket.SOCK_DGRAM))
    return [SystemResolver(TIMEOUT), StaticResolver({}), DnsResolver([dead], timeout=TIMEOUT)]


@pytest.mark.parametrize("resolver", _all_resolvers(), ids=["system", "static", "dns"])
def test_literals_are_returned_without_lookup(resolver: Resolver, run: Runner[Any]) -> None:
    assert run(resolver.resolve("127.0.0.1", 80)) == [
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 80))
    ]
    assert run(resolver.resolve("::1", 443)) == [
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", 443, 0, 0))
    ]
    assert run(resolver.resolve("fe80::1%3", 22))[0][4] == ("fe80::1", 22, 0, 3)
    lo_index = socket.if_nametoindex("lo")
    assert run(resolver.resolve("fe80::1%lo", 22))[0][4] == ("fe80::1", 22, 0, lo_index)
    with pytest.raises(ResolutionError, match="no network interface"):
        run(resolver.resolve("fe80::1%nosuchif0", 22))


def test_literal_sends_no_query(stub: StubDns, run: Runner[Any]) -> None:
    run(dns(stub).resolve("192.0.2.1", 80))
    assert not stub.queries


# --- SystemResolver ----------------------------------------------------------------------------


def test_system_resolves_localhost(run: Runner[Any]) -> None:
    infos = run(SystemResolver(5.0).resolve("localhost", 8080))
    assert "127.0.0.1" in ips(infos)
    for family, kind, _, _, sockaddr in infos:
        assert family in (socket.AF_INET, socket.AF_INET6)
        assert kind == socket.SOCK_STREAM
        assert sockaddr[1] == 8080


def test_system_fully_qualified_name_is_the_same_host(run: Runner[Any]) -> None:
    """getaddrinfo does not find ``localhost.`` in /etc/hosts: the resolver drops the dot."""
    infos = run(SystemResolver(5.0).resolve("LocalHost.", 8080))
    assert "127.0.0.1" in ips(infos)


def _patched_runner(fake: Callable[..., Coroutine[Any, Any, Any]]) -> Runner[Any]:
    """Run on an asyncio loop whose getaddrinfo is ``fake`` (no real lookup is made)."""

    def runner(coro: Coroutine[Any, Any, T]) -> T:
        loop = asyncio.SelectorEventLoop()
        loop.getaddrinfo = fake  # type: ignore[method-assign]
        with asyncio.Runner(loop_factory=lambda: loop) as r:
            return r.run(coro)

    return runner


def test_system_gaierror_becomes_resolution_error() -> None:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ResolutionError, match=r"'nx\.test': Name or service not known") as info:
        _patched_runner(fail)(SystemResolver(TIMEOUT).resolve("nx.test", 80))
    assert isinstance(info.value, OSError)
    assert info.value.host == "nx.test"


def test_system_timeout() -> None:
    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(10)

    start = time.monotonic()
    with pytest.raises(ResolutionError, match=r"no answer within 0\.3 s"):
        _patched_runner(hang)(SystemResolver(TIMEOUT).resolve("slow.test", 80))
    assert time.monotonic() - start < 2


def test_system_keeps_order_and_drops_other_families() -> None:
    results = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 80, 0, 0)),
        (socket.AF_UNIX, socket.SOCK_STREAM, 0, "", ("/x",)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("0.0.0.0", 80)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 80)),
    ]

    async def fake(*args: Any, **kwargs: Any) -> Any:
        assert kwargs["type"] == socket.SOCK_STREAM
        return results

    infos = _patched_runner(fake)(SystemResolver(TIMEOUT).resolve("x.test", 80))
    assert ips(infos) == ["2001:db8::1", "192.0.2.1"]


def test_system_rejects_bad_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SystemResolver(0)


# --- StaticResolver ----------------------------------------------------------------------------


class RecordingResolver:
    """A fallback that records what it is asked and answers 192.0.2.99."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[AddrInfo]:
        self.asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.99", port))]


def test_static_names_case_and_trailing_dot(run: Runner[Any]) -> None:
    static = StaticResolver({"Db.Example.": ["192.0.2.5", "2001:db8::5"], "web": ["192.0.2.6"]})
    for name in ("db.example", "DB.EXAMPLE.", "Db.Example"):
        infos = run(static.resolve(name, 5432))
        assert infos == [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.5", 5432)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::5", 5432, 0, 0)),
        ]
    assert ips(run(static.resolve("web.", 80))) == ["192.0.2.6"]


def test_static_fallback(run: Runner[Any]) -> None:
    fallback = RecordingResolver()
    static = StaticResolver({"web": ["192.0.2.6"]}, fallback)
    assert ips(run(static.resolve("web", 80))) == ["192.0.2.6"]
    assert ips(run(static.resolve("other.test", 80))) == ["192.0.2.99"]
    assert fallback.asked == ["other.test"]


def test_static_without_fallback(run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match=r"'other\.test'.*not in the hosts map"):
        run(StaticResolver({"web": ["192.0.2.6"]}).resolve("other.test", 80))


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ({"db": ["192.0.2.1", "192.0.2.300"]}, r"'db': '192\.0\.2\.300' is not an IP address"),
        ({"db": ["db2.example"]}, r"'db': 'db2\.example' is not an IP address"),
        ({"db": "192.0.2.1"}, "must be a list"),
        ({"db": []}, "no addresses"),
        ({"db": ["192.0.2.1"], "DB.": ["192.0.2.2"]}, "listed twice"),
        ({".": ["192.0.2.1"]}, "empty host name"),
    ],
)
def test_static_validates_at_construction(hosts: Mapping[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StaticResolver(hosts)


# --- DnsResolver -------------------------------------------------------------------------------


def test_dns_aaaa_then_a(stub: StubDns, run: Runner[Any]) -> None:
    infos = run(dns(stub).resolve("a.test", 443))
    assert infos == [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 443, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", 443)),
    ]
    assert stub.count("a.test", "A", "udp") == 1
    assert stub.count("a.test", "AAAA", "udp") == 1


def test_dns_one_family(stub: StubDns, run: Runner[Any]) -> None:
    assert ips(run(dns(stub).resolve("v4only.test", 80))) == ["192.0.2.3"]


def test_dns_follows_cname_chain(stub: StubDns, run: Runner[Any]) -> None:
    infos = run(dns(stub).resolve("alias.test", 80))
    assert ips(infos) == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]


def test_dns_cname_loop_has_no_address(stub: StubDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match="no A or AAAA records"):
        run(dns(stub).resolve("loop.test", 80))


def test_dns_nxdomain(stub: StubDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match=r"'nope\.test': no such domain \(NXDOMAIN\)") as info:
        run(dns(stub).resolve("nope.test", 80))
    assert isinstance(info.value, OSError)
    assert stub.count("nope.test") == 2  # one A, one AAAA: NXDOMAIN is final, no retry


def test_dns_servfail_after_all_attempts(stub: StubDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match="answered SERVFAIL"):
        run(dns(stub, attempts=3).resolve("servfail.test", 80))
    assert stub.count("servfail.test", "A") == 3
    assert stub.count("servfail.test", "AAAA") == 3


def test_dns_timeout(stub: StubDns, run: Runner[Any]) -> None:
    start = time.monotonic()
    with pytest.raises(ResolutionError, match=r"no answer from DNS server 127\.0\.0\.1:"):
        run(dns(stub, attempts=2).resolve("silent.test", 80))
    elapsed = time.monotonic() - start
    # the tries waited for the whole budget and shared it: not one timeout each
    assert TIMEOUT * 0.9 < elapsed < 2 * TIMEOUT
    assert stub.count("silent.test", "A") == 2
    assert stub.count("silent.test", "AAAA") == 2


def test_dns_truncated_answer_retried_over_tcp(stub: StubDns, run: Runner[Any]) -> None:
    infos = run(dns(stub).resolve("big.test", 80))
    assert ips(infos) == ["2001:db8::50", "192.0.2.50", "192.0.2.51"]
    assert stub.count("big.test", "A", "udp") == 1
    assert stub.count("big.test", "A", "tcp") == 1
    assert stub.count("big.test", "AAAA", "tcp") == 1


def test_dns_ignores_forged_replies(stub: StubDns, run: Runner[Any]) -> None:
    assert ips(run(dns(stub).resolve("spoof.test", 80))) == ["192.0.2.7"]


def test_dns_drops_unspecified_addresses(stub: StubDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match="no A or AAAA records"):
        run(dns(stub).resolve("sinkhole.test", 80))


def test_dns_invalid_name_sends_nothing(stub: StubDns, run: Runner[Any]) -> None:
    for name in ("a..test", "x" * 64 + ".test", "."):
        with pytest.raises(ResolutionError, match="not a valid domain name"):
            run(dns(stub).resolve(name, 80))
    assert not stub.queries


def test_dns_next_server_after_servfail(stub: StubDns, run: Runner[Any]) -> None:
    failing = StubDns(servfail_all=True)
    try:
        resolver = DnsResolver([failing.address, stub.address], timeout=TIMEOUT, attempts=1)
        assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
        assert failing.count("v4only.test") == 2
    finally:
        failing.close()


def test_dns_next_server_after_port_unreachable(stub: StubDns, run: Runner[Any]) -> None:
    dead = ("127.0.0.1", refused_port(kind=socket.SOCK_DGRAM))
    timeout = 8.0  # long, so that a loaded machine cannot blur "at once" and "after a timeout"
    resolver = DnsResolver([dead, stub.address], timeout=timeout, attempts=1)
    start = time.monotonic()
    assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
    # The ICMP error ends the first try at once; a lost datagram would have cost half the timeout.
    assert time.monotonic() - start < timeout / 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"servers": []}, "no DNS servers"),
        ({"servers": [("dns.example", 53)]}, "not an IP address"),
        ({"servers": [("127.0.0.1", 0)]}, "out of range"),
        ({"servers": [("127.0.0.1", 53)], "timeout": 0}, "timeout"),
        ({"servers": [("127.0.0.1", 53)], "attempts": 0}, "attempts"),
        ({"servers": [("127.0.0.1", 53)], "cache_size": -1}, "cache_size"),
    ],
)
def test_dns_validates_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DnsResolver(**kwargs)


# --- the DnsResolver cache ---------------------------------------------------------------------


class FakeClock:
    """Stands in for the ``time`` module inside socksd.resolver: monotonic() is settable."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(resolver_module, "time", fake)
    return fake


def test_cache_answers_second_resolve(stub: StubDns, run: Runner[Any]) -> None:
    resolver = dns(stub)
    first = run(resolver.resolve("a.test", 80))
    assert run(resolver.resolve("a.test", 80)) == first
    assert run(resolver.resolve("A.Test.", 80)) == first  # same name, same entry
    second_port = run(resolver.resolve("a.test", 8080))
    assert [info[4][1] for info in second_port] == [8080] * 3
    assert stub.count("a.test") == 2  # one A and one AAAA query in all


def test_cache_expires_with_ttl(stub: StubDns, run: Runner[Any], clock: FakeClock) -> None:
    resolver = dns(stub)
    run(resolver.resolve("a.test", 80))
    clock.now += 59
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 2
    clock.now += 2
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_cache_ttl_is_capped(stub: StubDns, run: Runner[Any], clock: FakeClock) -> None:
    resolver = dns(stub)
    run(resolver.resolve("long.test", 80))
    clock.now += MAX_CACHE_TTL - 1
    run(resolver.resolve("long.test", 80))
    assert stub.count("long.test") == 2
    clock.now += 2
    run(resolver.resolve("long.test", 80))
    assert stub.count("long.test") == 4


def test_cache_skips_ttl_zero(stub: StubDns, run: Runner[Any]) -> None:
    resolver = dns(stub)
    run(resolver.resolve("ttl0.test", 80))
    run(resolver.resolve("ttl0.test", 80))
    assert stub.count("ttl0.test") == 4


def test_cache_is_bounded_lru(stub: StubDns, run: Runner[Any]) -> None:
    resolver = dns(stub, cache_size=1)
    run(resolver.resolve("a.test", 80))
    run(resolver.resolve("v4only.test", 80))  # evicts a.test
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_cache_disabled(stub: StubDns, run: Runner[Any]) -> None:
    resolver = dns(stub, cache_size=0)
    run(resolver.resolve("a.test", 80))
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_negative_answers_not_cached(stub: StubDns, run: Runner[Any]) -> None:
    resolver = dns(stub)
    for _ in range(2):
        with pytest.raises(ResolutionError):
            run(resolver.resolve("nope.test", 80))
    assert stub.count("nope.test") == 4


# --- parse_dns_server and make_resolver --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        (" 192.0.2.1:53 ", ("192.0.2.1", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::0:1", ("2001:db8::1", 53)),
        ("[::1]", ("::1", 53)),
        ("[::1]:53", ("::1", 53)),
        ("[2001:db8::1]:5353", ("2001:db8::1", 5353)),
    ],
)
def test_parse_dns_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not an IP address"),
        ("dns.example", "is not an IP address"),
        ("dns.example:53", "is not an IP address"),
        ("127.0.0.1:", "port '' is not in 1-65535"),
        ("127.0.0.1:0", "port '0' is not in 1-65535"),
        ("127.0.0.1:65536", "is not in 1-65535"),
        ("127.0.0.1:+53", "is not in 1-65535"),
        ("127.0.0.1:dns", "is not in 1-65535"),
        ("[::1", r"expected \[IPv6\]"),
        ("[::1]53", r"expected \[IPv6\]"),
        ("[::1]:", "is not in 1-65535"),
        ("[127.0.0.1]:53", "only for IPv6"),
        ("[::g]:53", "is not an IP address"),
    ],
)
def test_parse_dns_server_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"DNS server {re.escape(repr(text))}.*{message}"):
        parse_dns_server(text)


def test_make_resolver_kinds() -> None:
    assert isinstance(make_resolver(None, None, 1.0), SystemResolver)
    assert isinstance(make_resolver({}, [], 1.0), SystemResolver)
    dns_only = make_resolver(None, ["127.0.0.1:5353", "[::1]"], 1.0)
    assert isinstance(dns_only, DnsResolver)
    assert dns_only.servers == (("127.0.0.1", 5353), ("::1", 53))
    assert dns_only.timeout == 1.0
    static = make_resolver({"web": ["192.0.2.6"]}, None, 2.0)
    assert isinstance(static, StaticResolver)
    assert isinstance(static.fallback, SystemResolver)
    assert static.fallback.timeout == 2.0


def test_make_resolver_rejects_bad_server() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        make_resolver(None, ["dns.example"], 1.0)


def test_make_resolver_static_over_dns(stub: StubDns, run: Runner[Any]) -> None:
    host, port = stub.address
    resolver = make_resolver({"web.test": ["192.0.2.6"]}, [f"{host}:{port}"], TIMEOUT)
    assert ips(run(resolver.resolve("web.test", 80))) == ["192.0.2.6"]
    assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.test", 80))
    assert stub.count("web.test") == 0
