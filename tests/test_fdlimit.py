"""The open-files budget (socksd.fdlimit): raise soft to hard, fit the default, warn if asked for more."""

from __future__ import annotations

import errno
import logging
import resource

import pytest

from socksd import fdlimit
from socksd.config import build_config


class FakeLimits:
    """RLIMIT_NOFILE as getrlimit/setrlimit see it, with setrlimit's rules for an unprivileged user."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft, self.hard = soft, hard

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        soft, hard = limits
        if hard > self.hard or soft > hard:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = soft, hard


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 20000)  # this machine's hard limit, a common soft default
    monkeypatch.setattr(fdlimit.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(fdlimit.resource, "setrlimit", fake.setrlimit)
    return fake


def test_default_fits_the_hard_limit_without_a_warning(
    limits: FakeLimits, caplog: pytest.LogCaptureFixture
) -> None:
    config = build_config({"workers": 1}, {})
    assert config.max_sessions == (20000 - fdlimit.FILE_RESERVE) // 2 == 9968
    with caplog.at_level(logging.INFO, "socksd"):
        fdlimit.check(config.max_sessions, 1)
    assert (limits.soft, limits.hard) == (20000, 20000)  # soft raised to hard
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "max_sessions 9968: what the open-files limit 20000 holds" in caplog.text


def test_default_is_kept_when_the_limit_holds_it(
    limits: FakeLimits, caplog: pytest.LogCaptureFixture
) -> None:
    limits.hard = 1 << 20
    config = build_config({"workers": 1}, {})
    assert config.max_sessions == fdlimit.DEFAULT_MAX_SESSIONS
    with caplog.at_level(logging.INFO, "socksd"):
        fdlimit.check(config.max_sessions, 1)
    assert limits.soft == 1 << 20
    assert "max_sessions" not in caplog.text
    # four workers: each process has its own limit and a quarter of the sessions
    limits.hard = 20000
    assert build_config({"workers": 4}, {}).max_sessions == fdlimit.DEFAULT_MAX_SESSIONS


def test_explicit_max_sessions_above_the_limit_warns(
    limits: FakeLimits, caplog: pytest.LogCaptureFixture
) -> None:
    config = build_config({"workers": 1, "max_sessions": 10000}, {})
    assert config.max_sessions == 10000  # what the admin asked for is kept
    with caplog.at_level(logging.INFO, "socksd"):
        fdlimit.check(config.max_sessions, 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "max_sessions 10000 needs about 20064 open files per process (2 a session) but the limit "
        "is 20000 (ulimit -Hn); raise the limit or lower max_sessions"
    ]


def test_soft_limit_that_cannot_be_raised_is_reported(
    limits: FakeLimits, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(which: int, new: tuple[int, int]) -> None:
        raise OSError("refused")

    monkeypatch.setattr(fdlimit.resource, "setrlimit", refuse)
    with caplog.at_level(logging.WARNING, "socksd"):
        fdlimit.check(9968, 1)
    assert "but the limit is 1024" in caplog.text


# -- out of descriptors ----------------------------------------------------------------------------


def test_is_shortage_sees_through_a_wrapper() -> None:
    emfile = OSError(errno.EMFILE, "Too many open files")
    wrapped = OSError(None, "could not bind to local_addr")  # how uvloop reports it
    wrapped.__cause__ = emfile
    assert fdlimit.is_shortage(emfile)
    assert fdlimit.is_shortage(OSError(errno.ENFILE, "Too many open files in system"))
    assert fdlimit.is_shortage(wrapped)
    assert not fdlimit.is_shortage(OSError(errno.ECONNREFUSED, "Connection refused"))
    assert not fdlimit.is_shortage(ValueError("x"))
    assert not fdlimit.is_shortage(None)


def test_out_of_files_logs_once_a_minute_per_place(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(fdlimit.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(fdlimit, "_shortages", {})
    exc = OSError(errno.EMFILE, "Too many open files")
    with caplog.at_level(logging.WARNING, logger="socksd"):
        for _ in range(500):
            fdlimit.out_of_files("CONNECT", exc, "answered 0x01")
            now[0] += 0.01
        fdlimit.out_of_files("accept", exc, "waiting")  # another place: its own line
        now[0] = 1000.0 + fdlimit.SHORTAGE_LOG_INTERVAL
        fdlimit.out_of_files("CONNECT", exc, "answered 0x01")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("out of file descriptors (Too many open files): CONNECT: answered")
    assert "accept: waiting" in lines[1]
    assert "(499 more in the last 60s)" in lines[2]
    assert "ulimit -n" in lines[0]
