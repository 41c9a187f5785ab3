"""The bounded log of refusals (socksd.server.handshake.refusals): the budget per reason and
window, the summary's exact counts and addresses, bounded memory under spoofed addresses, the
timer that writes the summary, and the lines still logged at debug level. A fake clock and a
fake scheduler: no sleeps."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from socksd.server.handshake.refusals import (
    FIRST_HELD,
    HELD,
    LOG,
    RefusalBudget,
    RefusalLog,
)
from tests.helpers import FakeClock

SUMMARY = re.compile(r"refused (\d+) more in the last ([\d.]+)s without a line each \((.*)\);")


def test_first_refusals_of_each_reason_are_logged_then_counted() -> None:
    budget = RefusalBudget(lines=3, window=10.0)
    assert [budget.note("max_sessions", "10.0.0.1", 0.0) for _ in range(3)] == [LOG] * 3
    assert budget.note("max_sessions", "10.0.0.1", 1.0) == FIRST_HELD
    assert budget.note("max_sessions", "10.0.0.2", 2.0) == HELD
    assert budget.due == 10.0  # the window opened with the first refusal
    # another reason has its own budget, and its own first held refusal
    assert [budget.note("max_sessions_per_ip", "10.0.0.3", 3.0) for _ in range(3)] == [LOG] * 3
    assert budget.note("max_sessions_per_ip", "10.0.0.3", 3.0) == FIRST_HELD
    assert budget.due == 10.0  # one summary for the window
    line = budget.summary(10.0)
    assert line is not None
    level, text = line
    assert level == logging.WARNING
    assert text == (
        "refused 3 more in the last 10s without a line each (max_sessions: 2 from 2 addresses: "
        "10.0.0.1 (1), 10.0.0.2 (1); max_sessions_per_ip: 1 from 10.0.0.3); from now on each is "
        "logged again, up to 3 per reason in 10s"
    )
    # the next window starts afresh
    assert budget.due is None
    assert budget.note("max_sessions", "10.0.0.1", 10.5) == LOG


def test_a_window_with_every_refusal_logged_has_no_summary() -> None:
    budget = RefusalBudget(lines=3, window=10.0)
    for t in (0.0, 4.0, 9.0):
        assert budget.note("max_sessions", "10.0.0.1", t) == LOG
    assert budget.due is None and budget.summary(12.0) is None
    # the window ended on its own: a new one, with its budget
    for t in (12.0, 13.0, 14.0):
        assert budget.note("max_sessions", "10.0.0.1", t) == LOG
    assert budget.note("max_sessions", "10.0.0.1", 21.9) == FIRST_HELD  # still 12.0's window
    assert budget.due == 22.0


def test_summary_counts_exactly_and_names_the_addresses_refused_most() -> None:
    budget = RefusalBudget(lines=2, window=10.0)
    sent = {"192.0.2.7": 400, "192.0.2.8": 70, "192.0.2.9": 10, "192.0.2.10": 3, "192.0.2.11": 1}
    for address, count in sent.items():
        for _ in range(count):
            budget.note("max_sessions_per_ip", address, 1.0)
    line = budget.summary(10.0)
    assert line is not None
    found = SUMMARY.match(line[1])
    assert found is not None, line
    assert int(found[1]) == sum(sent.values()) - 2  # the first two were logged
    assert found[3] == (
        "max_sessions_per_ip: 482 from 5 addresses, most from 192.0.2.7 (398), 192.0.2.8 (70), "
        "192.0.2.9 (10)"
    )


def test_spoofed_addresses_keep_memory_bounded_and_the_heavy_one_shown() -> None:
    """A storm of one-off addresses fills the table; the address refused most is still named,
    its count marked as an upper bound; the table never grows beyond its cap."""
    budget = RefusalBudget(lines=0, window=10.0, addresses=16)
    for n in range(5000):
        budget.note("max_sessions", f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", 1.0)
        if n % 10 == 0:
            budget.note("max_sessions", "192.0.2.66", 1.0)
        assert len(budget._reasons["max_sessions"].addresses) <= 16
    line = budget.summary(10.0)
    assert line is not None
    found = SUMMARY.match(line[1])
    assert found is not None, line
    assert int(found[1]) == 5500  # the count itself stays exact
    assert found[3].startswith("max_sessions: 5500 from over 16 addresses, most from 192.0.2.66 (~")


def test_summary_at_shutdown_covers_the_window_so_far_at_the_highest_level() -> None:
    budget = RefusalBudget(lines=1, window=10.0)
    budget.note("max_auth_checks_per_ip", "10.0.0.1", 100.0)
    budget.note("max_auth_checks_per_ip", "10.0.0.1", 101.0)
    budget.note("user store unavailable", "10.0.0.2", 102.0, logging.ERROR)
    budget.note("user store unavailable", "10.0.0.2", 102.5, logging.ERROR)
    line = budget.summary(103.25)
    assert line is not None
    level, text = line
    assert level == logging.ERROR
    assert text.startswith("refused 2 more in the last 3.25s without a line each")


# -- RefusalLog: the lines, the timer -------------------------------------------------------------


@dataclass
class FakeTimers:
    """``call_later`` recording what is scheduled; the test runs it."""

    pending: list[tuple[float, Callable[[], None]]] = field(default_factory=list)
    cancelled: int = 0

    def __call__(self, delay: float, callback: Callable[[], None]) -> FakeTimers:
        self.pending.append((delay, callback))
        return self

    def cancel(self) -> None:
        self.cancelled += 1

    def fire(self) -> None:
        _, callback = self.pending.pop(0)
        callback()


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="socksd.session")
    return caplog


def _lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def test_a_storm_logs_the_budget_a_notice_and_one_summary(
    logged: pytest.LogCaptureFixture,
) -> None:
    clock, timers = FakeClock(0.0), FakeTimers()
    refusals = RefusalLog(budget=RefusalBudget(lines=10), clock=clock, schedule=timers)
    for n in range(300):
        clock.advance(0.01)
        refusals.refused("max_sessions", "127.0.0.1", "refusing %s: %d (max_sessions)", n, 2)
    warnings = _lines(logged, logging.WARNING)
    assert warnings[:10] == [f"refusing {n}: 2 (max_sessions)" for n in range(10)]
    assert warnings[10] == (
        "max_sessions: more than 10 refusals within 10s; not logging each one for the next 9.9s "
        "(a summary follows)"
    )
    assert len(warnings) == 11  # nothing more until the window ends
    # every refusal not logged is still there at debug level
    assert _lines(logged, logging.DEBUG) == [
        f"refusing {n}: 2 (max_sessions)" for n in range(10, 300)
    ]
    assert [delay for delay, _ in timers.pending] == [pytest.approx(9.9)]  # one timer
    clock.now = 10.01  # the window opened with the first refusal, at 0.01
    timers.fire()
    summary = _lines(logged, logging.WARNING)[11:]
    assert len(summary) == 1
    assert summary[0].startswith(
        "refused 290 more in the last 10s without a line each (max_sessions: 290 from 127.0.0.1)"
    )
    # logged again afterwards
    clock.advance(1.0)
    refusals.refused("max_sessions", "127.0.0.1", "refusing %s", "again")
    assert _lines(logged, logging.WARNING)[-1] == "refusing again"


def test_a_late_timer_is_overtaken_by_the_next_refusal(logged: pytest.LogCaptureFixture) -> None:
    clock, timers = FakeClock(0.0), FakeTimers()
    refusals = RefusalLog(budget=RefusalBudget(lines=1), clock=clock, schedule=timers)
    for _ in range(3):
        refusals.refused("max_sessions_per_ip", "10.0.0.1", "refusing")
    clock.advance(12.0)  # the loop was busy: the timer has not run yet
    refusals.refused("max_sessions_per_ip", "10.0.0.1", "refusing")
    assert timers.cancelled == 1
    warnings = _lines(logged, logging.WARNING)
    assert warnings[-2].startswith("refused 2 more in the last 10s")
    assert warnings[-1] == "refusing"  # the new window's first, logged
    refusals.close()  # nothing held in the new window: no second summary
    assert _lines(logged, logging.WARNING)[-1] == "refusing"


def test_close_writes_the_pending_summary(logged: pytest.LogCaptureFixture) -> None:
    clock, timers = FakeClock(0.0), FakeTimers()
    refusals = RefusalLog(budget=RefusalBudget(lines=2), clock=clock, schedule=timers)
    for _ in range(7):
        refusals.refused("max_sessions", "10.0.0.1", "refusing")
    clock.advance(2.5)
    refusals.close()
    assert timers.cancelled == 1
    assert _lines(logged, logging.WARNING)[-1].startswith("refused 5 more in the last 2.5s")


def test_without_a_running_loop_the_summary_waits_for_the_next_refusal(
    logged: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    refusals = RefusalLog(budget=RefusalBudget(lines=1), clock=clock)  # the real scheduler
    refusals.refused("max_sessions", "10.0.0.1", "refusing")
    refusals.refused("max_sessions", "10.0.0.1", "refusing")  # held: no loop, no timer
    clock.advance(10.0)
    refusals.refused("max_sessions", "10.0.0.1", "refusing")
    assert _lines(logged, logging.WARNING)[-2].startswith("refused 1 more in the last 10s")
