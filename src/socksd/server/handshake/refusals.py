"""The log lines of refused connections and logins, bounded under a storm.

Every refusal that would otherwise log one line per connection (``max_sessions``,
``max_sessions_per_ip``, ``max_sessions_per_user``, the login throttle's refusals, a user store
that cannot answer, a PROXY header from an untrusted address) goes through one
:class:`RefusalLog` per server process. Within each window of :data:`WINDOW` seconds (opened by
the first refusal after a quiet time) the first :data:`LINES_PER_REASON` refusals of each reason
are logged as they are; from the next one on, that reason logs one line saying so, and its
refusals are only counted (and logged at debug level, so ``--log-level debug`` still shows each).
When the window ends, one line sums up what was not logged: the count per reason, how many client
addresses, and the addresses refused most. Then each refusal is logged again, within the next
window's budget. So a flood costs at most ``LINES_PER_REASON + 1`` lines per reason and one summary
per window, whatever its rate; the metrics count every refusal as before.

:class:`RefusalBudget` is the bookkeeping (no I/O; the caller passes the time). Memory is bounded:
the reasons are the code's own few strings, and each reason keeps at most :data:`ADDRESSES`
client addresses per window (the space-saving algorithm: when full, the address counted least
makes room, so an address refused often is still shown whatever a storm of spoofed addresses
does; its count is then an upper bound, marked ``~``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

LINES_PER_REASON = 10
"""Refusals of one reason logged one by one in a window; beyond, they are counted."""
WINDOW = 10.0
"""Seconds of one window: the budget's period, and the delay of its summary line."""
ADDRESSES = 64
"""Client addresses counted per reason and window, for the summary (bounded memory)."""
SHOWN = 3
"""Addresses named in the summary, per reason (those refused most)."""

LOG = 0
""":meth:`RefusalBudget.note`: log this refusal."""
HELD = 1
"""Not logged, counted for the summary."""
FIRST_HELD = 2
"""The first of its reason not logged in the window: say so (and, the first of the window,
schedule the summary at :attr:`RefusalBudget.due`)."""


@dataclass(slots=True)
class _Reason:
    """One reason's counts in the current window."""

    level: int
    logged: int = 0
    held: int = 0
    addresses: dict[str, int] = field(default_factory=dict)
    overflow: bool = False
    """More addresses than :data:`ADDRESSES` were held: the counts shown are upper bounds."""

    def count(self, address: str, cap: int) -> None:
        counts = self.addresses
        if address in counts:
            counts[address] += 1
        elif len(counts) < cap:
            counts[address] = 1
        else:  # space-saving: the least counted address makes room, its count inherited
            least = min(counts, key=counts.__getitem__)
            counts[address] = counts.pop(least) + 1
            self.overflow = True

    def describe(self, name: str, cap: int) -> str:
        shown = sorted(self.addresses.items(), key=lambda item: -item[1])[:SHOWN]
        mark = "~" if self.overflow else ""
        if len(self.addresses) == 1 and not self.overflow:
            return f"{name}: {self.held} from {shown[0][0]}"
        listed = ", ".join(f"{address} ({mark}{count})" for address, count in shown)
        if self.overflow:
            return f"{name}: {self.held} from over {cap} addresses, most from {listed}"
        if len(self.addresses) > SHOWN:
            return f"{name}: {self.held} from {len(self.addresses)} addresses, most from {listed}"
        return f"{name}: {self.held} from {len(self.addresses)} addresses: {listed}"


class RefusalBudget:
    """Which refusals to log, and the summary of those that were not; no I/O."""

    __slots__ = ("_reasons", "_start", "addresses", "due", "lines", "window")

    def __init__(
        self, lines: int = LINES_PER_REASON, window: float = WINDOW, addresses: int = ADDRESSES
    ) -> None:
        self.lines = lines
        self.window = window
        self.addresses = addresses
        self._start: float | None = None
        """When the current window opened; None: no window (nothing refused lately)."""
        self._reasons: dict[str, _Reason] = {}
        self.due: float | None = None
        """When the current window's summary is due; None: nothing held, no summary."""

    def note(self, reason: str, address: str, now: float, level: int = logging.WARNING) -> int:
        """A refusal of ``reason`` for the client at ``address``: :data:`LOG`, :data:`HELD` or
        :data:`FIRST_HELD`. The window must not be over with refusals held (take the summary
        first: :meth:`summary`)."""
        start = self._start
        if start is None or now >= start + self.window:
            self._start, self._reasons, self.due = now, {}, None
            start = now
        counts = self._reasons.get(reason)
        if counts is None:
            counts = self._reasons[reason] = _Reason(level)
        if counts.logged < self.lines:
            counts.logged += 1
            return LOG
        counts.held += 1
        counts.count(address, self.addresses)
        if counts.held > 1:
            return HELD
        if self.due is None:
            self.due = start + self.window
        return FIRST_HELD

    def remaining(self, now: float) -> float:
        """Seconds until the summary (0 when none is due)."""
        return 0.0 if self.due is None else max(0.0, self.due - now)

    def summary(self, now: float) -> tuple[int, str] | None:
        """End the current window (its time is up, or the process stops) and return the level
        and text of its summary line; None when every refusal in it was logged."""
        start, reasons, due = self._start, self._reasons, self.due
        self._start, self._reasons, self.due = None, {}, None
        if start is None or due is None:
            return None
        held = [(name, counts) for name, counts in reasons.items() if counts.held]
        total = sum(counts.held for _, counts in held)
        seconds = min(now, due) - start
        parts = "; ".join(counts.describe(name, self.addresses) for name, counts in held)
        text = (
            f"refused {total} more in the last {seconds:.3g}s without a line each ({parts}); "
            f"from now on each is logged again, up to {self.lines} per reason in {self.window:g}s"
        )
        return max(counts.level for _, counts in held), text


class _Timer(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], _Timer]
"""``call_later(delay, callback)``: how the summary is scheduled."""


def _running_loop_later(delay: float, callback: Callable[[], None]) -> _Timer:
    return asyncio.get_running_loop().call_later(delay, callback)


class RefusalLog:
    """The one way a per-connection refusal is logged (see the module's docstring)."""

    __slots__ = ("_budget", "_clock", "_log", "_schedule", "_timer")

    def __init__(
        self,
        logger: logging.Logger | None = None,
        budget: RefusalBudget | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule = _running_loop_later,
    ) -> None:
        self._log = logger or logging.getLogger("socksd.session")
        self._budget = budget or RefusalBudget()
        self._clock = clock
        self._schedule = schedule
        self._timer: _Timer | None = None

    def refused(
        self, reason: str, address: str, msg: str, *args: object, level: int = logging.WARNING
    ) -> None:
        """Log ``msg % args`` at ``level`` for a refusal of ``reason`` (a setting's name) of the
        client at ``address`` (no port), or count it for the window's summary."""
        budget = self._budget
        now = self._clock()
        if budget.due is not None and now >= budget.due:
            self.flush()  # the timer is late (a busy loop) or there is none
        verdict = budget.note(reason, address, now, level)
        if verdict == LOG:
            self._log.log(level, msg, *args)
            return
        self._log.debug(msg, *args)
        if verdict == FIRST_HELD:
            self._log.log(
                level,
                "%s: more than %d refusals within %gs; not logging each one for the next %.3gs "
                "(a summary follows)",
                reason,
                budget.lines,
                budget.window,
                budget.remaining(now),
            )
            if self._timer is None:
                # no running loop (RuntimeError): the next refusal or close() sums up
                with contextlib.suppress(RuntimeError):
                    self._timer = self._schedule(budget.remaining(now), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Log the current window's summary now, if refusals were held, and end the window."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        line = self._budget.summary(self._clock())
        if line is not None:
            self._log.log(line[0], "%s", line[1])

    def close(self) -> None:
        """The process stops: the held refusals' summary now (for the window so far)."""
        self.flush()
