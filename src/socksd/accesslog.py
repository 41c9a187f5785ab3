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
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

logger = logging.getLogger("socksd.access")

LOG_FILE_MODE = 0o640
"""Mode of a log file socksd creates (client addresses and user names are not for everyone)."""


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
    protocol: str = "socks5"
    """What the client spoke: ``socks5``, ``socks4`` (4a too) or ``http`` (CONNECT)."""
    userid: str | None = None
    """A SOCKS4 request's USERID (``user_name``): logged, never a login."""

    def as_dict(self, ended: float) -> dict[str, object]:
        fields: dict[str, object] = {
            "time": iso_time(ended),
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
            "protocol": self.protocol,
        }
        if self.userid is not None:
            fields["userid"] = self.userid
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


def quote_field(value: str | None) -> str:
    """A value safe to put in a space-separated line: quoted JSON-style if it needs to be.

    Bare only when it is printable ASCII without quote or backslash and not ``-`` (no value), so
    every value reads back unambiguously and no value can add a field or a line.
    """
    if value is None:
        return "-"
    if value and value != "-" and all("!" <= c <= "~" and c not in '"\\' for c in value):
        return value
    return json.dumps(value)


def iso_time(t: float) -> str:
    """UTC, ISO 8601 with milliseconds: ``2026-11-25T14:32:12.839Z`` (both logs' ``time``)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def format_text(record: SessionRecord, ended: float) -> str:
    """``TIME CLIENT user=U CMD TARGET -> REMOTE rep=0xNN up=N down=N dur=S [UDP] [rule=R] [via=LB]
    [upstream=NAME] [protocol=P] [userid=U] [error=E]``.

    ``protocol`` is written for SOCKS4 and HTTP sessions only (no field: SOCKS5); ``userid`` for
    SOCKS4 requests, quoted like a user name.

    ``UDP`` (UDP associations only) is ``dgrams_up=N dgrams_down=N dropped=N[(reason=N,...)]``.

    A user name or target with anything but printable ASCII (spaces, quotes, backslashes, control
    characters, bytes that are not UTF-8: see ``user_name``) is written as a JSON string, so a
    client cannot forge lines or fields, and two different names never look the same.
    """
    rep = "-" if record.reply is None else f"0x{record.reply:02x}"
    line = (
        f"{iso_time(ended)} {record.client} user={quote_field(record.user)} {record.command or '-'} "
        f"{quote_field(record.target)} -> {record.remote or '-'} rep={rep} "
        f"up={record.bytes_up} down={record.bytes_down} dur={ended - record.started:.3f}s"
    )
    if record.udp is not None:
        line += " " + record.udp.format_text()
    if record.rule:
        line += f" rule={record.rule}"
    if record.via:
        line += f" via={record.via}"
    if record.upstream is not None:
        line += f" upstream={quote_field(record.upstream)}"
    if record.protocol != "socks5":
        line += f" protocol={record.protocol}"
    if record.userid is not None:
        line += f" userid={quote_field(record.userid)}"
    if record.error:
        line += f" error={json.dumps(record.error)}"
    return line


def format_json(record: SessionRecord, ended: float) -> str:
    """One JSON object, no newline."""
    return json.dumps(record.as_dict(ended), separators=(",", ":"))


def _open_file(path: str) -> TextIO:
    """``path`` for appending lines, created with ``LOG_FILE_MODE``; each line written at once."""
    return open(
        path,
        "a",
        buffering=1,
        encoding="utf-8",
        opener=lambda name, flags: os.open(name, flags, LOG_FILE_MODE),
    )


class AccessLog:
    """Writes session records to a stream (stderr by default) or a file; ``off`` writes nothing."""

    def __init__(self, destination: str = "-", fmt: str = "text") -> None:
        self.enabled = destination != "off"
        self.destination = destination
        self._format = format_json if fmt == "json" else format_text
        self._stream: TextIO
        self._owned = False
        if destination in ("-", "off"):
            self._stream = sys.stderr
        else:
            self._stream = _open_file(destination)
            self._owned = True

    def reopen(self) -> bool:
        """Open the file again by its name (logrotate moved it): the next line goes to the new
        file, none is lost. False, logged, when it cannot be opened: lines go on to the old one."""
        if not self._owned:
            return True
        try:
            stream = _open_file(self.destination)
        except OSError as e:
            logger.error(
                "access_log: cannot reopen %s: %s; still writing to the old file",
                self.destination,
                e.strerror,
            )
            return False
        old, self._stream = self._stream, stream
        old.close()
        return True

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
