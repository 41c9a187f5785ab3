"""A username/password login, whichever protocol carried it: RFC 1929 (SOCKS5) or
``Proxy-Authorization: Basic`` (HTTP CONNECT). One path for both, so the same user file, verified-
login cache, login checkpoint and throttle apply to each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from socksd.auth.stores import WRONG
from socksd.limits import LoginFailure
from socksd.server.handshake.admission import LoginRefusal

if TYPE_CHECKING:
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd.session")

UNAVAILABLE = LoginRefusal("users", "the user store is unavailable")
"""The refusal of a login the user store could not check (not a failed login)."""


def failure_note(failure: LoginFailure | None) -> str:
    """The counts and delay of a failed login, for its log line."""
    if failure is None:
        return ""
    note = f" ({failure.user_failures} for the user, {failure.address_failures} from the address"
    return note + (f"; answered in {failure.delay:g}s)" if failure.delay else ")")


async def check_login(
    session: Session, username: bytes, password: bytes, user: str
) -> bool | LoginRefusal:
    """Check a login (``user`` is ``username`` as logged): True, False (after the delay the
    throttle gives a failure), or the refusal of the login checkpoint (answer as failed, at once).

    A login in the verified-login cache is let in at once; one that is being checked for another
    session shares that check; any other goes through the login checkpoint (in-flight checks per
    address) to the user store's check (bcrypt, PAM, LDAP). The delay is bounded by
    ``max_auth_delay``.

    A store that cannot answer (a directory down or too slow) refuses the login at once, with a
    log line, without counting it as a failed login: it says nothing of the password, and an
    outage must not block every client's address. A verified login's directory groups (cached
    with it) go to the session's admission, for ``@ldap:NAME`` in rules."""
    auth = session.ctx.authenticator
    record = session.record
    verdict = auth.cached(username, password) if auth is not None else None
    if verdict is None:
        shared = auth is not None and auth.checking(username, password)
        refusal = None if shared else session.login_start()
        if refusal is not None:
            session.ctx.refusals.refused(
                refusal.limit,
                session.admission.host,
                "refusing the login of %r from %s: %s",
                user,
                record.client,
                refusal,
            )
            return refusal
        if auth is None:  # users dropped by a reload during the handshake
            verdict = WRONG
        else:
            verdict = await auth.verify(username, password, session.admission.host)
        if auth is not None and verdict.unavailable is not None:
            session.ctx.refusals.refused(
                "user store unavailable",
                session.admission.host,
                "refusing the login of %r from %s: the user store is unavailable (%s): %s; "
                "not counted as a failed login",
                user,
                record.client,
                auth.describe(),
                verdict.unavailable,
                level=logging.ERROR,
            )
            session.admission.login_done(user, False)
            if session.ctx.metrics is not None:
                session.ctx.metrics.user_store_unavailable(auth.kind)
            return UNAVAILABLE
        if not verdict:
            failure = session.login_failed("userpass", user)
            log.warning(
                "authentication failed for user %r from %s%s",
                user,
                record.client,
                failure_note(failure),
            )
            if failure.delay > 0:
                session.cancel_handshake_timer()  # the failure reply comes, within max_auth_delay
                await asyncio.sleep(failure.delay)
    ok = verdict.ok
    if ok:
        session.admission.groups = verdict.groups
    session.admission.login_done(user, ok)
    return ok
