"""The open-files budget of a server process: how many sessions the RLIMIT_NOFILE limit holds.

The budget counts two files a session (``FILES_PER_SESSION``), what CONNECT, the usual command,
holds: the client's socket and the target's. BIND also holds two (the client's and its listening
socket, then the client's and the peer's: the listener is closed once the peer is accepted). A UDP
association holds four (its TCP connection, the client-side UDP socket and one target-side socket
per address family), so many of them need more than the budget. A process also holds files that
are no session's (``FILE_RESERVE``): listeners, log files, the event loop, DNS queries, the thread
pools' keytab and user-file reads.

At start the soft limit is raised to the hard one, as nginx (``worker_rlimit_nofile``) and Go's
runtime do: the soft limit (1024 on many systems) is a compatibility default for programs using
select(), not the administrator's policy; the hard limit is. Then:

- ``max_sessions`` not set: the default, ``DEFAULT_MAX_SESSIONS``, lowered to what the hard
  limit holds (``build_config`` calls :func:`default_max_sessions`; ``check`` says so at info
  level). So a stock machine starts without a warning.
- ``max_sessions`` set above what the limit holds: kept (the admin may mean it), with a warning at
  start saying how many files it needs; sessions past the limit would fail at accept (EMFILE).

With ``workers`` each process has its own limit and its share of ``max_sessions``; with a
``limits_store`` each process may hold all of ``max_sessions`` (the store counts the total), so
each needs the files for all of it (``workers.sessions_split``).

Out of descriptors all the same (``max_sessions`` set above the limit, UDP associations, other
files): whatever cannot get one fails alone and is answered (a SOCKS reply 0x01, an accept put
off) while the rest goes on; :func:`out_of_files` logs it, one line per place a minute at most.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import time

DEFAULT_MAX_SESSIONS = 10000
FILES_PER_SESSION = 2
FILE_RESERVE = 64

ACCEPT_PAUSE = 1.0
"""Seconds an accept loop out of descriptors waits before trying again (asyncio's own delay)."""
SHORTAGE_LOG_INTERVAL = 60.0
"""Seconds between two "out of file descriptors" lines about the same place."""

log = logging.getLogger("socksd")

_SHORTAGE_ERRNOS = (errno.EMFILE, errno.ENFILE)
_shortages: dict[str, tuple[float, int]] = {}
"""Per place: when its line was last logged, and the shortages since."""


def _shortage(exc: BaseException | None) -> OSError | None:
    """The EMFILE/ENFILE error ``exc`` is or was caused by (uvloop wraps it: "could not bind
    to local_addr"), else None."""
    for _ in range(3):
        if isinstance(exc, OSError) and exc.errno in _SHORTAGE_ERRNOS:
            return exc
        if exc is None:
            break
        exc = exc.__cause__
    return None


def is_shortage(exc: BaseException | None) -> bool:
    """``exc`` says no file descriptor is left: the process's limit (EMFILE) or the system's
    (ENFILE)."""
    return _shortage(exc) is not None


def out_of_files(place: str, exc: BaseException, effect: str) -> None:
    """Log that ``place`` got no file descriptor (``exc``) and what follows (``effect``): one
    warning per place per ``SHORTAGE_LOG_INTERVAL``, with how many more happened since."""
    now = time.monotonic()
    last, since = _shortages.get(place, (-SHORTAGE_LOG_INTERVAL, 0))
    if now - last < SHORTAGE_LOG_INTERVAL:
        _shortages[place] = (last, since + 1)
        return
    _shortages[place] = (now, 0)
    soft = _limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    log.warning(
        "out of file descriptors (%s): %s: %s%s; the open-files limit is %s (ulimit -n): "
        "raise it or lower max_sessions",
        getattr(_shortage(exc) or exc, "strerror", None) or exc,
        place,
        effect,
        f" ({since} more in the last {now - last:.0f}s)" if since else "",
        "unlimited" if soft is None else soft,
    )


def _limit(value: int) -> int | None:
    return None if value == resource.RLIM_INFINITY else value


def hard_limit() -> int | None:
    """The hard open-files limit (None: unlimited)."""
    return _limit(resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def raise_soft_limit() -> int | None:
    """Raise the soft open-files limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. hard unlimited: above nr_open
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return _limit(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


def files_needed(max_sessions: int, workers: int) -> int:
    """Open files one of ``workers`` processes needs for its share of ``max_sessions``."""
    return FILES_PER_SESSION * -(-max_sessions // workers) + FILE_RESERVE


def sessions_within(limit: int | None, workers: int) -> int:
    """The most sessions ``workers`` processes hold with ``limit`` open files each (at least 1)."""
    if limit is None:
        return DEFAULT_MAX_SESSIONS
    return max(1, (limit - FILE_RESERVE) // FILES_PER_SESSION) * workers


def default_max_sessions(workers: int) -> int:
    """``max_sessions`` when not set: the default, or less if the hard limit cannot hold it."""
    return min(DEFAULT_MAX_SESSIONS, sessions_within(hard_limit(), workers))


def check(max_sessions: int, workers: int) -> None:
    """At start: raise the soft limit, then log whether ``max_sessions`` fits it."""
    soft = raise_soft_limit()
    needed = files_needed(max_sessions, workers)
    if soft is not None and soft < needed:
        log.warning(
            "max_sessions %d needs about %d open files per process (%d a session) but the limit "
            "is %d (ulimit -Hn); raise the limit or lower max_sessions",
            max_sessions,
            needed,
            FILES_PER_SESSION,
            soft,
        )
    elif max_sessions < DEFAULT_MAX_SESSIONS and max_sessions == sessions_within(soft, workers):
        log.info(
            "max_sessions %d: what the open-files limit %s holds at %d a session "
            "(default %d; raise ulimit -Hn for more)",
            max_sessions,
            soft,
            FILES_PER_SESSION,
            DEFAULT_MAX_SESSIONS,
        )
