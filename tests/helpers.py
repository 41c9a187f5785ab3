"""Helpers shared by unit and end-to-end tests: waiting for a condition, a clock tests advance, and
ports that refuse connections.

Tests wait for what they expect (a log line, a state, a count) by polling it under a deadline, never
by sleeping a fixed time and hoping: a loaded machine makes them slower, not wrong. Rates are
checked against a :class:`FakeClock` the code under test reads, never against the wall clock.
Ports are bound, never picked and released: servers under test listen on port 0 and report the
port they got, and a port meant to refuse is held by a socket that never accepts.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

POLL_INTERVAL = 0.01
"""Seconds between two looks at a condition."""


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = POLL_INTERVAL
) -> bool:
    """Poll ``predicate()`` until true or ``timeout``; return whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


async def await_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = POLL_INTERVAL
) -> bool:
    """:func:`wait_for` inside an event loop: the loop runs between two looks."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


class FakeClock:
    """A monotonic clock that moves only when the test calls :meth:`advance`."""

    __slots__ = ("now",)

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


_HELD: list[socket.socket] = []
"""The sockets holding the ports :func:`refused_port` gave out, open until the process ends."""


def refused_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port of ``host`` where connections are refused for the rest of the test run: TCP answers
    RST, UDP ICMP port unreachable. A socket holds it (bound, never listening; for UDP connected
    to another port, so nothing is delivered to it), so no other process can take it meanwhile,
    as one could a port picked free and released."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.bind((host, 0))
    if kind == socket.SOCK_DGRAM:
        sock.connect((host, 9))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


def _ports_free(base: int, count: int) -> bool:
    for port in range(base, base + count):
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    return False
    return True


def free_port_base(count: int = 10) -> int:
    """A base port with ``count`` consecutive ports free on 127.0.0.1 (TCP and UDP)."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(22000, 32000, 10)  # below the ephemeral range, above the benches
        if _ports_free(base, count):
            return base
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")
