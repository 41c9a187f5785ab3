"""Under systemd, stderr is the journal: lines carry journald's priority prefix and no timestamp
of their own; anywhere else (a file, a terminal) they keep their timestamp."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for


def _start(tmp_path: Path, journal_stream: str) -> tuple[subprocess.Popen[bytes], Path]:
    config = tmp_path / "socksd.toml"
    config.write_text('listen = ["127.0.0.1:0"]\n')
    out = tmp_path / "stderr.txt"
    with out.open("w") as f:
        st = os.fstat(f.fileno())
        value = f"{st.st_dev}:{st.st_ino}" if journal_stream == "this" else journal_stream
        proc = subprocess.Popen(
            [sys.executable, "-m", "socksd", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env={**os.environ, "JOURNAL_STREAM": value},
        )
    assert wait_for(lambda: "listening on" in out.read_text(), 20), out.read_text()
    config.write_text("listen = [\n")  # the next reload fails: an error line
    proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: "reload failed" in out.read_text(), 15)
    proc.terminate()
    assert proc.wait(20) == 0
    return proc, out


def test_journal_lines_have_priority_and_no_timestamp(tmp_path: Path) -> None:
    _, out = _start(tmp_path, "this")
    lines = out.read_text().splitlines()
    assert "<6>socksd.listener: listening on 127.0.0.1:" in "\n".join(lines)
    assert any(line.startswith("<3>socksd: reload failed") for line in lines), lines
    assert all(re.match(r"<[2-7]>socksd", line) for line in lines), lines


@pytest.mark.parametrize("value", ["1:2", "garbage", ""])
def test_other_streams_keep_timestamps(tmp_path: Path, value: str) -> None:
    _, out = _start(tmp_path, value)
    lines = out.read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ socksd", x) for x in lines)
