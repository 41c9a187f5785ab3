"""One access-log line per session, written when the session ends.

Fields: client address, user, command, target as the client asked for it (a domain stays a domain),
the address actually used, reply code, bytes each way, duration, and, when an access rule
decided, which one (``rule``: a rule number, ``default`` or ``protect_local``); when the request
went through an upstream proxy, its name (``upstream``; ``remote`` is then that proxy); for a UDP
association also the datagrams each way and the datagrams dropped, by reason. ``text`` is one
readable line; ``json`` is one JSON object a line (JSON Lines). Passwords never reach this module.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

logger = logging.getLogger("socksd.access")


@dataclass(slots=True)
class UdpStats:
    """What a UDP association relayed: datagrams each way, and drops by reason."""

    datagrams_up: int = 0
    datagrams_down: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "datagrams_up": self.datagrams_up,
            "datagrams_down": self.datagrams_down,
            "dropped": dict(self.dropped),
        }

    def format_text(self) -> str:
        """``dgrams_up=N dgrams_down=N dropped=N`` and ``(reason=N,...)`` when N > 0."""
        total = sum(self.dropped.values())
        text = f"dgrams_up={self.datagrams_up} dgrams_down={self.datagrams_down} dropped={total}"
        if total:
            text += "(" + ",".join(f"{k}={v}" for k, v in sorted(self.dropped.items()) if v) + ")"
        return text


@dataclass(slots=True)
class SessionRecord:
    """What one session did; filled in as the session goes on."""

    client: str
    started: float
    user: str | None = None
    command: str | None = None
    target: str | None = None
    remote: str | None = None
    reply: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    error: str | None = None
    rule: str | None = None
    """What decided an access rule check: a rule number, ``default`` or ``protect_local``."""
    udp: UdpStats | None = None
    via: str | None = None
    """The load balancer's HOST:PORT when the client came through one (PROXY protocol)."""
    upstream: str | None = None
    """The ``[upstreams]`` name the request went through (``remote`` is then that proxy)."""

    def as_dict(self, ended: float) -> dict[str, object]:
        fields: dict[str, object] = {
            "time": _iso(ended),
            "client": self.client,
            "user": self.user,
            "command": self.command,
            "target": self.target,
            "remote": self.remote,
            "reply": self.reply,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration": round(ended - self.started, 6),
            "error": self.error,
            "rule": self.rule,
        }
        if self.udp is not None:
            fields["udp"] = self.udp.as_dict()
        if self.via is not None:
            fields["via"] = self.via
        if self.upstream is not None:
            fields["upstream"] = self.upstream
        return fields


def user_name(raw: bytes) -> str:
    """A user name as sent, for the log and the rules: UTF-8, other bytes kept as lone surrogates.

    So a name that is not UTF-8 stays distinct from every text name (byte 0xff is not the four
    characters backslash, x, f, f), and the log writes it quoted: byte 0xff as ``"\\udcff"``.
    """
    return raw.decode("utf-8", "surrogateescape")


def _field(value: str | None) -> str:
    """A value safe to put in a space-separated line: quoted JSON-style if it needs to be.

    Bare only when it is printable ASCII without quote or backslash and not ``-`` (no value), so
    every value reads back unambiguously and no value can add a field or a line.
    """
    if value is None:
        return "-"
    if value and value != "-" and all("!" <= c <= "~" and c not in '"\\' for c in value):
        return value
    return json.dumps(value)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def format_text(record: SessionRecord, ended: float) -> str:
    """``TIME CLIENT user=U CMD TARGET -> REMOTE rep=0xNN up=N down=N dur=S [UDP] [rule=R] [via=LB]
    [upstream=NAME] [error=E]``.

    ``UDP`` (UDP associations only) is ``dgrams_up=N dgrams_down=N dropped=N[(reason=N,...)]``.

    A user name or target with anything but printable ASCII (spaces, quotes, backslashes, control
    characters, bytes that are not UTF-8: see ``user_name``) is written as a JSON string, so a
    client cannot forge lines or fields, and two different names never look the same.
    """
    rep = "-" if record.reply is None else f"0x{record.reply:02x}"
    line = (
        f"{_iso(ended)} {record.client} user={_field(record.user)} {record.command or '-'} "
        f"{_field(record.target)} -> {record.remote or '-'} rep={rep} "
        f"up={record.bytes_up} down={record.bytes_down} dur={ended - record.started:.3f}s"
    )
    if record.udp is not None:
        line += " " + record.udp.format_text()
    if record.rule:
        line += f" rule={record.rule}"
    if record.via:
        line += f" via={record.via}"
    if record.upstream is not None:
        line += f" upstream={_field(record.upstream)}"
    if record.error:
        line += f" error={json.dumps(record.error)}"
    return line


def format_json(record: SessionRecord, ended: float) -> str:
    """One JSON object, no newline."""
    return json.dumps(record.as_dict(ended), separators=(",", ":"))


class AccessLog:
    """Writes session records to a stream (stderr by default) or a file; ``off`` writes nothing."""

    def __init__(self, destination: str = "-", fmt: str = "text") -> None:
        self.enabled = destination != "off"
        self._format = format_json if fmt == "json" else format_text
        self._stream: TextIO
        self._owned = False
        if destination in ("-", "off"):
            self._stream = sys.stderr
        else:
            self._stream = open(destination, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            self._owned = True

    def write(self, record: SessionRecord) -> None:
        """Write one line for a finished session."""
        if self.enabled:
            try:
                self._stream.write(self._format(record, time.time()) + "\n")
            except (OSError, ValueError) as e:  # a full disk must not kill sessions
                logger.error("access log write failed: %s", e)

    def close(self) -> None:
        if self._owned:
            self._stream.close()
