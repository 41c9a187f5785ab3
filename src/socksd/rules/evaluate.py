"""Evaluation: the rules in order, first match wins, then a default action. Pure code, no I/O.

Two checkpoints, as Dante has:

- at accept (:meth:`RuleSet.check_client`), knowing only the client's address: the client is
  refused when every request it could make would be denied (a rule that names only ``clients``
  decides; an ``allow`` rule with more fields might still match later, so the client is accepted);
- at request (:meth:`RuleSet.check_request`), knowing everything the client asked for.

Domain names cannot be trusted to say where a connection goes, so a request for a name is
matched by its name *and* by the addresses it resolves to. :meth:`RuleSet.check_request` decides
at once when no address could change the outcome (a deny rule that matches by name, or a rule
with no ``to``), and otherwise answers :class:`NeedAddresses`; each resolved address then goes
through :meth:`RuleSet.check_address`, which matches ``to`` by the name (domain patterns) or by the
address (networks). A request for an address is matched by the address only: domain patterns
never match an IP literal.

Local destinations (``protect_local``, on by default): for clients outside loopback, loopback,
link-local and unspecified addresses and the server host's own addresses (given by the server,
see :meth:`RuleSet.with_host_addresses`) are allowed only by an ``allow`` rule whose ``to`` lists
a network holding the address. Other allow rules (no ``to``, or a ``to`` that matched by name)
and a default of allow pass over such an address, and the request ends denied by
``protect_local`` if no later rule allows it. A rule without ``to`` therefore never opens the
proxy host to other machines by accident, and no DNS answer can point an allowed name at it.

Upstreams: a rule's ``upstream`` (else the rule set's global ``upstream``) names the proxy the
requests it allows go through (:meth:`RuleSet.route`). A name sent to an upstream is resolved by
the upstream, so for a rule that matched it by name (or has no ``to``) and sends it upstream no
addresses are asked for: ``protect_local`` cannot check a name it never resolves (the upstream
connects from its own host). A rule with ``to`` networks still needs the addresses to match, and
an IP literal is checked as usual.

Cost: a few set and bisect look-ups per rule (``socksd.rules.match``). The rules that can apply to
a client address (its ``clients`` match, or the rule has none) are remembered per address, so the
checkpoints of a session walk only those. A config without rules decides in a few attribute
checks.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from socksd.rules.match import (
    DIRECT,
    IP,
    NO_GROUPS,
    Action,
    Decision,
    Network,
    NetworkSet,
    Rule,
    normalize_name,
    parse_ip,
)

LOCAL_NETWORKS = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "::/128",
    "::1/128",
    "fe80::/10",
)
"""Destinations ``protect_local`` guards besides the host's own addresses."""

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
"""Clients in these networks are on the proxy host itself: ``protect_local`` does not apply."""

CLIENT_CACHE_SIZE = 4096
"""Client addresses whose applicable rules are remembered (the table is emptied when full)."""


@dataclass(frozen=True, slots=True)
class NeedAddresses:
    """The request names a domain whose addresses can change the outcome: resolve it, then call
    :meth:`RuleSet.check_address` for each address. ``start`` is where evaluation resumes (the
    rules before it cannot match whatever the address is)."""

    start: int


def _covered(network: Network, by: Sequence[Network]) -> bool:
    return any(
        network.version == other.version and network.subnet_of(other)  # type: ignore[arg-type]
        for other in by
    )


_LOOPBACK = NetworkSet(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """The rules in order, the default action, and the ``protect_local`` guard."""

    rules: tuple[Rule, ...] = ()
    default: Action = Action.ALLOW
    protect_local: bool = True
    host_addresses: tuple[Network, ...] = ()
    """The server host's own addresses (networks), guarded by ``protect_local``."""
    upstream: str | None = None
    """The global ``upstream``: where allowed requests go unless their rule says (None: direct)."""
    protected: NetworkSet = field(init=False, compare=False, repr=False)
    accept_all: bool = field(init=False, compare=False, repr=False)
    """No client can be refused at accept."""
    allow_all: bool = field(init=False, compare=False, repr=False)
    """Every request is allowed: nothing to check."""
    _default: Decision = field(init=False, compare=False, repr=False)
    _guard: Decision = field(init=False, compare=False, repr=False)
    _by_client: dict[IP, tuple[Rule, ...]] | None = field(init=False, compare=False, repr=False)
    """The rules whose ``clients`` hold a client address, per address (None: no rule has
    ``clients``, every rule applies to every client)."""

    def __post_init__(self) -> None:
        nets: list[Network] = [ipaddress.ip_network(n) for n in LOCAL_NETWORKS]
        nets += [h for h in self.host_addresses if not _covered(h, nets)]
        allow_default = self.default is Action.ALLOW
        fields = {
            "protected": NetworkSet(nets),
            "accept_all": allow_default
            and not any(r.client_only and r.action is Action.DENY for r in self.rules),
            "allow_all": allow_default and not self.rules and not self.protect_local,
            "_default": Decision(allow_default, "default"),
            "_guard": Decision(False, "protect_local"),
            "_by_client": {} if any(r.clients is not None for r in self.rules) else None,
        }
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def with_host_addresses(self, networks: Iterable[Network]) -> RuleSet:
        """This rule set guarding ``networks`` (the host's addresses) too."""
        return dataclasses.replace(self, host_addresses=tuple(networks))

    # -- checkpoints --------------------------------------------------------------------------

    def rules_for(self, client: IP) -> tuple[Rule, ...]:
        """The rules that can apply to ``client`` (in order): those whose ``clients`` hold it or
        that have no ``clients``. Remembered for the last ``CLIENT_CACHE_SIZE`` addresses, so a
        session's checkpoints walk only these rules and never test ``clients`` again."""
        cache = self._by_client
        if cache is None:
            return self.rules
        rules = cache.get(client)
        if rules is None:
            rules = tuple(r for r in self.rules if r.clients is None or client in r.clients)
            if len(cache) >= CLIENT_CACHE_SIZE:
                cache.clear()
            cache[client] = rules
        return rules

    def check_client(self, client: IP) -> Decision:
        """Accept checkpoint: refuse only a client all of whose requests would be denied."""
        if self.accept_all:
            return _ACCEPTED
        for rule in self.rules_for(client):
            if rule.client_only:
                return rule.decision
            if not rule.deny:
                return _ACCEPTED
        return self._default

    def check_open_request(
        self, client: IP, user: str | None, command: int, *, groups: frozenset[str] = NO_GROUPS
    ) -> Decision:
        """Request checkpoint when the destinations are not known yet: a UDP ASSOCIATE (DST is
        the client's own address), a BIND for any peer (DST ``0.0.0.0`` / ``::``).

        Each destination is checked later (every datagram; the peer that connects), so here
        only a rule that holds whatever the destination is can deny: one without ``to`` and
        ``ports``. A destination rule that allows lets the request through (some destinations
        may be allowed); one that denies is passed over. ``protect_local`` guards destinations
        only."""
        if self.allow_all:
            return self._default
        for rule in self.rules_for(client):
            if not rule.matches_request(user, command, None, groups):
                continue
            if rule.deny and (rule.has_to or rule.ports is not None):
                continue
            return rule.decision
        return self._default

    def check_request(
        self,
        client: IP,
        user: str | None,
        command: int,
        host: str,
        port: int,
        *,
        groups: frozenset[str] = NO_GROUPS,
    ) -> Decision | NeedAddresses:
        """Request checkpoint for ``host`` (an IP literal or a domain name) and ``port``."""
        if self.allow_all:
            return self._default
        ip = parse_ip(host)
        if ip is not None:
            return self._decide(
                client, user, command, port, name=None, ip=ip, start=0, groups=groups
            )
        name = normalize_name(host)
        guard = self.protect_local and client not in _LOOPBACK
        rules = self.rules_for(client)
        for i, rule in enumerate(rules):
            if not rule.matches_request(user, command, port, groups):
                continue
            if rule.has_to and not (rule.to_domains is not None and rule.to_domains.matches(name)):
                if rule.to_networks is not None:
                    return NeedAddresses(i)
                continue
            if rule.deny:
                return rule.decision
            # protect_local guards the addresses this host connects to; through an upstream the
            # name is resolved and connected to by the upstream, so it is not looked up here.
            return NeedAddresses(i) if guard and not self.via_upstream(rule) else rule.decision
        if guard and self.default is Action.ALLOW and self.upstream is None:
            return NeedAddresses(len(rules))
        return self._default

    def check_address(
        self,
        client: IP,
        user: str | None,
        command: int,
        *,
        name: str,
        address: str,
        port: int,
        start: int = 0,
        groups: frozenset[str] = NO_GROUPS,
    ) -> Decision:
        """Request checkpoint for one address that the domain ``name`` resolved to."""
        ip = parse_ip(address)
        if ip is None:
            raise ValueError(f"not an IP address: {address!r}")
        return self._decide(
            client,
            user,
            command,
            port,
            name=normalize_name(name),
            ip=ip,
            start=start,
            groups=groups,
        )

    def _decide(
        self,
        client: IP,
        user: str | None,
        command: int,
        port: int,
        *,
        name: str | None,
        ip: IP,
        start: int,
        groups: frozenset[str],
    ) -> Decision:
        guard = self.protect_local and ip in self.protected and client not in _LOOPBACK
        passed_over = False
        rules = self.rules_for(client)
        for i in range(start, len(rules)):
            rule = rules[i]
            if not rule.matches_request(user, command, port, groups):
                continue
            by_network = False
            if rule.has_to:
                by_network = rule.to_networks is not None and ip in rule.to_networks
                if not by_network and not (
                    name is not None
                    and rule.to_domains is not None
                    and rule.to_domains.matches(name)
                ):
                    continue
            if rule.deny:
                return rule.decision
            if guard and not by_network:
                passed_over = True  # only an allow listing the address opens a local one
                continue
            return rule.decision
        if guard and (passed_over or self.default is Action.ALLOW):
            return self._guard
        return self._default

    def socks4_rule(self, client: IP) -> Rule | None:
        """The first allow rule with ``socks4 = true`` whose ``clients`` hold ``client``: SOCKS4
        has no password, so when the server requires a login only such a rule lets a SOCKS4
        request in (the request then meets the rules like any other, with no user)."""
        for rule in self.rules_for(client):
            if rule.socks4 and rule.clients is not None and client in rule.clients:
                return rule
        return None

    # -- upstreams ----------------------------------------------------------------------------

    def via_upstream(self, rule: Rule) -> bool:
        """The requests ``rule`` allows go through an upstream proxy."""
        return rule.upstream != DIRECT and (rule.upstream or self.upstream) is not None

    def open_route(
        self, client: IP, user: str | None, command: int, *, groups: frozenset[str] = NO_GROUPS
    ) -> str | None:
        """The route of an allowed request with no destination yet (UDP ASSOCIATE, BIND for any
        peer): that of :meth:`open_decision`."""
        return self.route(self.open_decision(client, user, command, groups=groups))

    def open_decision(
        self, client: IP, user: str | None, command: int, *, groups: frozenset[str] = NO_GROUPS
    ) -> Decision:
        """The decision whose route (``upstream``, ``via``) an allowed request with no
        destination yet takes: the first allow rule for its user and command naming no
        destination (neither ``to`` nor ``ports``), else the default (the global ``upstream``
        and ``bind_out``). A rule with ``to`` may let such a request through
        (``check_open_request``) but says nothing of where it goes."""
        for rule in self.rules_for(client):
            if (
                rule.has_to
                or rule.ports is not None
                or not rule.matches_request(user, command, None, groups)
            ):
                continue
            if rule.deny:
                break
            return rule.decision
        return self._default

    def route(self, decision: Decision) -> str | None:
        """The ``[upstreams]`` name an allowed request goes through; None: direct."""
        rule = decision.rule
        name = rule.upstream if rule is not None and rule.upstream is not None else self.upstream
        return None if name == DIRECT else name

    # -- description --------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """The effective rules, one line each, in the order they apply."""
        lines = [rule.describe() for rule in self.rules]
        if self.protect_local:
            guarded = ", ".join(str(n) for n in self.protected.networks)
            loopback = ", ".join(LOOPBACK_NETWORKS)
            lines.append(
                f"protect_local: for clients outside {loopback}, deny {guarded} unless an "
                "allow rule lists the address in `to` (as a network)"
            )
        lines.append(f"default: {self.default.value}")
        if self.upstream is not None:
            lines.append(f"upstream: {self.upstream} (for allowed requests whose rule names none)")
        return lines


_ACCEPTED = Decision(True, "")
