"""Log destinations without a server process: the ``log_file`` setting, the journald and JSON
formats, and the access log's reopen (what SIGUSR1 does)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest

from socksd.accesslog import AccessLog, SessionRecord
from socksd.config import ConfigError, build_config
from socksd.server.process.run import JsonFormatter
from socksd.server.process.serverlog import JournalFormatter, stderr_is_journal


@pytest.mark.parametrize("value", ["", "off", 3, None])
def test_log_file_errors_name_the_key(value: object) -> None:
    if value is None:
        assert build_config({}, {}).log_file == "-"
        return
    with pytest.raises(ConfigError, match=r"^log_file: expected \"-\" \(stderr\) or a file path$"):
        build_config({"log_file": value}, {})


def test_log_file_flag_wins_over_the_file() -> None:
    config = build_config({"log_file": "/a.log"}, {"log_file": "/b.log"})
    assert config.log_file == "/b.log"


def _record(level: int, msg: str, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("socksd", level, __file__, 1, msg, (), exc_info)


@pytest.mark.parametrize(
    ("level", "prefix"),
    [
        (logging.DEBUG, "<7>"),
        (logging.INFO, "<6>"),
        (logging.WARNING, "<4>"),
        (logging.ERROR, "<3>"),
    ],
)
def test_journal_lines_carry_the_priority_and_no_time(level: int, prefix: str) -> None:
    assert JournalFormatter().format(_record(level, "hello %s")) == f"{prefix}socksd: hello %s"


def test_journal_lines_keep_the_traceback() -> None:
    text = JournalFormatter().format(_record(logging.ERROR, "failed", exc=True))
    assert text.startswith("<3>socksd: failed\nTraceback")
    assert text.endswith("ValueError: boom")


def test_json_server_line() -> None:
    line = json.loads(JsonFormatter().format(_record(logging.WARNING, "careful")))
    assert set(line) == {"time", "level", "logger", "message"}
    assert line["level"] == "warning" and line["logger"] == "socksd"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    failed = json.loads(JsonFormatter().format(_record(logging.ERROR, "failed", exc=True)))
    assert "ValueError: boom" in failed["exception"]


def test_stderr_is_journal_compares_device_and_inode(monkeypatch: pytest.MonkeyPatch) -> None:
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert stderr_is_journal()
    for other in (f"{st.st_dev}:{st.st_ino + 1}", "x:y", "12", ""):
        monkeypatch.setenv("JOURNAL_STREAM", other)
        assert not stderr_is_journal()
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not stderr_is_journal()


def _line(log: AccessLog, client: str) -> None:
    log.write(SessionRecord(client=client, started=time.time()))


def test_access_log_reopen_after_rename(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    _line(log, "1.1.1.1:1")
    path.rename(tmp_path / "access.log.1")
    _line(log, "1.1.1.1:2")  # before the reopen: still the old (renamed) file
    assert log.reopen()
    _line(log, "1.1.1.1:3")
    log.close()
    assert (tmp_path / "access.log.1").read_text().count("\n") == 2
    assert "1.1.1.1:3" in path.read_text() and path.read_text().count("\n") == 1
    assert path.stat().st_mode & 0o777 == 0o640


def test_access_log_reopen_failure_keeps_the_old_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    log = AccessLog(str(logs / "access.log"))
    logs.rename(tmp_path / "moved")
    assert not log.reopen()
    assert "cannot reopen" in caplog.text
    _line(log, "1.1.1.1:1")
    log.close()
    assert "1.1.1.1:1" in (tmp_path / "moved" / "access.log").read_text()


@pytest.mark.parametrize("destination", ["-", "off"])
def test_reopen_of_a_stream_does_nothing(destination: str) -> None:
    assert AccessLog(destination).reopen()
