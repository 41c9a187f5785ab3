"""The GSS-API glue (socksd.auth.gssapi) against the throwaway realm, in process."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import gssapi
import pytest

from socksd.auth.gssapi import (
    CLIENT_FLAGS,
    AcceptorContext,
    GssapiAcceptor,
    GssapiSetupError,
    InitiatorContext,
)
from socksd.client.handshake import service_hostname
from socksd.protocol import GssapiError, GssapiOutOfSequence, ProtectionLevel
from socksd.protocol.gssapi import MAX_TOKEN, GssapiEncapsulation
from tests.krb5 import HOST, TestRealm


@pytest.fixture(scope="module")
def acceptor(krb5_realm: TestRealm) -> GssapiAcceptor:
    return GssapiAcceptor("rcmd", krb5_realm.keytab)


def establish(acceptor: GssapiAcceptor) -> tuple[InitiatorContext, AcceptorContext]:
    client = InitiatorContext("rcmd", HOST)
    server = acceptor.new_context()
    token, complete = client.step(b"")
    assert token and not complete  # mutual authentication: a second leg
    answer, done = asyncio.run(server.step(token))
    assert done
    assert client.step(answer) == (b"", True)
    return client, server


def test_context_and_principal(acceptor: GssapiAcceptor) -> None:
    client, server = establish(acceptor)
    assert server.principal == "user@KRBTEST.COM"
    assert server.complete and client.complete
    assert server.confidentiality and client.confidentiality


@pytest.mark.parametrize("confidential", [False, True])
def test_wrap_unwrap_both_ways(acceptor: GssapiAcceptor, confidential: bool) -> None:
    client, server = establish(acceptor)
    token = client.wrap(b"request", confidential)
    assert (b"request" in token) is not confidential
    assert server.unwrap(token) == (b"request", confidential)
    assert client.unwrap(server.wrap(b"reply", confidential)) == (b"reply", confidential)


def test_replayed_and_tampered_tokens_fail(acceptor: GssapiAcceptor) -> None:
    client, server = establish(acceptor)
    token = client.wrap(b"once", False)
    assert server.unwrap(bytes(token)) == (b"once", False)
    with pytest.raises(GssapiError, match="gss_unwrap"):
        server.unwrap(bytes(token))
    bad = bytearray(client.wrap(b"twice", True))
    bad[-1] ^= 1
    with pytest.raises(GssapiError, match="gss_unwrap"):
        server.unwrap(bytes(bad))


@pytest.mark.parametrize("level", list(ProtectionLevel))
def test_datagrams_after_a_loss_or_overtaken_are_delivered(
    acceptor: GssapiAcceptor, level: ProtectionLevel
) -> None:
    """GSS_S_GAP_TOKEN / GSS_S_UNSEQ_TOKEN mark a good datagram; a replay is still dropped."""
    client, server = establish(acceptor)  # the client asked for sequence detection
    assert CLIENT_FLAGS & gssapi.RequirementFlag.out_of_sequence_detection
    for sender, receiver in ((client, server), (server, client)):
        send = GssapiEncapsulation(level, sender.wrap, sender.unwrap)
        receive = GssapiEncapsulation(level, receiver.wrap, receiver.unwrap)
        d1, d2, d3 = (send.encode_datagram(b"datagram %d" % i) for i in (1, 2, 3))
        assert receive.decode_datagram(d1) == b"datagram 1"
        assert receive.decode_datagram(d3) == b"datagram 3"  # 2 not yet here: a gap
        assert receive.decode_datagram(d2) == b"datagram 2"  # late
        for replay in (d3, d2, d1):
            with pytest.raises(GssapiError, match="gss_unwrap"):
                receive.decode_datagram(replay)
        assert receive.decode_datagram(send.encode_datagram(b"next")) == b"next"


def test_a_stream_stays_strict_about_sequence(acceptor: GssapiAcceptor) -> None:
    client, server = establish(acceptor)
    send = GssapiEncapsulation(ProtectionLevel.CONFIDENTIALITY, client.wrap, client.unwrap)
    receive = GssapiEncapsulation(ProtectionLevel.CONFIDENTIALITY, server.wrap, server.unwrap)
    f1, _f2, f3 = (send.encode(b"frame %d" % i) for i in (1, 2, 3))
    receive.receive_data(f1 + f3)  # frame 2 removed from the stream
    assert receive.read() == b"frame 1"
    with pytest.raises(GssapiOutOfSequence, match="earlier token is missing"):
        receive.read()


@pytest.mark.parametrize("level", list(ProtectionLevel))
def test_max_payload_fits_one_token(acceptor: GssapiAcceptor, level: ProtectionLevel) -> None:
    _, server = establish(acceptor)
    size = server.max_payload(level)
    assert MAX_TOKEN - 200 < size < MAX_TOKEN
    assert len(server.wrap(b"x" * size, level != ProtectionLevel.INTEGRITY)) <= MAX_TOKEN


def test_client_without_replay_detection_is_refused(acceptor: GssapiAcceptor) -> None:
    flags = gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity
    name = gssapi.Name(f"rcmd@{HOST}", gssapi.NameType.hostbased_service)
    client = gssapi.SecurityContext(name=name, usage="initiate", flags=flags)
    server = acceptor.new_context()
    with pytest.raises(GssapiError, match="replay detection"):
        asyncio.run(server.step(client.step()))


def test_acceptor_failures_are_gssapi_errors(acceptor: GssapiAcceptor) -> None:
    with pytest.raises(GssapiError, match="gss_accept_sec_context"):
        asyncio.run(acceptor.new_context().step(b"\x60\x03not a token"))
    client = InitiatorContext("host", HOST)  # a key the keytab has, for another service
    token, _ = client.step(b"")
    with pytest.raises(GssapiError, match="does not match server principal rcmd"):
        asyncio.run(acceptor.new_context().step(token))


def test_acceptor_setup_errors(krb5_realm: TestRealm, tmp_path: Path) -> None:
    with pytest.raises(GssapiSetupError, match="not found"):
        GssapiAcceptor("rcmd", tmp_path / "missing.keytab")
    other = krb5_realm.add_keytab(tmp_path / "other.keytab", "socks")
    with pytest.raises(GssapiSetupError, match="No key table entry found matching rcmd"):
        GssapiAcceptor("rcmd", other)
    assert GssapiAcceptor("socks", other).service == "socks"


def test_steps_run_on_the_pool_not_the_loop(acceptor: GssapiAcceptor) -> None:
    import threading

    seen: list[str] = []
    original = AcceptorContext._step

    def spy(self: AcceptorContext, token: bytes) -> tuple[bytes, bool]:
        seen.append(threading.current_thread().name)
        return original(self, token)

    client = InitiatorContext("rcmd", HOST)
    server = acceptor.new_context()
    AcceptorContext._step = spy  # type: ignore[method-assign]
    try:
        asyncio.run(server.step(client.step(b"")[0]))
    finally:
        AcceptorContext._step = original  # type: ignore[method-assign]
    assert seen and seen[0].startswith("socksd-gssapi")


def test_initiator_without_a_kdc_entry() -> None:
    with pytest.raises(GssapiError, match="not found in Kerberos database"):
        InitiatorContext("nosuch", HOST).step(b"")


def test_service_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_hostname("proxy.example") == "proxy.example"

    def fake_getnameinfo(address: tuple[str, int], flags: int) -> tuple[str, str]:
        assert flags == socket.NI_NAMEREQD
        if address[0] == "192.0.2.7":
            return ("proxy.example", "0")
        raise socket.gaierror("no name")

    monkeypatch.setattr(socket, "getnameinfo", fake_getnameinfo)
    assert service_hostname("192.0.2.7") == "proxy.example"
    assert service_hostname("2001:db8::1") == "2001:db8::1"
