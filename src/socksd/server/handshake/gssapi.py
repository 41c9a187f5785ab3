"""A session's GSSAPI sub-negotiation (RFC 1961): context establishment, then the protection level.

The session hands each RFC 1961 message its ServerConnection parses to :meth:`GssapiHandshake.receive`
(with reading paused meanwhile). The sans-I/O
:class:`~socksd.protocol.gssapi.GssapiServerNegotiation` says what each message means; a context
token goes to gss_accept_sec_context on the acceptor's thread pool
(:class:`~socksd.auth.gssapi.AcceptorContext`), and the answer is written back. When the level is
agreed, ``conn.authentication_done(encapsulation)`` puts the codec between the wire and the
request parser, so the encapsulated request arrives at the session as a plain Request; the relay
later continues with the same codec.

GSS-API failures never escape: the client gets the abort message ``01 FF``, the session is closed
and the reason is logged (server log and access-log line). The authenticated principal
(``user@REALM``) becomes the session's user name.

Each context step passes the same login checkpoint as a password check
(``Session.login_start``): counted against the address's in-flight checks, or
refused with the abort message at once. A failed step is a failed login of no known user: it
counts for the address only, and its abort message waits the delay admission gives.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from socksd.protocol import (
    GssapiError,
    GssapiMessage,
    GssapiServerNegotiation,
    MechanismStep,
    ProtectionLevel,
    State,
)

if TYPE_CHECKING:
    from socksd.auth.gssapi import GssapiAcceptor
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd.gssapi")


class GssapiHandshake:
    """One session's RFC 1961 sub-negotiation, driven by the messages the client sends."""

    def __init__(self, session: Session, acceptor: GssapiAcceptor) -> None:
        self.session = session
        self.context = acceptor.new_context()
        levels = (ProtectionLevel(level) for level in session.ctx.config.gssapi_levels)
        self.negotiation = GssapiServerNegotiation(
            self.context.wrap, self.context.unwrap, frozenset(levels)
        )

    async def receive(self, message: GssapiMessage) -> bool:
        """Act on one client message; False when the session has ended (failure or close)."""
        session = self.session
        transport, conn, record = session.transport, session.conn, session.record
        try:
            step = self.negotiation.receive(message)
            if isinstance(step, MechanismStep):
                refusal = session.login_start()
                if refusal is not None:
                    self._fail(f"refused: {refusal}", refusal.limit)
                    return False
                try:
                    output, complete = await self.context.step(step.token)
                except GssapiError as e:
                    await self._delay_failure()
                    self._fail(f"{e}")
                    return False
                finally:
                    session.admission.login_done(None, False)
                if session.closed:
                    return False
                if complete:
                    record.user = self.context.principal
                answer = self.negotiation.context_step(
                    output, complete, confidentiality=self.context.confidentiality
                )
                transport.write(conn.send(answer))
                return True
            assert step.reply is not None
            transport.write(conn.send(step.reply))
            conn.authentication_done(
                self.negotiation.encapsulation(self.context.max_payload(step.level))
            )
            log.debug(
                "%s authenticated %s, protection level %d (asked %s)",
                record.client,
                record.user,
                step.level,
                self.negotiation.requested,
            )
            return True
        except GssapiError as e:
            self._fail(f"{e}")
            return False
        except Exception as e:  # a bug or an unexpected library error: end this session only
            log.exception("GSSAPI negotiation with %s failed unexpectedly", record.client)
            self._fail(f"{type(e).__name__}: {e}")
            return False

    async def _delay_failure(self) -> None:
        """Count the failed context for the client's address; wait the delay admission gives."""
        failure = self.session.login_failed("gssapi", None)
        if failure.delay > 0 and not self.session.closed:
            self.session.cancel_handshake_timer()  # the abort message comes, within the delay
            await asyncio.sleep(failure.delay)

    def _fail(self, reason: str, limit: str | None = None) -> None:
        """Abort message, log line, close (unless the session has already ended). ``limit``:
        the login checkpoint refused it (its line bounded under a storm: ``refusals``)."""
        session = self.session
        if session.closed:
            return
        if session.conn.state is State.AUTH_GSSAPI:
            session.transport.write(session.conn.send(self.negotiation.abort()))
        message = "GSSAPI authentication of %s failed: %s"
        if limit is None:
            log.warning(message, session.record.client, reason)
        else:
            host = session.admission.host
            session.ctx.refusals.refused(limit, host, message, session.record.client, reason)
        session.close(f"GSSAPI: {reason}")
