"""Where the server log goes: stderr (the default, for journald and containers) or ``log_file``.

``log_file = PATH`` makes the file the process's stderr (``dup2`` onto fd 2), so everything a
process writes there, the log lines, the access log when ``access_log = "-"``, and a traceback
Python prints before it dies, lands in the file. Reopening (SIGUSR1, after logrotate moved the
file) opens PATH again and puts it on fd 2 in one ``dup2``: the kernel swaps the file under the
descriptor at once, so a line goes wholly to the old file or wholly to the new one, never lost
and never twice. Each worker process has its own fd 2 and reopens its own (the supervisor
forwards SIGUSR1).

journald: under systemd with ``StandardError=journal`` (the default), systemd sets
``JOURNAL_STREAM`` to the device and inode of the stream; when fd 2 is that stream, text lines
carry no timestamp (the journal has its own) and start with a ``<N>`` syslog priority, which
journald reads as the entry's priority (``journalctl -p warning`` works). JSON lines stay as they
are.
"""

from __future__ import annotations

import logging
import os
import sys

from socksd.accesslog import LOG_FILE_MODE
from socksd.config import Config, ConfigError

log = logging.getLogger("socksd")

_saved_stderr: int | None = None
"""A copy of the stderr the process started with, to go back to when ``log_file`` becomes ``-``."""
_in_file = False
"""True while fd 2 is ``log_file``."""

_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


def log_settings(config: Config) -> tuple[str, str, str]:
    """The settings logging is set up from; a reload that changes them sets it up again."""
    return (config.log_format, config.log_level, config.log_file)


def use_log_file(path: str) -> None:
    """Make ``path`` the process's stderr (``-``: the stderr it started with); OSError when it
    cannot be opened (stderr is then unchanged)."""
    global _saved_stderr, _in_file  # noqa: PLW0603 - one stderr a process
    if path == "-":
        if _saved_stderr is not None:
            os.dup2(_saved_stderr, 2)
        _in_file = False
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
    try:
        if _saved_stderr is None:
            _saved_stderr = os.dup(2)
            os.set_inheritable(_saved_stderr, False)
        os.dup2(fd, 2)
        _in_file = True
    finally:
        os.close(fd)


def check_log_file(path: str) -> None:
    """ConfigError unless ``path`` (``-``: stderr) can be opened for appending (it is created)."""
    if path == "-":
        return
    try:
        os.close(
            os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_FILE_MODE)
        )
    except OSError as e:
        raise ConfigError(f"log_file: cannot open {path}: {e.strerror or e}") from None


def console_error(message: str) -> None:
    """The command's one error line, ``socksd: error: MESSAGE``, on the console it was started
    from; when stderr is ``log_file`` by then (a port that cannot be bound), logged there too."""
    if _in_file:
        log.error("%s", message)
        use_log_file("-")
    print(f"socksd: error: {message}", file=sys.stderr)


def reopen_log_file(path: str) -> bool:
    """Open ``path`` again as stderr (after logrotate renamed it); False, logged, when it cannot
    be opened: logging goes on to the old file."""
    if path == "-":
        return True
    try:
        use_log_file(path)
    except OSError as e:
        log.error("log_file: cannot reopen %s: %s; still writing to the old file", path, e.strerror)
        return False
    return True


def stderr_is_journal() -> bool:
    """True when fd 2 is the journald stream systemd gave the service (``JOURNAL_STREAM``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``: journald's priority prefix, no timestamp (the journal adds it)."""

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelname, 6)
        text = f"<{priority}>{record.name}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text
