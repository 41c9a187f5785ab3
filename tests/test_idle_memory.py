"""What an established session holds while it idles (issue 13: memory per idle session).

An idle session should hold what its relay and its access-log line need, nothing from its
handshake: not the parser and its buffer, not the command's finished task (which keeps its
coroutine), not the outgoing connection's Holding protocol. Objects on the session path are
slotted (no ``__dict__`` each). Idle timeouts share one sweep timer per loop and timeout; the
sweep is checked on a fake loop whose clock and timers the test drives.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from socksd.accesslog import SessionRecord
from socksd.config import build_config
from socksd.limits import Limits
from socksd.protocol import ClientConnection, ServerConnection
from socksd.server.dataplane import idle
from socksd.server.dataplane.idle import ActivityMark, IdleSweep, watch_idle
from socksd.server.dataplane.relay import Holding, Relay, RelayEndpoint
from socksd.server.handshake.admission import Admission
from socksd.server.handshake.refusals import RefusalLog
from socksd.server.handshake.session import Session
from socksd.server.process.context import ServerContext
from socksd.server.process.listener import Server
from tests.helpers import await_for

LOOPS = ["asyncio", "uvloop"]


def run(loop_name: str, main: Callable[[], Any]) -> None:
    if loop_name == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(asyncio.wait_for(main(), 30))
    else:
        asyncio.run(asyncio.wait_for(main(), 30))


# -- slots ------------------------------------------------------------------------------------


def test_session_path_objects_have_no_dict() -> None:
    """Every object an idle session keeps is slotted: a ``__dict__`` each costs ~100 bytes."""
    objects = [
        Session(SimpleNamespace()),  # type: ignore[arg-type]
        ServerConnection(),
        ClientConnection(),
        SessionRecord("127.0.0.1:1", 0.0),
        Admission(Limits(), "127.0.0.1", (4, 1), "127.0.0.1:1", RefusalLog()),
        Relay(SimpleNamespace()),
        RelayEndpoint(),
        Holding(),
        ActivityMark(),
        IdleSweep(SimpleNamespace(), 1.0),
    ]
    for obj in objects:
        assert not hasattr(obj, "__dict__"), type(obj).__name__


# -- what an established session still references ------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_established_session_drops_its_handshake(loop_name: str) -> None:
    """Once the relay runs, the session keeps no parser, no task, no Holding: none is alive."""

    async def main() -> None:
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        config = build_config({}, {"listen": ["127.0.0.1:0"], "access_log": "off"})
        ctx = ServerContext.create(config)
        server = Server(ctx)
        await server.start(announce=False)
        port = server.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2)
        writer.write(request + b"ping")
        answer = await reader.readexactly(2 + 10 + 4)  # method, reply, the echo
        assert answer[:4] == b"\x05\x00\x05\x00" and answer[-4:] == b"ping"
        (session,) = ctx.sessions
        assert await await_for(lambda: isinstance(session.relay, Relay))
        await asyncio.sleep(0)  # the command's task ends right after it started the relay
        gc.collect()
        held = gc.get_referents(session)
        assert not any(isinstance(o, (ServerConnection, asyncio.Task, Holding)) for o in held)
        assert session.task is None and session.gssapi is None
        assert not hasattr(session, "conn")
        alive = gc.get_objects()
        assert not [o for o in alive if isinstance(o, (ServerConnection, Holding))]
        assert not [
            o
            for o in alive
            if isinstance(o, asyncio.Task) and o.get_coro().__qualname__ == "connect"  # type: ignore[union-attr]
        ]
        writer.write(b"pong")  # and it still relays
        assert await reader.readexactly(4) == b"pong"
        writer.close()
        assert await await_for(lambda: not ctx.sessions)
        await server.shutdown()
        echo.close()

    run(loop_name, main)


def test_udp_association_drops_the_handshake_too() -> None:
    """A UDP ASSOCIATE session hands its connection over the same way (``hand_over``)."""

    async def main() -> None:
        config = build_config({}, {"listen": ["127.0.0.1:0"], "access_log": "off"})
        ctx = ServerContext.create(config)
        server = Server(ctx)
        await server.start(announce=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.addresses[0][1])
        writer.write(b"\x05\x01\x00" + b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        answer = await reader.readexactly(2 + 10)
        assert answer[:4] == b"\x05\x00\x05\x00"
        (session,) = ctx.sessions
        assert await await_for(lambda: session.relay is not None)
        await asyncio.sleep(0)
        assert not hasattr(session, "conn") and session.task is None
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, ServerConnection)]
        writer.close()
        assert await await_for(lambda: not ctx.sessions)
        await server.shutdown()

    run("uvloop", main)


# -- the shared idle sweep ---------------------------------------------------------------------


class FakeTimer:
    def __init__(self, loop: FakeLoop, when: float, callback: Callable[[], object]) -> None:
        self.loop, self.when, self.callback = loop, when, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """A loop clock and timers that move only when the test says (``advance``)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[FakeTimer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeTimer:
        timer = FakeTimer(self, self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock on, running each timer due on the way at its time."""
        end = self.now + seconds
        while True:
            due = [t for t in self.pending() if t.when <= end]
            if not due:
                break
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = timer.when
            timer.callback()
        self.now = end


class Watched:
    """A session as the sweep sees it: a counter and a close."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.count = 0
        self.closed_at: float | None = None
        self.reason: str | None = None

    def traffic(self) -> int:
        return self.count

    def close(self, reason: str | None = None) -> None:
        self.closed_at, self.reason = self.loop.now, reason


@pytest.mark.parametrize("start", [0.0, 0.3, 0.99])
def test_sweep_closes_an_idle_session_between_1_and_1_25_timeouts(start: float) -> None:
    """Whatever the sweep's phase when the session joins or last moves, it is closed after at
    least one timeout and at most 1.25 timeouts of quiet."""
    loop = FakeLoop()
    sweep = IdleSweep(loop, 4.0, "idle")  # type: ignore[arg-type]
    sweep.add(Watched(loop))  # an earlier session sets the sweep's phase
    loop.advance(start)
    item = Watched(loop)
    sweep.add(item)
    loop.advance(1.7)
    item.count += 10  # traffic at start + 1.7: the quiet starts here
    last = loop.now
    loop.advance(20)
    assert item.closed_at is not None and item.reason == "idle for 4s"
    assert 4.0 <= item.closed_at - last <= 5.0


def test_sweep_keeps_an_active_session() -> None:
    loop = FakeLoop()
    sweep = IdleSweep(loop, 4.0)  # type: ignore[arg-type]
    active, idle_one = Watched(loop), Watched(loop)
    sweep.add(active)
    sweep.add(idle_one)
    for _ in range(40):  # 20 s, a little traffic every half second
        loop.advance(0.5)
        active.count += 1
    assert active.closed_at is None
    assert idle_one.closed_at is not None
    assert list(sweep.watched) == [active]


def test_one_timer_for_all_sessions_and_none_when_empty() -> None:
    loop = FakeLoop()
    sweep = IdleSweep(loop, 8.0)  # type: ignore[arg-type]
    items = [Watched(loop) for _ in range(500)]
    for item in items:
        sweep.add(item)
    assert len(loop.pending()) == 1
    loop.advance(3)
    assert len(loop.pending()) == 1
    for item in items:
        sweep.discard(item)
    assert loop.pending() == []


def test_a_failing_close_does_not_stop_the_sweep() -> None:
    """One session whose close raises must not end the idle timeout of all the others."""
    loop = FakeLoop()
    sweep = IdleSweep(loop, 4.0)  # type: ignore[arg-type]
    broken, other = Watched(loop), Watched(loop)

    def explode(reason: str | None = None) -> None:
        raise RuntimeError("boom")

    broken.close = explode  # type: ignore[method-assign]
    sweep.add(broken)
    sweep.add(other)

    def busy(seconds: float) -> None:  # ``other`` moves every half second meanwhile
        for _ in range(int(seconds * 2)):
            loop.advance(0.5)
            other.count += 1

    with pytest.raises(RuntimeError):
        busy(10)
    loop.advance(10)
    assert other.closed_at is not None


def test_watch_idle_shares_one_sweep_per_loop_and_timeout() -> None:
    async def main() -> None:
        a, b, c = Watched(FakeLoop()), Watched(FakeLoop()), Watched(FakeLoop())
        first = watch_idle(a, 30.0)
        assert watch_idle(b, 30.0) is first
        other = watch_idle(c, 60.0)
        assert other is not first
        for sweep, item in ((first, a), (first, b), (other, c)):
            sweep.discard(item)
        assert not [key for key in idle._SWEEPS if key[0] is asyncio.get_running_loop()]  # type: ignore[index]

    asyncio.run(main())
