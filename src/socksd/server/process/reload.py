"""Live reload (SIGHUP): the server a fresh start with the new config would give; none dropped.

:func:`reload` reads the config again through the ``ConfigSource`` the command line gave (the
same file and the same flags, which still win), then derives every part from it with the same
function start-up uses (:func:`socksd.server.process.context.derive`: authentication methods, user file,
GSSAPI acceptor, rules with this host's current addresses, resolver, access log, limits) before
touching the running server. Any error leaves the running configuration as it was and is logged
in one line. On success the parts are installed in one step of the event loop: sessions already
established keep their connections, relays and counters; later checkpoints read the new parts,
and open UDP associations check their next datagrams against the new rules.

``listen``, ``workers``, ``loop``, ``metrics`` and ``limits_store`` (and the control socket's
``control_socket`` and ``control_group``) cannot change in a running process: a change is logged as needing a
restart and the running values stay. With ``--workers N`` the supervisor checks the new config
with the same function, then forwards SIGHUP to each worker, which reloads itself.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from socksd.config import Config, ConfigError
from socksd.limitstore import without_password
from socksd.server.process.context import Derived, ServerContext, derive

log = logging.getLogger("socksd")

ConfigSource = Callable[[], Config]
"""Builds the config afresh (file, then flags); raises ConfigError when it is wrong."""

RESTART_ONLY = (
    "listen",
    "workers",
    "loop",
    "metrics",
    "control_socket",
    "control_group",
    "limits_store",
)


class ReloadError(Exception):
    """The new configuration cannot be used; the message says why."""


def load_checked(source: ConfigSource) -> Config:
    """The new config; ReloadError with a one-line reason when unusable."""
    try:
        return source()
    except ConfigError as e:
        raise ReloadError(str(e)) from None
    except OSError as e:
        raise ReloadError(f"{e.strerror or e} ({getattr(e, 'filename', '') or 'config'})") from None


def _shown(key: str, value: object) -> str:
    """A restart-only setting as the log shows it (a Redis URL without its password)."""
    if key == "listen" and isinstance(value, (list, tuple)):
        return ", ".join(map(str, value))
    if key == "limits_store":
        return without_password(str(value))
    return str(value)


def restart_only_changes(old: Config, new: Config) -> list[str]:
    """``key: old -> new`` for settings a running process cannot apply."""
    out = []
    for key in RESTART_ONLY:
        before, after = getattr(old, key), getattr(new, key)
        if before != after:
            out.append(f"{key}: {_shown(key, before)} -> {_shown(key, after)}")
    return out


def prepare(
    source: ConfigSource, running: Config, previous: ServerContext | None = None
) -> tuple[Derived, list[str]]:
    """Derive the parts of a reload and the restart-only changes; ReloadError touches nothing."""
    config = load_checked(source)
    changes = restart_only_changes(running, config)
    config = dataclasses.replace(config, **{key: getattr(running, key) for key in RESTART_ONLY})
    try:
        return derive(config, previous), changes
    except ConfigError as e:
        raise ReloadError(str(e)) from None


def reload(ctx: ServerContext, source: ConfigSource) -> Config | None:
    """Reload from ``source``; return the previous config, or None when the reload failed."""
    old = ctx.config
    try:
        parts, changes = prepare(source, old, ctx)
    except ReloadError as e:
        log.error("reload failed, keeping the running configuration: %s", e)
        return None
    for change in changes:
        log.warning("reload: %s needs a restart; keeping the running value", change)
    ctx.install(parts)
    users = parts.users.describe() if parts.users is not None else "0 users"
    log.info(
        "reloaded configuration: methods %s, %d rules, default %s, %s",
        ",".join(parts.config.auth_methods),
        len(parts.rules.rules),
        parts.rules.default.value,
        users,
    )
    return old
