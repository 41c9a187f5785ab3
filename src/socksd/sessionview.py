"""The live-sessions view of ``socksd sessions``: one session's facts, the JSON schema, the table.

No I/O here. A server process builds a :class:`LiveSession` for each open session
(``Session.snapshot``); the control channel (``socksd.server.process.control``) carries them as
JSON objects (:meth:`LiveSession.as_dict`, the schema the README documents); the command reads
them back (:meth:`LiveSession.from_dict`) and prints them with :func:`format_table`.

A session's id is ``W-N``: ``W`` the worker that runs it (``0`` in a single-process server;
``W.G`` for a worker restarted for the G-th time), ``N`` its number in that worker. Values a client chose (user name, target) are shown quoted when they
are not plain printable ASCII (``accesslog.quote_field``), so a client cannot write terminal
escape sequences or extra lines into the admin's table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from socksd.accesslog import quote_field

SCHEMA_VERSION = 1
"""The ``version`` of the JSON answer; it changes only when a key changes meaning or goes away."""

STATES = ("handshake", "connecting", "relaying", "udp")
"""``handshake``: greeting, authentication, request; ``connecting``: the command runs (resolve,
connect, a BIND waiting for its peer); ``relaying``: CONNECT or BIND data; ``udp``: a UDP
association."""

SORT_KEYS = ("age", "bytes", "client", "idle", "id")


@dataclass(frozen=True, slots=True)
class LiveSession:
    """One open session as the control channel reports it."""

    id: str
    worker: int
    client: str
    user: str | None
    command: str | None
    target: str | None
    remote: str | None
    state: str
    started: float
    """Wall-clock time (Unix seconds) the connection was accepted."""
    age: float
    """Seconds since it was accepted."""
    idle: float | None
    """Seconds since data last moved either way (None: unknown)."""
    bytes_up: int
    bytes_down: int
    udp: Mapping[str, Any] | None = field(default=None)
    """A UDP association's ``datagrams_up``, ``datagrams_down``, ``dropped`` (reason -> count)."""
    protocol: str = "socks5"
    """What the client speaks: ``socks5``, ``socks4`` or ``http``."""

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this session (the README's schema)."""
        return {
            "id": self.id,
            "worker": self.worker,
            "client": self.client,
            "user": self.user,
            "command": self.command,
            "target": self.target,
            "remote": self.remote,
            "state": self.state,
            "started": _iso(self.started),
            "started_unix": round(self.started, 3),
            "age": round(self.age, 3),
            "idle": None if self.idle is None else round(self.idle, 3),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "udp": None if self.udp is None else dict(self.udp),
            "protocol": self.protocol,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LiveSession:
        """Read one session object back; ValueError when a key is missing or of the wrong type."""
        try:
            idle = data["idle"]
            udp = data.get("udp")
            return cls(
                id=_text(data["id"]),
                worker=_count(data["worker"]),
                client=_text(data["client"]),
                user=_optional_text(data["user"]),
                command=_optional_text(data["command"]),
                target=_optional_text(data["target"]),
                remote=_optional_text(data.get("remote")),
                state=_text(data["state"]),
                started=_seconds(data["started_unix"]),
                age=_seconds(data["age"]),
                idle=None if idle is None else _seconds(idle),
                bytes_up=_count(data["bytes_up"]),
                bytes_down=_count(data["bytes_down"]),
                udp=dict(udp) if isinstance(udp, Mapping) else None,
                protocol=_text(data.get("protocol", "socks5")),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed session object: {e}") from None

    @property
    def bytes_total(self) -> int:
        return self.bytes_up + self.bytes_down


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TypeError(f"expected a count, got {value!r}")
    return value


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TypeError(f"expected seconds, got {value!r}")
    return float(value)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _id_key(session: LiveSession) -> tuple[int, int, int, str]:
    """``W-N`` and ``W.G-N`` by worker, start and number; anything else after them."""
    label, _, number = session.id.partition("-")
    worker, _, start = label.partition(".")
    if worker.isdigit() and number.isdigit() and (start.isdigit() or not start):
        return (int(worker), int(start or 1), int(number), "")
    return (1 << 30, 0, 0, session.id)


_SORTS: dict[str, Callable[[LiveSession], Any]] = {
    "age": lambda s: (-s.age, _id_key(s)),
    "bytes": lambda s: (-s.bytes_total, _id_key(s)),
    "client": lambda s: (s.client, -s.age, _id_key(s)),
    "idle": lambda s: (-(s.idle if s.idle is not None else -1.0), _id_key(s)),
    "id": _id_key,
}


def sort_sessions(sessions: Sequence[LiveSession], key: str = "age") -> list[LiveSession]:
    """``age``: oldest first; ``bytes``: most bytes (both ways) first; ``client``: by address;
    ``idle``: longest idle first; ``id``: by worker and number."""
    return sorted(sessions, key=_SORTS[key])


def human_bytes(n: int) -> str:
    """``512 B``, ``1.5 KiB``, ``12 MiB``, ``3.2 GiB`` (three significant digits at most)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            break
    return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"


def human_duration(seconds: float | None) -> str:
    """``-`` (unknown), ``0.4s``, ``45s``, ``3m05s``, ``2h03m``, ``4d02h``."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{max(seconds, 0.0):.1f}s"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


COMMAND_LABELS = {"UDP_ASSOCIATE": "UDP"}

MAX_TARGET_WIDTH = 48
MAX_USER_WIDTH = 20

_COLUMNS = ("ID", "CLIENT", "USER", "COMMAND", "TARGET", "STATE", "UP", "DOWN", "AGE", "IDLE")
_RIGHT = frozenset(("UP", "DOWN", "AGE", "IDLE"))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_row(s: LiveSession) -> tuple[str, ...]:
    """The table cells of one session (client-chosen values quoted when unusual, long ones cut)."""
    command = "-" if s.command is None else COMMAND_LABELS.get(s.command, s.command)
    if s.protocol != "socks5":
        command += f"/{s.protocol}"
    return (
        s.id,
        s.client,
        _clip(quote_field(s.user), MAX_USER_WIDTH),
        command,
        _clip(quote_field(s.target), MAX_TARGET_WIDTH),
        s.state,
        human_bytes(s.bytes_up),
        human_bytes(s.bytes_down),
        human_duration(s.age),
        human_duration(s.idle),
    )


def format_table(
    sessions: Sequence[LiveSession],
    *,
    sort: str = "age",
    workers: int = 1,
    errors: Sequence[str] = (),
) -> str:
    """A header, one line per session (sorted by ``sort``), a summary line and any worker errors."""
    rows = [_COLUMNS] + [table_row(s) for s in sort_sessions(sessions, sort)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if name in _RIGHT else cell.ljust(width)
            for name, cell, width in zip(_COLUMNS, row, widths, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    up = sum(s.bytes_up for s in sessions)
    down = sum(s.bytes_down for s in sessions)
    count = len(sessions)
    summary = (
        f"{count} session{'' if count == 1 else 's'}"
        f" ({workers} worker{'' if workers == 1 else 's'}), "
        f"{human_bytes(up)} up, {human_bytes(down)} down"
    )
    lines.append(summary)
    lines.extend(f"incomplete: {error}" for error in errors)
    return "\n".join(lines)
