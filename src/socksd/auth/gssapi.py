# GSS-API mechanism glue for RFC 1961 (python-gssapi over MIT Kerberos), for both roles.
#
# The protocol itself (message order, levels, framing) is in ``socksd.protocol.gssapi``; this module
# only makes the GSS-API calls and turns their failures into ``GssapiError``.
#
# Server: ``GssapiAcceptor`` acquires acceptor credentials once, at start, for the host-based name
# ``SERVICE@`` (no host: MIT krb5 then accepts SERVICE/<any host> whose key is in the keytab and
# refuses every other principal of the keytab). The keytab is ``--gssapi-keytab``, else the usual
# KRB5_KTNAME / default keytab; a missing or unreadable keytab is a start-up error. Each session gets
# an ``AcceptorContext``. gss_accept_sec_context reads the keytab on every call and, for contexts
# without mutual authentication, writes the on-disk replay cache: measured 0.24 ms median, 1 ms
# worst of 200 on this machine (tmpfs), more on a slow disk. So it runs on a small dedicated thread
# pool (python-gssapi releases the GIL in the call), with a semaphore bounding how many are
# submitted at once, as for bcrypt. Wrapping and unwrapping are in-memory crypto and run inline, on
# the context moved to ``socksd.auth.gss_message`` once established (python-gssapi's unwrap loses
# the message of a good datagram that arrived after a lost one or out of order).
#
# Once a context is complete the server checks what the mechanism left to it: the service part of
# the principal the client asked for is the configured one (again, so no mechanism can slip past
# the acceptor name), integrity is available, and the client asked for replay detection, without
# which a replayed per-message token would pass. Sequence detection is asked for by socksd's client
# and by Dante's for TCP but is not required (Dante's UDP client does not ask for it).
#
# Client: ``InitiatorContext`` asks for mutual authentication, replay and sequence detection,
# integrity and confidentiality. Its ``step`` may talk to the KDC (to get a service ticket), so the
# asyncio client runs it on a thread; the blocking client calls it directly.

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gssapi
import gssapi.raw
from gssapi.raw.misc import GSSError

from socksd.auth.gss_message import MessageContext, describe
from socksd.protocol import GssapiError, ProtectionLevel
from socksd.protocol.gssapi import MAX_TOKEN

_T = TypeVar("_T")
_Flag = gssapi.RequirementFlag

CLIENT_FLAGS = (
    _Flag.mutual_authentication
    | _Flag.replay_detection
    | _Flag.out_of_sequence_detection
    | _Flag.integrity
    | _Flag.confidentiality
)
"""What socksd's client asks of the security context."""


class GssapiSetupError(Exception):
    """The server's GSS-API credentials cannot be had (keytab missing, empty, unreadable)."""


class _Context:
    """wrap/unwrap of an established security context, failures as GssapiError.

    python-gssapi establishes the context (``_ctx``); once complete, ``_established`` moves it to a
    :class:`MessageContext` for the per-message calls (see socksd.auth.gss_message for why).
    """

    __slots__ = ("_confidentiality", "_ctx", "_messages")

    _ctx: gssapi.SecurityContext
    _messages: MessageContext | None
    _confidentiality: bool

    def _established(self) -> None:
        """Move the complete context out of python-gssapi (after reading what is still needed)."""
        self._confidentiality = _Flag.confidentiality in self._ctx.actual_flags
        try:
            exported = gssapi.raw.export_sec_context(self._ctx)
        except GSSError as e:
            raise GssapiError(f"gss_export_sec_context: {describe(e)}") from None
        self._messages = MessageContext(exported)

    def _established_messages(self) -> MessageContext:
        if self._messages is None:
            raise GssapiError("the security context is not established")
        return self._messages

    def wrap(self, data: bytes, confidential: bool) -> bytes:
        """gss_wrap with the default QoP (a failure here is a local one, but ends the session)."""
        token, encrypted = self._established_messages().wrap(data, confidential)
        if confidential and not encrypted:
            raise GssapiError("gss_wrap did not encrypt although confidentiality was asked for")
        return token

    def unwrap(self, token: bytes) -> tuple[bytes, bool]:
        """gss_unwrap: (message, was it encrypted); tampered or replayed: GssapiError; after a gap
        or out of order: GssapiOutOfSequence (an error on a stream, a good datagram over UDP)."""
        return self._established_messages().unwrap(token)

    def max_payload(self, level: ProtectionLevel) -> int:
        """The most plain bytes one RFC 1961 token can carry at ``level`` (gss_wrap_size_limit)."""
        encrypted = level != ProtectionLevel.INTEGRITY
        return self._established_messages().wrap_size_limit(MAX_TOKEN, encrypted)

    @property
    def confidentiality(self) -> bool:
        """The context can encrypt."""
        return self._messages is not None and self._confidentiality

    @property
    def complete(self) -> bool:
        return self._messages is not None


class GssapiAcceptor:
    """The server's credentials and the thread pool its context steps run on."""

    def __init__(
        self,
        service: str,
        keytab: Path | None = None,
        *,
        executor: concurrent.futures.Executor | None = None,
        max_pending: int = 32,
    ) -> None:
        """Acquire acceptor credentials for ``service@<any host>``; GssapiSetupError if none."""
        self.service = service
        self.keytab = keytab
        store: dict[bytes | str, bytes | str] | None = (
            {"keytab": str(keytab)} if keytab is not None else None
        )
        try:
            name = gssapi.Name(f"{service}@", gssapi.NameType.hostbased_service)
            self.credentials = gssapi.Credentials(name=name, usage="accept", store=store)
        except GSSError as e:
            where = f"keytab {keytab}" if keytab is not None else "the default keytab"
            raise GssapiSetupError(
                f"no acceptor credentials for {service}@<host> in {where}: {describe(e)}"
            ) from None
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="socksd-gssapi"
        )
        self._slots = asyncio.Semaphore(max_pending)

    def new_context(self) -> AcceptorContext:
        """A fresh security context for one session."""
        return AcceptorContext(self)

    async def run(self, function: Callable[[bytes], _T], argument: bytes) -> _T:
        """Run ``function(argument)`` on the pool, at most ``max_pending`` submitted at once."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, function, argument)

    def close(self) -> None:
        """Shut the thread pool down if this acceptor created it."""
        if self._own_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)


class AcceptorContext(_Context):
    """One session's server-side security context."""

    __slots__ = ("_acceptor", "_principal")

    def __init__(self, acceptor: GssapiAcceptor) -> None:
        self._acceptor = acceptor
        self._messages = None
        self._principal = ""
        self._ctx = gssapi.SecurityContext(creds=acceptor.credentials, usage="accept")

    async def step(self, token: bytes) -> tuple[bytes, bool]:
        """gss_accept_sec_context on the pool: (output token, complete); GssapiError on failure."""
        return await self._acceptor.run(self._step, token)

    def _step(self, token: bytes) -> tuple[bytes, bool]:
        try:
            output = self._ctx.step(token)
            # python-gssapi returns the mechanism's error token and raises on the next access
            complete = bool(self._ctx.complete)
        except GSSError as e:
            raise GssapiError(f"gss_accept_sec_context: {describe(e)}") from None
        if complete:
            self._check()
            self._principal = str(self._ctx.initiator_name)
            self._established()
        return bytes(output or b""), complete

    def _check(self) -> None:
        target = str(self._ctx.target_name)
        service = target.split("/", 1)[0].split("@", 1)[0]
        if service != self._acceptor.service:
            raise GssapiError(
                f"the client asked for {target}, not the service {self._acceptor.service!r}"
            )
        flags = self._ctx.actual_flags
        if _Flag.integrity not in flags:
            raise GssapiError("the security context offers no integrity protection")
        if _Flag.replay_detection not in flags:
            raise GssapiError("the client did not ask for replay detection")

    @property
    def principal(self) -> str:
        """The authenticated client principal (``user@REALM``): the session's user name."""
        return self._principal


class InitiatorContext(_Context):
    """A client-side security context with the server ``service@hostname``."""

    __slots__ = ()

    def __init__(
        self,
        service: str,
        hostname: str,
        credentials: gssapi.Credentials | None = None,
    ) -> None:
        self._messages = None
        try:
            name = gssapi.Name(f"{service}@{hostname}", gssapi.NameType.hostbased_service)
            self._ctx = gssapi.SecurityContext(
                name=name, usage="initiate", flags=CLIENT_FLAGS, creds=credentials
            )
        except GSSError as e:
            raise GssapiError(f"GSS-API name {service}@{hostname}: {describe(e)}") from None

    def step(self, token: bytes) -> tuple[bytes, bool]:
        """gss_init_sec_context (blocking: may ask the KDC for a ticket): (output, complete)."""
        try:
            output = self._ctx.step(token or None)
            complete = bool(self._ctx.complete)  # raises a failure python-gssapi deferred
        except GSSError as e:
            raise GssapiError(f"gss_init_sec_context: {describe(e)}") from None
        if complete:
            missing = [
                flag.name
                for flag in (_Flag.mutual_authentication, _Flag.integrity, _Flag.replay_detection)
                if flag not in self._ctx.actual_flags
            ]
            if missing:
                raise GssapiError(f"the security context lacks {', '.join(map(str, missing))}")
            self._established()
        return bytes(output or b""), complete
