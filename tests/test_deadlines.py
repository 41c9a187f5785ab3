"""The shared deadline queue: one timer for many deadlines of the same length."""

from __future__ import annotations

import asyncio

import pytest

from socksd.server.handshake import deadlines
from socksd.server.handshake.deadlines import DeadlineQueue


async def _keys_expire_in_order_unless_discarded() -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(0.05, expired.append)
    queue.add("a")
    queue.add("b")
    queue.add("c")
    queue.discard("b")
    queue.discard("missing")  # nothing to drop: no error
    assert len(queue) == 2 and "b" not in queue
    await asyncio.sleep(0.2)
    assert expired == ["a", "c"]
    assert len(queue) == 0


async def _one_timer_for_all_and_none_when_empty() -> None:
    expired: list[int] = []
    queue: DeadlineQueue[int] = DeadlineQueue(0.05, expired.append)
    for key in range(100):
        queue.add(key)
    timer = queue._timer
    assert timer is not None
    queue.add(100)
    assert queue._timer is timer  # adding does not start another timer
    for key in range(101):
        queue.discard(key)
    await asyncio.sleep(0.1)
    assert expired == []
    assert queue._timer is None  # fired, found nothing left, not armed again


class Clock:
    """A monotonic clock the test moves by hand (the queue's timer is fired by hand too)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(deadlines, "time", clock)
    return clock


async def _a_later_key_waits_for_its_own_deadline(clock: Clock) -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(10.0, expired.append)
    queue.add("early")
    clock.now += 5
    queue.add("late")
    clock.now += 6  # past the first deadline, before the second
    queue._sweep()
    assert expired == ["early"]
    timer = queue._timer
    assert timer is not None  # armed again, for the second deadline
    assert 3.5 < timer.when() - asyncio.get_running_loop().time() <= 4.0
    clock.now += 4
    queue._sweep()
    assert expired == ["early", "late"]
    queue.close()


async def _adding_again_moves_the_deadline(clock: Clock) -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(10.0, expired.append)
    queue.add("a")
    queue.add("b")
    clock.now += 5
    queue.add("a")  # a's deadline starts again, after b's
    clock.now += 6
    queue._sweep()
    assert expired == ["b"]
    clock.now += 5
    queue._sweep()
    assert expired == ["b", "a"]
    queue.close()


async def _a_failing_expiry_does_not_keep_the_others() -> None:
    expired: list[str] = []
    errors: list[BaseException] = []

    def expire(key: str) -> None:
        if key == "bad":
            raise RuntimeError("boom")
        expired.append(key)

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
    queue: DeadlineQueue[str] = DeadlineQueue(0.05, expire)
    queue.add("bad")
    queue.add("good")
    await asyncio.sleep(0.2)
    assert expired == ["good"]
    assert [str(e) for e in errors] == ["boom"]


async def _close_forgets_everything() -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(0.05, expired.append)
    queue.add("a")
    queue.close()
    await asyncio.sleep(0.1)
    assert expired == [] and len(queue) == 0


def test_keys_expire_in_order_unless_discarded() -> None:
    asyncio.run(_keys_expire_in_order_unless_discarded())


def test_one_timer_for_all_and_none_when_empty() -> None:
    asyncio.run(_one_timer_for_all_and_none_when_empty())


def test_a_later_key_waits_for_its_own_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_a_later_key_waits_for_its_own_deadline(fake_clock(monkeypatch)))


def test_adding_again_moves_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(_adding_again_moves_the_deadline(fake_clock(monkeypatch)))


def test_a_failing_expiry_does_not_keep_the_others() -> None:
    asyncio.run(_a_failing_expiry_does_not_keep_the_others())


def test_close_forgets_everything() -> None:
    asyncio.run(_close_forgets_everything())
