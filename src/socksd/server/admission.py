"""Admission: the access-rule checkpoints and the session limits, applied to one session.

- accept (:func:`admit`, from ``Session.connection_made``): a client address under a hard block
  after failed logins (``auth_block``), denied by the rules at accept (``RuleSet.check_client``)
  or over ``max_sessions_per_ip`` is closed before a byte is read;
- login (:func:`login_start`, before a password check or a GSSAPI context step is queued; a
  login found in the verified-login cache skips it): the check is counted against
  ``max_auth_checks_per_ip`` until :func:`login_done`, or refused (the caller answers it as
  failed at once, uncounted); :func:`login_failed` counts a failure and says how long the
  failure reply waits (``socksd.limits.LoginThrottle``);
- request (:func:`authorize`, from ``Session._request``): the rules see the command, user and
  target; a denied request is answered REP 0x02 and its access-log line names the rule
  (``rule=N``); then ``max_sessions_per_user`` (REP 0x01 beyond it);
- resolved addresses (:func:`allowed_addresses`, from a command after it resolved a domain
  target): when the rules said the outcome depends on the addresses, each address is checked;
  denied ones are dropped, and with none left the request is denied as above;
- end (:func:`release`, from ``Session.finish``): the session's counts are given back.

The rule set is read from the context at each checkpoint, so a reload applies to the next
checkpoint; a request waiting for its addresses keeps the rule set it started with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from socksd.limits import LoginFailure, throttle_key
from socksd.protocol import Address, Command, ReplyCode, Request
from socksd.protocol.udp import is_unspecified
from socksd.resolver import AddrInfo
from socksd.rules import IP, Decision, NeedAddresses, RuleSet, parse_ip

if TYPE_CHECKING:
    from socksd.server.session import Session

log = logging.getLogger("socksd.session")

UNKNOWN_CLIENT: IP = (6, 0)
"""A client whose address cannot be read: matched as ``::`` (no client rule, not loopback)."""


@dataclass(slots=True)
class Admission:
    """What the checkpoints remember about one admitted session."""

    host: str
    """The client's address, as counted for ``max_sessions_per_ip``."""
    ip: IP
    user: str | None = None
    """The user counted for ``max_sessions_per_user``, once the request is in."""
    command: int = 0
    rules: RuleSet | None = None
    pending: NeedAddresses | None = None
    idle_timeout: float | None = None
    """The idle timeout of the allow rule that matched, if it has one."""
    checking: bool = False
    """A login check of this session is counted for its address (``login_start``)."""


def admit(session: Session, host: str) -> bool:
    """Accept checkpoint; on refusal the connection is closed and False returned."""
    ctx = session.ctx
    record = session.record
    transport = session.transport
    assert record is not None and transport is not None
    limits = ctx.limits
    if limits.throttle.blocked(host, time.monotonic()):
        log.debug("refusing %s: blocked after failed logins (auth_block)", record.client)
        transport.close()
        return False
    ip = parse_ip(host) or UNKNOWN_CLIENT
    rules = ctx.rules
    if not rules.accept_all:
        decision = rules.check_client(ip)
        if not decision.allowed:
            record.rule = _rule_field(decision)
            record.error = f"denied by {decision.label} at accept"
            transport.close()
            ctx.access_log.write(record)
            return False
    count = limits.per_ip.add(host)
    if limits.max_per_ip and count > limits.max_per_ip:
        limits.per_ip.remove(host)
        log.warning(
            "refusing %s: %d sessions open from this address (max_sessions_per_ip)",
            record.client,
            count - 1,
        )
        transport.close()
        return False
    session.admission = Admission(host, ip)
    return True


def authorize(session: Session, request: Request) -> bool:
    """Request checkpoint; on refusal the session is failed (0x02 or 0x01) and False returned."""
    ctx = session.ctx
    admission = session.admission
    record = session.record
    assert admission is not None and record is not None
    rules = ctx.rules
    admission.command = request.command
    if not rules.allow_all:
        address = request.address
        decision: Decision | NeedAddresses
        if request.command == Command.UDP_ASSOCIATE or (
            request.command == Command.BIND and is_unspecified(address)
        ):  # destinations not known yet: checked per datagram, or when the peer connects
            decision = rules.check_open_request(admission.ip, record.user, request.command)
        else:
            decision = rules.check_request(
                admission.ip, record.user, request.command, address.host, address.port
            )
        if isinstance(decision, NeedAddresses):
            admission.rules = rules
            admission.pending = decision
        elif not _apply(session, decision):
            return False
    user = record.user
    if user is not None:
        limits = ctx.limits
        count = limits.per_user.add(user)
        admission.user = user
        if limits.max_per_user and count > limits.max_per_user:
            log.warning(
                "refusing user %r from %s: %d sessions open (max_sessions_per_user)",
                user,
                record.client,
                count - 1,
            )
            session.fail(
                ReplyCode.GENERAL_FAILURE,
                f"user has {count - 1} sessions open (max_sessions_per_user)",
            )
            return False
    return True


def allowed_addresses(session: Session, target: Address, infos: list[AddrInfo]) -> list[AddrInfo]:
    """The resolved addresses of ``target`` the rules allow; when none, the session is failed."""
    admission = session.admission
    if admission is None or admission.pending is None or admission.rules is None:
        return infos
    record = session.record
    assert record is not None
    rules, start = admission.rules, admission.pending.start
    admission.pending = None
    allowed: list[AddrInfo] = []
    first_allow: Decision | None = None
    first_deny: Decision | None = None
    for info in infos:
        decision = rules.check_address(
            admission.ip,
            record.user,
            admission.command,
            name=target.host,
            address=str(info[4][0]),
            port=target.port,
            start=start,
        )
        if decision.allowed:
            allowed.append(info)
            first_allow = first_allow or decision
        else:
            first_deny = first_deny or decision
    if first_allow is not None:
        if first_deny is not None:
            log.debug(
                "%s: %d of %d addresses of %s denied (%s)",
                record.client,
                len(infos) - len(allowed),
                len(infos),
                target.host,
                first_deny.label,
            )
        _apply(session, first_allow)
    elif first_deny is not None:
        _apply(session, first_deny)
    return allowed


def peer_decision(session: Session, host: str, port: int) -> Decision:
    """The rules for the peer that connected to a BIND for any peer (command ``bind``, the
    peer's address and port as the destination), as the request's destination would be."""
    admission = session.admission
    record = session.record
    client = admission.ip if admission is not None else UNKNOWN_CLIENT
    user = record.user if record is not None else None
    decision = session.ctx.rules.check_request(client, user, Command.BIND, host, port)
    assert isinstance(decision, Decision)  # an IP address needs no lookup
    return decision


def _rule_field(decision: Decision) -> str:
    return decision.label.removeprefix("rule ")


def _apply(session: Session, decision: Decision) -> bool:
    """Record the decision; fail the session with 0x02 when it denies."""
    record = session.record
    assert record is not None and session.admission is not None
    if decision.rule is not None or not decision.allowed:
        record.rule = _rule_field(decision)
    if decision.allowed:
        session.admission.idle_timeout = decision.idle_timeout
        return True
    reason = f"denied by {decision.label}"
    if decision.label == "protect_local":
        reason += " (a local destination)"
    session.fail(ReplyCode.NOT_ALLOWED, reason)
    return False


def login_start(session: Session) -> str | None:
    """Login checkpoint: None when the check may be queued (it is counted for the client's
    address until :func:`login_done`), else why the login is refused now."""
    admission = session.admission
    if admission is None:
        return None
    throttle = session.ctx.limits.throttle
    if throttle.blocked(admission.host, time.monotonic()):
        return f"blocked after {throttle.max_failures} failed logins (auth_block)"
    if not throttle.begin_check(admission.host):
        return (
            f"{throttle.checks(admission.host)} logins from this address are being checked "
            "(max_auth_checks_per_ip)"
        )
    admission.checking = True
    return None


def login_failed(session: Session, user: str | None) -> LoginFailure | None:
    """Count a failed login of ``user`` (None: not known, as after a failed GSSAPI context);
    the answer says how long the failure reply waits. Logs when a hard block starts."""
    admission = session.admission
    if admission is None:
        return None
    throttle = session.ctx.limits.throttle
    failure = throttle.failed(admission.host, user, time.monotonic())
    if failure.blocks:
        log.warning(
            "blocking %s for %gs after %d failed logins (max_auth_failures)",
            throttle_key(admission.host),
            throttle.block_time,
            throttle.max_failures,
        )
    return failure


def login_done(session: Session, user: str | None, ok: bool) -> None:
    """The login counted by :func:`login_start` is answered: its address gets the check back;
    a success forgets the (address, user) failures."""
    admission = session.admission
    if admission is None:
        return
    throttle = session.ctx.limits.throttle
    if admission.checking:
        admission.checking = False
        throttle.end_check(admission.host)
    if ok:
        throttle.succeeded(admission.host, user)


def release(session: Session) -> None:
    """Give back what the session counted (called once, when it ends)."""
    admission = session.admission
    if admission is None:
        return
    session.admission = None
    limits = session.ctx.limits
    limits.per_ip.remove(admission.host)
    if admission.checking:
        limits.throttle.end_check(admission.host)
    if admission.user is not None:
        limits.per_user.remove(admission.user)
