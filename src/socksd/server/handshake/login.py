"""A username/password login, whichever protocol carried it: RFC 1929 (SOCKS5) or
``Proxy-Authorization: Basic`` (HTTP CONNECT). One path for both, so the same user file, verified-
login cache, login checkpoint and throttle apply to each.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from socksd.limits import LoginFailure
from socksd.server.handshake.admission import LoginRefusal

if TYPE_CHECKING:
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd.session")


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
    address) to the user store's check (bcrypt, PAM). The delay is bounded by
    ``max_auth_delay``."""
    auth = session.ctx.authenticator
    record = session.record
    ok = auth is not None and auth.cached(username, password)
    if not ok:
        shared = auth is not None and auth.checking(username, password)
        refusal = None if shared else session.login_start()
        if refusal is not None:
            log.warning("refusing the login of %r from %s: %s", user, record.client, refusal)
            return refusal
        ok = auth is not None and await auth.verify(username, password)
        if not ok:
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
    session.admission.login_done(user, ok)
    return ok
