"""Live reload (SIGHUP): new settings, rules, users and limits for new sessions; none is dropped.

:func:`reload` reads the config again through the ``ConfigSource`` the command line gave (the
same file and the same flags, which still win), then builds every new part before touching the
running server: the user file, the rules with this host's current addresses, the resolver (when
its settings changed) and the access log (always reopened, so a rotated file is let go). Any
error leaves the running configuration as it was and is logged in one line. On success the parts
are swapped into the :class:`ServerContext` in one step of the event loop: sessions already
established keep their connections, relays and counters; later checkpoints read the new ones.

``listen``, ``workers`` and ``loop`` cannot change in a running process: a change is logged as
needing a restart and the running values stay. With ``--workers N`` the supervisor checks the new
config, then forwards SIGHUP to each worker, which reloads itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from socksd.accesslog import AccessLog
from socksd.auth.htpasswd import UserFile, UserFileError
from socksd.auth.userpass import UserPassAuthenticator
from socksd.config import Config, ConfigError
from socksd.resolver import Resolver, make_resolver
from socksd.rules import RuleSet
from socksd.server.context import ServerContext
from socksd.server.hostaddrs import effective_rules

log = logging.getLogger("socksd")

ConfigSource = Callable[[], Config]
"""Builds the config afresh (file, then flags); raises ConfigError when it is wrong."""

RESTART_ONLY = ("listen", "workers", "loop")


class ReloadError(Exception):
    """The new configuration cannot be used; the message says why."""


@dataclass(slots=True)
class NewParts:
    """Everything a reload swaps in, built before anything is swapped."""

    config: Config
    users: UserFile | None
    rules: RuleSet
    resolver: Resolver | None
    """None when the resolver settings did not change."""
    access_log: AccessLog
    restart_changes: list[str]
    """Settings changed in the file that only a restart applies (``key: old -> new``)."""


def load_checked(source: ConfigSource) -> tuple[Config, UserFile | None]:
    """The new config and its user file; ReloadError with a one-line reason when unusable."""
    try:
        config = source()
        users = UserFile.load(config.users) if config.users is not None else None
    except ConfigError as e:
        raise ReloadError(str(e)) from None
    except UserFileError as e:
        raise ReloadError(f"users: {e}") from None
    except OSError as e:
        raise ReloadError(f"{e.strerror or e} ({getattr(e, 'filename', '') or 'config'})") from None
    return config, users


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """``key: old -> new`` for settings a running process cannot apply."""
    out = []
    for key in RESTART_ONLY:
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            show = (lambda v: ", ".join(map(str, v))) if key == "listen" else str
            out.append(f"{key}: {show(before)} -> {show(after)}")
    return out


def prepare(ctx: ServerContext, source: ConfigSource) -> NewParts:
    """Build the parts of a reload; ReloadError leaves ``ctx`` untouched."""
    config, users = load_checked(source)
    old = ctx.config
    changes = restart_only_changes(old, config)
    config = dataclasses.replace(config, **{key: getattr(old, key) for key in RESTART_ONLY})
    resolver = None
    if (config.hosts, config.dns, config.resolve_timeout) != (
        old.hosts,
        old.dns,
        old.resolve_timeout,
    ):
        resolver = make_resolver(config.hosts or None, config.dns or None, config.resolve_timeout)
    try:
        access_log = AccessLog(config.access_log, config.log_format)
    except OSError as e:
        raise ReloadError(f"access_log: cannot open {config.access_log}: {e.strerror}") from None
    return NewParts(config, users, effective_rules(config), resolver, access_log, changes)


def apply(ctx: ServerContext, parts: NewParts) -> None:
    """Swap the new parts in (no await in between: sessions see all old or all new)."""
    old_auth = ctx.authenticator
    if parts.users is None:
        ctx.authenticator = None
    elif old_auth is not None:
        old_auth.replace_users(parts.users)
    else:
        ctx.authenticator = UserPassAuthenticator(parts.users)
    if old_auth is not None and ctx.authenticator is None:
        # sessions in the middle of a password check still use it for a moment
        loop = asyncio.get_running_loop()
        loop.call_later(ctx.config.handshake_timeout + 1, old_auth.close)
    old_log = ctx.access_log
    ctx.access_log = parts.access_log
    old_log.close()
    if parts.resolver is not None:
        ctx.resolver = parts.resolver
    ctx.rules = parts.rules
    ctx.limits.configure(parts.config, time.monotonic())
    ctx.config = parts.config


def reload(ctx: ServerContext, source: ConfigSource) -> Config | None:
    """Reload from ``source``; return the previous config, or None when the reload failed."""
    old = ctx.config
    try:
        parts = prepare(ctx, source)
    except ReloadError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        return None
    for change in parts.restart_changes:
        log.warning("reload: %s needs a restart; keeping the running value", change)
    apply(ctx, parts)
    users = len(parts.users.users) if parts.users is not None else 0
    log.info(
        "reloaded configuration: %d rules, default %s, %d users",
        len(parts.rules.rules),
        parts.rules.default.value,
        users,
    )
    return old
