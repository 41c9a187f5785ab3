"""Log rotation as an admin does it: rename the log files, send SIGUSR1, and every session line
is in exactly one of the two files; the server log moves too. One process and two workers."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.service_support import echo_session, launch, line_count
from tests.helpers import wait_for
from tests.servers import EchoServer


class Traffic:
    """Sessions through the proxy one after another on a thread, counted, until stopped."""

    def __init__(self, run_one: object) -> None:
        self.run_one = run_one
        self.done = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_one()  # type: ignore[operator]
            except Exception as e:
                self.errors.append(e)
                return
            self.done += 1

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors
        return self.done


def _sessions(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
def test_rename_then_sigusr1_moves_both_logs_without_losing_a_line(
    tmp_path: Path, echo: EchoServer, workers: int
) -> None:
    access, server_log = tmp_path / "access.log", tmp_path / "socksd.log"
    server = launch(
        tmp_path,
        "--access-log",
        str(access),
        "--log-format",
        "json",
        "--workers",
        str(workers),
        log_file=server_log,
    )
    try:
        assert access.stat().st_mode & 0o777 == 0o640
        assert server_log.stat().st_mode & 0o777 == 0o640
        traffic = Traffic(lambda: echo_session(server, echo))
        assert wait_for(lambda: line_count(access) >= 20, 30), server.log()

        # what logrotate does: rename, then postrotate kill -USR1 MAINPID
        access.rename(tmp_path / "access.log.1")
        server_log.rename(tmp_path / "socksd.log.1")
        os.kill(server.proc.pid, signal.SIGUSR1)
        reopened = 1 + workers if workers > 1 else 1  # the supervisor's line, then each worker's

        def all_reopened() -> bool:
            return server_log.exists() and server_log.read_text().count("SIGUSR1") >= reopened

        assert wait_for(all_reopened, 15), (tmp_path / "socksd.log.1").read_text()
        assert wait_for(lambda: line_count(access) >= 20, 30)
        # every process writes to the new files now: the old access log stops growing
        old_count = line_count(tmp_path / "access.log.1")
        more = traffic.done + 40
        assert wait_for(lambda: traffic.done >= more, 60)
        sessions = traffic.stop()

        def all_logged() -> bool:
            return line_count(tmp_path / "access.log.1") + line_count(access) >= sessions

        assert wait_for(all_logged, 15)
        assert line_count(tmp_path / "access.log.1") == old_count
        lines = _sessions(tmp_path / "access.log.1") + _sessions(access)
        assert len(lines) == sessions  # none lost, none written twice
        assert len({(s["client"], s["time"]) for s in lines}) == sessions
        assert all(s["command"] == "CONNECT" and s["reply"] == 0 for s in lines)

        old_server_log = (tmp_path / "socksd.log.1").read_text()
        assert "listening on" in old_server_log and "SIGUSR1" not in old_server_log
        assert server_log.stat().st_mode & 0o777 == 0o640
        assert access.stat().st_mode & 0o777 == 0o640
        assert server.stop() == 0
        assert "stopped" in server_log.read_text()  # the shutdown lines go to the new file
    finally:
        server.stop(signal.SIGKILL if not server.alive() else signal.SIGTERM)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_during_start_up_does_not_kill(tmp_path: Path, workers: int) -> None:
    """logrotate may run while socksd starts: SIGUSR1 (whose default action is to terminate) sent
    again and again from the "starting" line on, while the workers start too, kills nothing.
    (The window before the handlers are in place is a few milliseconds: this is a smoke test.)"""
    server_log = tmp_path / "socksd.log"
    argv = [sys.executable, "-m", "socksd", "serve", "--listen", "127.0.0.1:0"]
    argv += ["--log-file", str(server_log), "--workers", str(workers)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: server_log.exists() and "starting" in server_log.read_text(), 20)
        sent = 0
        while proc.poll() is None and "listening on" not in server_log.read_text() and sent < 2000:
            os.kill(proc.pid, signal.SIGUSR1)
            sent += 1
            time.sleep(0.002)
        assert proc.poll() is None, f"killed by SIGUSR1 {sent}: {server_log.read_text()}"
        assert "listening on" in server_log.read_text()
        os.kill(proc.pid, signal.SIGUSR1)
        assert wait_for(lambda: "log files reopened" in server_log.read_text(), 15)
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


def test_reopen_failure_keeps_logging_to_the_old_file(tmp_path: Path, echo: EchoServer) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    access, server_log = logs / "access.log", logs / "socksd.log"
    server = launch(tmp_path, "--access-log", str(access), log_file=server_log)
    try:
        moved = tmp_path / "moved"
        logs.rename(moved)  # the directory is gone: nothing can be reopened
        os.kill(server.proc.pid, signal.SIGUSR1)
        assert wait_for(lambda: "cannot reopen" in (moved / "socksd.log").read_text(), 15)
        echo_session(server, echo)
        assert wait_for(lambda: line_count(moved / "access.log") == 1, 15)
        assert server.alive()
    finally:
        assert server.stop() == 0


def _logrotate() -> str | None:
    return shutil.which("logrotate") or next(
        (p for p in ("/usr/sbin/logrotate",) if os.access(p, os.X_OK)), None
    )


@pytest.mark.skipif(_logrotate() is None, reason="logrotate is not installed")
def test_contrib_logrotate_config_rotates_a_running_server(
    tmp_path: Path, echo: EchoServer
) -> None:
    """contrib/logrotate/socksd run by logrotate itself, with two substitutions: the log
    directory, and the MainPID systemd would give (there is no systemd here)."""
    logs = tmp_path / "log"
    logs.mkdir()
    access, server_log = logs / "access.log", logs / "socksd.log"
    server = launch(tmp_path, "--access-log", str(access), "--workers", "2", log_file=server_log)
    try:
        contrib = Path(__file__).resolve().parents[2] / "contrib/logrotate/socksd"
        lookup = "$(systemctl show --property=MainPID --value socksd.service 2>/dev/null)"
        text = contrib.read_text()
        assert "/var/log/socksd/*.log {" in text and lookup in text
        conf = tmp_path / "logrotate.conf"
        conf.write_text(
            text.replace("/var/log/socksd/", f"{logs}/").replace(lookup, str(server.proc.pid))
        )
        rotate = [_logrotate() or "", "--state", str(tmp_path / "state"), "--force", str(conf)]

        for round_ in (1, 2):
            for _ in range(10):
                echo_session(server, echo)
            assert wait_for(lambda: line_count(access) == 10, 15)
            result = subprocess.run(rotate, capture_output=True, text=True, timeout=60, check=False)
            assert result.returncode == 0, result.stderr
            # socksd (supervisor and both workers) opened the files again: it made them anew,
            # and its SIGUSR1 lines are the first of the new server log
            assert wait_for(lambda: server_log.exists() and line_count(server_log) >= 3, 15)
            assert server_log.read_text().count("SIGUSR1") == 3
            assert access.exists() and line_count(access) == 0
            assert line_count(logs / "access.log.1") == 10  # delaycompress: newest kept plain
            if round_ == 2:
                with gzip.open(logs / "access.log.2.gz", "rt") as f:
                    assert len(f.read().splitlines()) == 10
        echo_session(server, echo)
        assert wait_for(lambda: line_count(access) == 1, 15)
        assert line_count(logs / "access.log.1") == 10
        assert access.stat().st_mode & 0o777 == 0o640
    finally:
        assert server.stop() == 0


def test_reload_moves_the_server_log_of_every_process(tmp_path: Path) -> None:
    """``log_file`` changed in the config: after SIGHUP the supervisor and both workers write to
    the new file (their SIGUSR1 lines, sent after the reload, are all there)."""
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    config = tmp_path / "socksd.toml"
    config.write_text(f'listen = ["127.0.0.1:0"]\nworkers = 2\nlog_file = "{first}"\n')
    server = launch(tmp_path, "--config", str(config), log_file=first, flag=False)
    try:
        config.write_text(f'listen = ["127.0.0.1:0"]\nworkers = 2\nlog_file = "{second}"\n')
        os.kill(server.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: first.read_text().count("reloaded configuration") == 2, 15)
        assert wait_for(second.exists, 15)
        os.kill(server.proc.pid, signal.SIGUSR1)
        assert wait_for(lambda: second.read_text().count("SIGUSR1") == 3, 15), second.read_text()
        assert "SIGUSR1" not in first.read_text()
    finally:
        assert server.stop() == 0
    assert "stopped" in second.read_text() and "stopped" not in first.read_text()


def test_a_start_up_error_reaches_the_console_and_the_log_file(tmp_path: Path) -> None:
    """The port is taken: the one error line is on the console, where the admin looks, and in
    the log file, where a supervisor's admin looks."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server_log = tmp_path / "socksd.log"
        argv = [sys.executable, "-m", "socksd", "serve", "--listen", f"127.0.0.1:{port}"]
        result = subprocess.run(
            [*argv, "--log-file", str(server_log)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 2
    message = f"listen: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert result.stderr.startswith(f"socksd: error: {message}")
    assert result.stderr.count("\n") == 1
    assert f"ERROR socksd: {message}" in server_log.read_text()


def test_a_log_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    """At start and in check-config: one error line; on reload: refused, the old file kept."""
    missing = tmp_path / "no-such-dir" / "socksd.log"
    config = tmp_path / "socksd.toml"
    config.write_text(f'listen = ["127.0.0.1:0"]\nlog_file = "{missing}"\n')
    message = f"socksd: error: log_file: cannot open {missing}: No such file or directory\n"
    for argv in (["check-config", str(config)], ["serve", "--config", str(config)]):
        result = subprocess.run(
            [sys.executable, "-m", "socksd", *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert (result.returncode, result.stderr) == (2, message)

    good = tmp_path / "socksd.log"
    config.write_text(f'listen = ["127.0.0.1:0"]\nlog_file = "{good}"\n')
    server = launch(tmp_path, "--config", str(config), log_file=good, flag=False)
    try:
        config.write_text(f'listen = ["127.0.0.1:0"]\nlog_file = "{missing}"\n')
        os.kill(server.proc.pid, signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in good.read_text(), 15)
        assert f"log_file: cannot open {missing}" in good.read_text()
    finally:
        assert server.stop() == 0
    assert "stopped" in good.read_text()
