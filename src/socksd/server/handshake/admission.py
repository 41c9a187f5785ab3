"""Admission: the access-rule checkpoints and the session limits of one session.

Each checkpoint is given what it reads (the rule set in force, the user, the request) and returns
its decision; the session acts on it (closes, replies, waits). Nothing here writes to a
connection. A no is a :class:`Refusal`: the reply code to send (None: close without a reply) and
the reason for the log.

- accept (:func:`admit`): a client address under a hard block after failed logins
  (``auth_block``), denied by the rules at accept (``RuleSet.check_client``) or over
  ``max_sessions_per_ip`` is closed before a byte is read; otherwise the session gets its
  :class:`Admission`, which counts it until :meth:`Admission.release`;
- login (:meth:`Admission.login_start`, before a password check or a GSSAPI context step is
  queued; a login in the verified-login cache skips it): counted against
  ``max_auth_checks_per_ip`` until :meth:`~Admission.login_done`, or refused (answered as failed
  at once, uncounted); :meth:`~Admission.login_failed` counts a failure and says how long its
  reply waits (``socksd.limits.LoginThrottle``);
- request (:meth:`Admission.authorize`): the rules see the command, user and target (a UDP
  ASSOCIATE or a BIND for any peer has no destination yet: ``RuleSet.check_open_request``); a
  denied request gets REP 0x02 and its access-log line names the rule; an allowed one notes the
  upstream proxy its rule (or the global ``upstream``) sends it through, and its rule's ``via``
  (the outgoing addresses, in place of ``bind_out``); then
  ``max_sessions_per_user`` (REP 0x01 beyond it);
- resolved addresses (:meth:`Admission.allowed_addresses`, from a command after it resolved a
  domain target): when the rules said the outcome depends on the addresses, each is checked;
  denied ones are dropped, and with none left the request is refused as above;
- a BIND's peer (:meth:`Admission.peer_decision`) and each UDP destination
  (:meth:`Admission.destination_allowed`): the rules for a destination known only then.

The rule set in force is passed at each checkpoint, so a reload applies to the next checkpoint;
a request waiting for its addresses keeps the rule set it started with.

With a shared limit store (``limits_store``; ``socksd.limitstore``) the session limits are
checked a second time, over every worker or node, once the local check said yes:
:meth:`Admission.shared_accept` (``max_sessions``, the address's count and its ``auth_block``,
in one call) and
:meth:`Admission.shared_request` (the user's count). Each gives a verdict at once (host store)
or an awaitable one (Redis, bounded by a timeout); :meth:`Admission.shared_outcome` turns the
verdict into a refusal or notes what the store counts, which :meth:`Admission.release` gives
back. A store that cannot answer (None) leaves the decision to the local limits. Each time the
store counts or gives back a session of a user, the user's bandwidth share here is recomputed
(``Limits.share``).

A limit's refusal is logged through the process's
:class:`~socksd.server.handshake.refusals.RefusalLog` (each line within a budget, the rest summed
up), never with a plain warning per connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from socksd.limits import Limits, LoginFailure, throttle_key
from socksd.limitstore import BLOCKED, FULL, REFUSE, Verdict
from socksd.protocol import Address, Command, ReplyCode, Request
from socksd.protocol.udp import is_unspecified
from socksd.resolver import AddrInfo
from socksd.rules import IP, NO_GROUPS, Decision, NeedAddresses, RuleSet, parse_ip

if TYPE_CHECKING:
    from socksd.outgoing import SourceAddresses
    from socksd.server.handshake.refusals import RefusalLog

log = logging.getLogger("socksd.session")

UNKNOWN_CLIENT: IP = (6, 0)
"""A client whose address cannot be read: matched as ``::`` (no client rule, not loopback)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A checkpoint's no: what to answer (None: close without a reply) and why."""

    reply: ReplyCode | None
    error: str
    rule: str | None = None
    """The access-log ``rule`` field (``N``, ``default``, ``protect_local``) when a rule said no."""
    log_now: bool = False
    """Write the session's access-log line at once (a refusal at accept is otherwise silent)."""
    limit: str | None = None
    """The setting that refused (``max_sessions_per_ip``, ``max_sessions_per_user``,
    ``auth_block``), when a limit did."""


@dataclass(frozen=True, slots=True)
class LoginRefusal:
    """Why a login is refused now (:meth:`Admission.login_start`); reads as the reason."""

    limit: str
    """The setting that refused: ``auth_block`` or ``max_auth_checks_per_ip``."""
    reason: str

    def __str__(self) -> str:
        return self.reason


BLOCKED_REFUSAL = Refusal(None, "blocked after failed logins (auth_block)", limit="auth_block")
"""An address blocked after failed logins (``auth_block``), here or on any worker or node."""
IP_LIMIT_REFUSAL = Refusal(None, "max_sessions_per_ip", limit="max_sessions_per_ip")
"""An address at ``max_sessions_per_ip``, here or on every worker and node together."""
TOTAL_REFUSAL = Refusal(None, "max_sessions", limit="max_sessions")
"""All the sessions that share the limit store are at ``max_sessions`` (the session's process
refuses beyond it on its own count before any checkpoint, ``Session.connection_made``)."""


def user_limit_refusal(open_sessions: int) -> Refusal:
    """A user at ``max_sessions_per_user`` (here, or on every worker and node together): REP 0x01."""
    return Refusal(
        ReplyCode.GENERAL_FAILURE,
        f"user has {open_sessions} sessions open (max_sessions_per_user)",
        limit="max_sessions_per_user",
    )


def rule_field(decision: Decision) -> str:
    """The access-log ``rule`` field of a decision: ``N``, ``default`` or ``protect_local``."""
    return decision.label.removeprefix("rule ")


def _denied(decision: Decision) -> Refusal:
    reason = f"denied by {decision.label}"
    if decision.label == "protect_local":
        reason += " (a local destination)"
    return Refusal(ReplyCode.NOT_ALLOWED, reason, rule_field(decision))


def admit(
    rules: RuleSet,
    limits: Limits,
    *,
    host: str,
    client: str,
    refusals: RefusalLog,
) -> Admission | Refusal:
    """Accept checkpoint for a connection from ``host`` (``client`` is HOST:PORT, for logs;
    ``refusals`` logs a limit's refusal)."""
    if limits.throttle.blocked(host, time.monotonic()):
        log.debug("refusing %s: blocked after failed logins (auth_block)", client)
        return BLOCKED_REFUSAL
    ip = parse_ip(host) or UNKNOWN_CLIENT
    if not rules.accept_all:
        decision = rules.check_client(ip)
        if not decision.allowed:
            return Refusal(
                None, f"denied by {decision.label} at accept", rule_field(decision), log_now=True
            )
    count = limits.per_ip.add(host)
    if limits.max_per_ip and count > limits.max_per_ip:
        limits.per_ip.remove(host)
        refusals.refused(
            "max_sessions_per_ip",
            host,
            "refusing %s: %d sessions open from this address (max_sessions_per_ip)",
            client,
            count - 1,
        )
        return IP_LIMIT_REFUSAL
    return Admission(limits, host, ip, client, refusals)


class Admission:
    """One admitted session: what its checkpoints decided and what it counts."""

    __slots__ = (
        "checking",
        "client",
        "command",
        "groups",
        "host",
        "idle_timeout",
        "ip",
        "limits",
        "pending",
        "pending_rules",
        "refusals",
        "rule",
        "shared_ip",
        "shared_user",
        "upstream",
        "user",
        "via",
    )

    def __init__(
        self, limits: Limits, host: str, ip: IP, client: str, refusals: RefusalLog
    ) -> None:
        self.limits = limits
        self.refusals = refusals
        """Where a limit's refusal of this session is logged."""
        self.host = host
        """The client's address, as counted for ``max_sessions_per_ip``."""
        self.ip = ip
        self.client = client
        self.user: str | None = None
        """The user counted for ``max_sessions_per_user``, once the request is in."""
        self.command = 0
        self.groups = NO_GROUPS
        """The user's directory groups (``ldap:NAME``), set by a verified login; the rules
        match ``@ldap:NAME`` against them."""
        self.pending: NeedAddresses | None = None
        self.pending_rules: RuleSet | None = None
        self.idle_timeout: float | None = None
        """The idle timeout of the allow rule that matched, if it has one."""
        self.rule: str | None = None
        """The access-log ``rule`` field of the allow rule that decided, if one did."""
        self.checking = False
        """A login check is counted for the address (``login_start``)."""
        self.upstream: str | None = None
        """The ``[upstreams]`` name the allowed request goes through (None: direct)."""
        self.via: SourceAddresses | None = None
        """The ``via`` of the allow rule that decided (None: ``bind_out``)."""
        self.shared_ip = False
        """The shared store counts this session for its address (until ``release``)."""
        self.shared_user = False
        """The shared store counts this session for its user (until ``release``)."""

    # -- shared store ---------------------------------------------------------------------------

    def shared_accept(self) -> Verdict | Awaitable[Verdict]:
        """The accept checkpoint in the shared store (``limits.store`` is set): the sessions
        on every worker or node (``max_sessions``), the address's, and its hard block
        (``auth_block``)."""
        limits = self.limits
        assert limits.store is not None
        throttle = limits.throttle
        block = throttle.block and throttle.max_failures > 0
        return limits.store.acquire(
            "ip",
            self.host,
            limits.max_per_ip,
            block_key=throttle_key(self.host) if block else None,
            max_failures=throttle.max_failures if block else 0,
            block_time=throttle.block_time,
            total=limits.max_total,
        )

    def shared_request(self) -> Verdict | Awaitable[Verdict]:
        """The user's sessions in the shared store (after :meth:`authorize` counted the user)."""
        limits = self.limits
        assert limits.store is not None and self.user is not None
        return limits.store.acquire("user", self.user, limits.max_per_user)

    def shared_outcome(self, kind: str, verdict: Verdict) -> Refusal | None:
        """A refusal for a shared ``verdict`` of ``kind`` ("ip" or "user"), or None (counted by
        the store, or left to the local limits when the store could not answer)."""
        if verdict == BLOCKED:
            log.debug("refusing %s: blocked after failed logins (auth_block)", self.client)
            return BLOCKED_REFUSAL
        if verdict == FULL:
            self.refusals.refused(
                "max_sessions",
                self.host,
                "refusing %s: %d sessions open on all workers and nodes (max_sessions)",
                self.client,
                self.limits.max_total,
            )
            return TOTAL_REFUSAL
        if verdict == REFUSE:
            if kind == "ip":
                self.refusals.refused(
                    "max_sessions_per_ip",
                    self.host,
                    "refusing %s: %d sessions open from this address on all workers and nodes "
                    "(max_sessions_per_ip)",
                    self.client,
                    self.limits.max_per_ip,
                )
                return IP_LIMIT_REFUSAL
            self.refusals.refused(
                "max_sessions_per_user",
                self.host,
                "refusing user %r from %s: %d sessions open on all workers and nodes "
                "(max_sessions_per_user)",
                self.user,
                self.client,
                self.limits.max_per_user,
            )
            return user_limit_refusal(self.limits.max_per_user)
        if kind == "ip":
            self.shared_ip = True
        else:
            assert self.user is not None  # asked by shared_request, after authorize
            self.shared_user = True
            self.limits.share(self.user, time.monotonic())
        return None

    # -- request ------------------------------------------------------------------------------

    def authorize(self, rules: RuleSet, user: str | None, request: Request) -> Refusal | None:
        """Request checkpoint; None: go on (maybe with addresses to check later)."""
        self.command = command = request.command
        self.upstream = rules.upstream  # no rule to check: the global one
        if not rules.allow_all:
            address = request.address
            decision: Decision | NeedAddresses
            open_request = command == Command.UDP_ASSOCIATE or (
                command == Command.BIND and is_unspecified(address)
            )
            if open_request:  # destinations not known yet: checked per datagram, or the peer
                decision = rules.check_open_request(self.ip, user, command, groups=self.groups)
            else:
                decision = rules.check_request(
                    self.ip, user, command, address.host, address.port, groups=self.groups
                )
            if isinstance(decision, NeedAddresses):
                self.pending_rules, self.pending = rules, decision
                self.upstream = None  # decided with the addresses (allowed_addresses)
            elif not decision.allowed:
                return _denied(decision)
            else:
                self._allowed(rules, decision)
                if open_request:  # routed by a rule naming no destination (open_decision)
                    routing = rules.open_decision(self.ip, user, command, groups=self.groups)
                    self.upstream = rules.route(routing)
                    self.via = routing.via
        if user is not None:
            limits = self.limits
            count = limits.per_user.add(user)
            self.user = user
            if limits.max_per_user and count > limits.max_per_user:
                self.refusals.refused(
                    "max_sessions_per_user",
                    self.host,
                    "refusing user %r from %s: %d sessions open (max_sessions_per_user)",
                    user,
                    self.client,
                    count - 1,
                )
                return user_limit_refusal(count - 1)
        return None

    def _allowed(self, rules: RuleSet, decision: Decision) -> None:
        if decision.rule is not None:
            self.rule = rule_field(decision)
        self.idle_timeout = decision.idle_timeout
        self.upstream = rules.route(decision)
        self.via = decision.via

    def allowed_addresses(
        self, user: str | None, target: Address, infos: list[AddrInfo]
    ) -> list[AddrInfo] | Refusal:
        """The resolved addresses of ``target`` the rules allow, or the refusal when none is."""
        rules, pending = self.pending_rules, self.pending
        if rules is None or pending is None:
            return infos
        self.pending = None
        allowed: list[AddrInfo] = []
        first_allow: Decision | None = None
        first_deny: Decision | None = None
        for info in infos:
            decision = rules.check_address(
                self.ip,
                user,
                self.command,
                name=target.host,
                address=str(info[4][0]),
                port=target.port,
                start=pending.start,
                groups=self.groups,
            )
            if decision.allowed:
                allowed.append(info)
                first_allow = first_allow or decision
            else:
                first_deny = first_deny or decision
        if first_allow is None:
            return (
                _denied(first_deny)
                if first_deny is not None
                else Refusal(ReplyCode.HOST_UNREACHABLE, f"{target.host} has no address")
            )
        if first_deny is not None:
            log.debug(
                "%s: %d of %d addresses of %s denied (%s)",
                self.client,
                len(infos) - len(allowed),
                len(infos),
                target.host,
                first_deny.label,
            )
        self._allowed(rules, first_allow)
        return allowed

    def peer_decision(self, rules: RuleSet, user: str | None, host: str, port: int) -> Decision:
        """The rules for the peer that connected to a BIND for any peer (command ``bind``, the
        peer's address and port as the destination), as the request's destination would be."""
        decision = rules.check_request(self.ip, user, Command.BIND, host, port, groups=self.groups)
        assert isinstance(decision, Decision)  # an IP address needs no lookup
        return decision

    def destination_allowed(
        self, rules: RuleSet, user: str | None, name: str | None, ip: str, port: int
    ) -> Decision:
        """The rules for one UDP datagram's destination: its address, and the name the client
        gave for it if any (command ``udp``)."""
        command = Command.UDP_ASSOCIATE
        decision = rules.check_request(self.ip, user, command, name or ip, port, groups=self.groups)
        if isinstance(decision, NeedAddresses):
            decision = rules.check_address(
                self.ip,
                user,
                command,
                name=name or ip,
                address=ip,
                port=port,
                start=decision.start,
                groups=self.groups,
            )
        return decision

    # -- logins -------------------------------------------------------------------------------

    def login_start(self) -> LoginRefusal | None:
        """Login checkpoint: None when the check may be queued (it is counted for the client's
        address until :meth:`login_done`), else why the login is refused now."""
        throttle = self.limits.throttle
        if throttle.blocked(self.host, time.monotonic()):
            return LoginRefusal(
                "auth_block", f"blocked after {throttle.max_failures} failed logins (auth_block)"
            )
        if not throttle.begin_check(self.host):
            return LoginRefusal(
                "max_auth_checks_per_ip",
                f"{throttle.checks(self.host)} logins from this address are being checked "
                "(max_auth_checks_per_ip)",
            )
        self.checking = True
        return None

    def login_failed(self, user: str | None) -> LoginFailure:
        """Count a failed login of ``user`` (None: not known, as after a failed GSSAPI context);
        the answer says how long the failure reply waits. Logs when a hard block starts."""
        limits = self.limits
        throttle = limits.throttle
        failure = throttle.failed(self.host, user, time.monotonic())
        if limits.store is not None:
            limits.store.failed(throttle_key(self.host), throttle.block_time)
        if failure.blocks:
            log.warning(
                "blocking %s for %gs after %d failed logins (max_auth_failures)",
                throttle_key(self.host),
                throttle.block_time,
                throttle.max_failures,
            )
        return failure

    def login_done(self, user: str | None, ok: bool) -> None:
        """The login counted by :meth:`login_start` is answered: its address gets the check
        back; a success forgets the (address, user) failures."""
        throttle = self.limits.throttle
        if self.checking:
            self.checking = False
            throttle.end_check(self.host)
        if ok:
            throttle.succeeded(self.host, user)

    # -- end ----------------------------------------------------------------------------------

    def release(self) -> None:
        """Give back what the session counted (once, when it ends)."""
        limits = self.limits
        limits.per_ip.remove(self.host)
        if self.checking:
            self.checking = False
            limits.throttle.end_check(self.host)
        if self.user is not None:
            limits.per_user.remove(self.user)
        if limits.store is not None:
            self.release_shared()

    def release_shared(self) -> None:
        """Give back what the shared store counts for the session (once; ``limits.store`` is
        set)."""
        store = self.limits.store
        assert store is not None
        if self.shared_ip:
            self.shared_ip = False
            store.release("ip", self.host, total=True)
        if self.shared_user and self.user is not None:
            self.shared_user = False
            store.release("user", self.user)
            self.limits.share(self.user, time.monotonic())
