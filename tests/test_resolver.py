"""Tests of socksd.resolver.

No DNS query leaves the machine: the system resolver is only asked about ``localhost`` and IP
literals (its failure paths are tested with a patched ``getaddrinfo``), and DnsResolver only talks
to the stub DNS server below (tests.servers.StubDns answering for ZONE), which runs in a thread
on 127.0.0.1 (UDP and TCP on the same port).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from socksd import resolver as resolver_module
from socksd.resolver import (
    MAX_CACHE_TTL,
    MAX_NEGATIVE_TTL,
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
from tests.servers import StubDns

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
    "nodata.test": {"TXT": (['"no address here"'], 60)},
    "together.test": {"A": (["192.0.2.10"], 60), "AAAA": (["2001:db8::10"], 60)},
    "db": {"A": (["192.0.2.11"], 60)},
    "db.corp.example": {"A": (["203.0.113.11"], 60)},
}
CNAMES = {"alias.test": "alias2.test", "alias2.test": "a.test", "loop.test": "loop.test"}
SERVFAIL = {"servfail.test"}
SILENT = {"silent.test"}
TRUNCATED = {"big.test"}
SPOOFED = {"spoof.test"}
TOGETHER = {"together.test"}  # answered only once both its A and AAAA questions have come
SOA_TEST = "test. 3600 IN SOA ns.test. admin.test. 1 3600 600 86400 30"
"""Negative answers under ``test.`` carry this SOA: they may be cached for 30 s (its minimum)."""
NEGATIVE_TTL = 30


class ZoneDns(StubDns):
    """The stub DNS server answering for the zone above."""

    def __init__(self, host: str = "127.0.0.1", *, servfail_all: bool = False) -> None:
        self.servfail_all = servfail_all
        self._held: dict[str, tuple[bytes, object]] = {}
        super().__init__(host)

    def answer(
        self, query: dns.message.QueryMessage, data: bytes, transport: str, peer: object
    ) -> list[bytes]:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        reply = dns.message.make_response(query)
        if self.servfail_all or name in SERVFAIL:
            reply.set_rcode(dns.rcode.SERVFAIL)
            return [reply.to_wire(want_shuffle=False)]
        if name in SILENT:
            return []
        if name in TRUNCATED and transport == "udp":
            reply.flags |= dns.flags.TC
            return [reply.to_wire(want_shuffle=False)]
        owner = name
        for _ in range(8):
            if owner not in CNAMES:
                break
            reply.answer.append(
                dns.rrset.from_text(owner + ".", 60, "IN", "CNAME", CNAMES[owner] + ".")
            )
            owner = CNAMES[owner]
        records = ZONE.get(owner)
        if records is None and owner not in CNAMES:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        values, ttl = (records or {}).get(qtype, ([], 60))
        if values:
            reply.answer.append(dns.rrset.from_text(owner + ".", ttl, "IN", qtype, *values))
        elif owner.endswith(".test"):  # a negative answer: the zone's SOA gives its TTL
            reply.authority.append(dns.rrset.from_text(*_soa_fields()))
        if name in TOGETHER and transport == "udp":
            return self._together(name, qtype, reply.to_wire(want_shuffle=False), peer)
        if name not in SPOOFED:
            return [reply.to_wire(want_shuffle=False)]
        # Forgeries first: wrong ID, right ID with junk, right ID with another question.
        forged = dns.message.make_response(query)
        forged.id = (query.id + 1) % 0x10000
        forged.answer.append(dns.rrset.from_text(name + ".", 60, "IN", "A", "203.0.113.66"))
        other = dns.message.make_response(dns.message.make_query("other.test", qtype))
        other.id = query.id
        other.answer.append(dns.rrset.from_text("other.test.", 60, "IN", "A", "203.0.113.67"))
        junk = data[:2] + b"\xff" * 5
        return [
            forged.to_wire(want_shuffle=False),
            junk,
            other.to_wire(want_shuffle=False),
            reply.to_wire(want_shuffle=False),
        ]

    def _together(self, name: str, qtype: str, wire: bytes, peer: object) -> list[bytes]:
        """Hold the first answer until the other type is asked: only a client that asks both
        at once gets any answer in time."""
        other = "A" if qtype == "AAAA" else "AAAA"
        held = self._held.pop(f"{name}/{other}", None)
        if held is None:
            self._held[f"{name}/{qtype}"] = (wire, peer)
            return []
        self.udp.sendto(*held)  # type: ignore[arg-type]
        return [wire]


def _soa_fields() -> tuple[str, int, str, str, str]:
    owner, ttl, rdclass, rdtype, *rdata = SOA_TEST.split()
    return owner, int(ttl), rdclass, rdtype, " ".join(rdata)


@pytest.fixture
def stub() -> Iterator[ZoneDns]:
    server = ZoneDns()
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


def resolver_for(stub: StubDns, **kwargs: Any) -> DnsResolver:
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


def test_literal_sends_no_query(stub: ZoneDns, run: Runner[Any]) -> None:
    run(resolver_for(stub).resolve("192.0.2.1", 80))
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


def test_dns_aaaa_then_a(stub: ZoneDns, run: Runner[Any]) -> None:
    infos = run(resolver_for(stub).resolve("a.test", 443))
    assert infos == [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 443, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.2", 443)),
    ]
    assert stub.count("a.test", "A", "udp") == 1
    assert stub.count("a.test", "AAAA", "udp") == 1


def test_dns_asks_a_and_aaaa_at_once(stub: ZoneDns, run: Runner[Any]) -> None:
    """The stub answers together.test only once both questions are in: asked one after the
    other, the first would wait for the whole timeout and the lookup fail."""
    resolver = DnsResolver([stub.address], timeout=5.0)
    assert ips(run(resolver.resolve("together.test", 80))) == ["2001:db8::10", "192.0.2.10"]
    assert stub.count("together.test") == 2


def test_dns_one_family(stub: ZoneDns, run: Runner[Any]) -> None:
    assert ips(run(resolver_for(stub).resolve("v4only.test", 80))) == ["192.0.2.3"]


def test_dns_follows_cname_chain(stub: ZoneDns, run: Runner[Any]) -> None:
    infos = run(resolver_for(stub).resolve("alias.test", 80))
    assert ips(infos) == ["2001:db8::1", "192.0.2.1", "192.0.2.2"]


def test_dns_cname_loop_is_a_server_failure(stub: ZoneDns, run: Runner[Any]) -> None:
    """dnspython follows at most 16 CNAMEs and takes a longer chain as a broken answer."""
    with pytest.raises(ResolutionError, match=r"127\.0\.0\.1:\d+: The CNAME chain is too long"):
        run(resolver_for(stub).resolve("loop.test", 80))


def test_dns_nxdomain(stub: ZoneDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match=r"'nope\.test': no such domain \(NXDOMAIN\)") as info:
        run(resolver_for(stub).resolve("nope.test", 80))
    assert isinstance(info.value, OSError)
    assert stub.count("nope.test") == 2  # one A, one AAAA: NXDOMAIN is final, no retry


def test_dns_servfail(stub: ZoneDns, run: Runner[Any]) -> None:
    """A server that answers SERVFAIL is not asked again in the same lookup (dnspython's rule)."""
    with pytest.raises(ResolutionError, match=r"DNS server 127\.0\.0\.1:\d+ answered SERVFAIL"):
        run(resolver_for(stub, attempts=3).resolve("servfail.test", 80))
    assert stub.count("servfail.test", "A") == 1
    assert stub.count("servfail.test", "AAAA") == 1


def test_dns_timeout(stub: ZoneDns, run: Runner[Any]) -> None:
    start = time.monotonic()
    with pytest.raises(ResolutionError, match=r"no answer from DNS server 127\.0\.0\.1:"):
        run(resolver_for(stub, attempts=2).resolve("silent.test", 80))
    elapsed = time.monotonic() - start
    # the tries waited for the whole budget and shared it; dnspython's back-off between two
    # rounds does not take the lookup past it
    assert TIMEOUT * 0.9 < elapsed < 2 * TIMEOUT
    assert stub.count("silent.test", "A") >= 1
    assert stub.count("silent.test", "AAAA") >= 1


def test_dns_truncated_answer_retried_over_tcp(stub: ZoneDns, run: Runner[Any]) -> None:
    infos = run(resolver_for(stub).resolve("big.test", 80))
    assert ips(infos) == ["2001:db8::50", "192.0.2.50", "192.0.2.51"]
    assert stub.count("big.test", "A", "udp") == 1
    assert stub.count("big.test", "A", "tcp") == 1
    assert stub.count("big.test", "AAAA", "tcp") == 1


def test_dns_ignores_forged_replies(stub: ZoneDns, run: Runner[Any]) -> None:
    assert ips(run(resolver_for(stub).resolve("spoof.test", 80))) == ["192.0.2.7"]


def test_dns_drops_unspecified_addresses(stub: ZoneDns, run: Runner[Any]) -> None:
    with pytest.raises(ResolutionError, match="no A or AAAA records"):
        run(resolver_for(stub).resolve("sinkhole.test", 80))


def test_dns_invalid_name_sends_nothing(stub: ZoneDns, run: Runner[Any]) -> None:
    for name in ("a..test", "x" * 64 + ".test", "."):
        with pytest.raises(ResolutionError, match="not a valid domain name"):
            run(resolver_for(stub).resolve(name, 80))
    assert not stub.queries


def test_dns_next_server_after_servfail(stub: ZoneDns, run: Runner[Any]) -> None:
    failing = ZoneDns(servfail_all=True)
    try:
        resolver = DnsResolver([failing.address, stub.address], timeout=TIMEOUT, attempts=1)
        assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
        assert failing.count("v4only.test") == 2
    finally:
        failing.close()


def test_dns_next_server_after_port_unreachable(stub: ZoneDns, run: Runner[Any]) -> None:
    dead = ("127.0.0.1", refused_port(kind=socket.SOCK_DGRAM))
    timeout = 8.0  # long, so that a loaded machine cannot blur "at once" and "after a timeout"
    resolver = DnsResolver([dead, stub.address], timeout=timeout, attempts=1)
    start = time.monotonic()
    assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
    # The ICMP error ends the first try at once; a lost datagram would have cost half the timeout.
    assert time.monotonic() - start < timeout / 2


def test_dns_ipv6_server(run: Runner[Any]) -> None:
    """UDP to an IPv6 server, and TCP after a truncated answer."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = ZoneDns("::1")
    except OSError:
        pytest.skip("::1 is not available")
    try:
        resolver = DnsResolver([server.address], timeout=5.0)
        assert ips(run(resolver.resolve("big.test", 80))) == [
            "2001:db8::50",
            "192.0.2.50",
            "192.0.2.51",
        ]
        assert server.count("big.test", transport="udp") == 2
        assert server.count("big.test", transport="tcp") == 2
    finally:
        server.close()


def test_dns_next_server_after_silence(stub: ZoneDns, run: Runner[Any]) -> None:
    """A first server that never answers costs its share of the timeout, then the next answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # never read: queries queue up, no ICMP error comes back
        resolver = DnsResolver([silent.getsockname(), stub.address], timeout=4.0, attempts=1)
        assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
    assert stub.count("v4only.test") == 2


def test_dns_asks_only_the_name_given(
    stub: ZoneDns, run: Runner[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No resolv.conf, no search list: a bare name is asked as it is, even on a host whose name
    has a domain (dnspython would make that domain the search list)."""

    def no_resolv_conf(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("read /etc/resolv.conf")

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", no_resolv_conf)
    monkeypatch.setattr(socket, "gethostname", lambda: "proxy.corp.example")
    assert ips(run(resolver_for(stub).resolve("db", 80))) == ["192.0.2.11"]
    assert sorted(stub.questions) == ["db.", "db."]
    assert stub.count("db.corp.example") == 0


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


def test_cache_answers_second_resolve(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub)
    first = run(resolver.resolve("a.test", 80))
    assert run(resolver.resolve("a.test", 80)) == first
    assert run(resolver.resolve("A.Test.", 80)) == first  # same name, same entry
    second_port = run(resolver.resolve("a.test", 8080))
    assert [info[4][1] for info in second_port] == [8080] * 3
    assert stub.count("a.test") == 2  # one A and one AAAA query in all


def test_cache_expires_with_ttl(stub: ZoneDns, run: Runner[Any], clock: FakeClock) -> None:
    resolver = resolver_for(stub)
    run(resolver.resolve("a.test", 80))
    clock.now += 59
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 2
    clock.now += 2
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_cache_ttl_is_capped(stub: ZoneDns, run: Runner[Any], clock: FakeClock) -> None:
    resolver = resolver_for(stub)
    run(resolver.resolve("long.test", 80))
    clock.now += MAX_CACHE_TTL - 1
    run(resolver.resolve("long.test", 80))
    assert stub.count("long.test") == 2
    clock.now += 2
    run(resolver.resolve("long.test", 80))
    assert stub.count("long.test") == 4


def test_cache_skips_ttl_zero(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub)
    run(resolver.resolve("ttl0.test", 80))
    run(resolver.resolve("ttl0.test", 80))
    assert stub.count("ttl0.test") == 4


def test_cache_is_bounded_lru(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub, cache_size=1)
    run(resolver.resolve("a.test", 80))
    run(resolver.resolve("v4only.test", 80))  # evicts a.test
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_cache_disabled(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub, cache_size=0)
    run(resolver.resolve("a.test", 80))
    run(resolver.resolve("a.test", 80))
    assert stub.count("a.test") == 4


def test_nxdomain_cached_for_the_soa_minimum(
    stub: ZoneDns, run: Runner[Any], clock: FakeClock
) -> None:
    resolver = resolver_for(stub)
    for _ in range(2):
        with pytest.raises(ResolutionError, match=r"no such domain \(NXDOMAIN\)"):
            run(resolver.resolve("nope.test", 80))
    assert stub.count("nope.test") == 2  # the second lookup did not reach the server
    clock.now += NEGATIVE_TTL - 1
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("Nope.Test.", 80))
    assert stub.count("nope.test") == 2
    clock.now += 2
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.test", 80))
    assert stub.count("nope.test") == 4


def test_negative_ttl_is_capped(stub: ZoneDns, run: Runner[Any], clock: FakeClock) -> None:
    """Without an SOA dnspython gives NXDOMAIN a TTL of 300 s; we keep it MAX_NEGATIVE_TTL."""
    resolver = resolver_for(stub)
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.invalid", 80))
    clock.now += MAX_NEGATIVE_TTL - 1
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.invalid", 80))
    assert stub.count("nope.invalid") == 2
    clock.now += 2
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.invalid", 80))
    assert stub.count("nope.invalid") == 4


def test_no_address_cached_negatively(stub: ZoneDns, run: Runner[Any]) -> None:
    """A name with records but no A or AAAA, and a sinkholed name, are remembered as such."""
    resolver = resolver_for(stub)
    for name in ("nodata.test", "sinkhole.test"):
        for _ in range(2):
            with pytest.raises(ResolutionError, match="no A or AAAA records"):
                run(resolver.resolve(name, 80))
        assert stub.count(name) == 2


def test_failures_not_cached(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub)
    for _ in range(2):
        with pytest.raises(ResolutionError, match="SERVFAIL"):
            run(resolver.resolve("servfail.test", 80))
    assert stub.count("servfail.test") == 4


def test_negative_entries_share_the_bound(stub: ZoneDns, run: Runner[Any]) -> None:
    resolver = resolver_for(stub, cache_size=1)
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.test", 80))
    run(resolver.resolve("v4only.test", 80))  # evicts nope.test
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.test", 80))
    assert stub.count("nope.test") == 4
    assert len(resolver._cache) == 1


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


def test_make_resolver_static_over_dns(stub: ZoneDns, run: Runner[Any]) -> None:
    host, port = stub.address
    resolver = make_resolver({"web.test": ["192.0.2.6"]}, [f"{host}:{port}"], TIMEOUT)
    assert ips(run(resolver.resolve("web.test", 80))) == ["192.0.2.6"]
    assert ips(run(resolver.resolve("v4only.test", 80))) == ["192.0.2.3"]
    with pytest.raises(ResolutionError, match="NXDOMAIN"):
        run(resolver.resolve("nope.test", 80))
    assert stub.count("web.test") == 0
