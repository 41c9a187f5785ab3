"""Access rules: an ordered list, first match wins, then a default action. Pure code, no I/O.

Three modules, each using the one before:

- ``match``: addresses, networks, ports, domain patterns, and :class:`Rule` with its match tests;
- ``evaluate``: :class:`RuleSet`, the accept and request checkpoints, ``protect_local`` and the
  per-client cache of applicable rules;
- ``load``: ``[[rules]]``, ``[groups]``, ``default`` and ``protect_local`` from the TOML values
  into a :class:`RuleSet`, with :class:`RuleError` naming what is wrong.

The public names of all three are re-exported here.
"""

from socksd.rules.evaluate import (
    CLIENT_CACHE_SIZE,
    LOCAL_NETWORKS,
    LOOPBACK_NETWORKS,
    NeedAddresses,
    RuleSet,
)
from socksd.rules.load import (
    COMMAND_NAMES,
    RULE_KEYS,
    RuleError,
    expand_users,
    parse_action,
    parse_domain,
    parse_groups,
    parse_network,
    parse_port_range,
    parse_rule,
    parse_ruleset,
)
from socksd.rules.match import (
    DIRECT,
    DIRECTORY_GROUP_PREFIXES,
    IP,
    NO_GROUPS,
    Action,
    Decision,
    DomainSet,
    Network,
    NetworkSet,
    PortSet,
    Rule,
    normalize_name,
    parse_ip,
)

__all__ = [
    "CLIENT_CACHE_SIZE",
    "COMMAND_NAMES",
    "DIRECT",
    "DIRECTORY_GROUP_PREFIXES",
    "IP",
    "LOCAL_NETWORKS",
    "LOOPBACK_NETWORKS",
    "NO_GROUPS",
    "RULE_KEYS",
    "Action",
    "Decision",
    "DomainSet",
    "NeedAddresses",
    "Network",
    "NetworkSet",
    "PortSet",
    "Rule",
    "RuleError",
    "RuleSet",
    "expand_users",
    "normalize_name",
    "parse_action",
    "parse_domain",
    "parse_groups",
    "parse_ip",
    "parse_network",
    "parse_port_range",
    "parse_rule",
    "parse_ruleset",
]
