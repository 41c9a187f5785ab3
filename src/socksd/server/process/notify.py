"""systemd's readiness protocol (sd_notify): one datagram to ``$NOTIFY_SOCKET`` per state change.

With ``Type=notify`` systemd starts a service, sets ``NOTIFY_SOCKET`` to the path of a Unix
datagram socket (``@name`` for the abstract namespace) and waits for ``READY=1`` before it
considers the service started. socksd sends:

- ``READY=1`` once every listener accepts (single process: after the "listening on" lines; with
  ``--workers N``: from the supervisor, after every worker said it is ready), with ``MAINPID``
  (the supervisor, which systemd already knows as the main process) and a ``STATUS=`` line that
  ``systemctl status`` shows;
- ``RELOADING=1`` with ``MONOTONIC_USEC`` (the CLOCK_MONOTONIC time of the reload, as systemd
  wants) on SIGHUP, then ``READY=1`` when the new configuration is in place or was refused;
- ``STOPPING=1`` when shutdown starts.

Workers never notify: systemd accepts messages from the main process only (``NotifyAccess=main``).

The protocol is one ``sendto`` of ``KEY=VALUE`` lines, so it is done here rather than with a
library: ``systemd-python`` needs libsystemd's headers and a compiler, and the small pure-Python
packages add nothing to these few lines. Without ``NOTIFY_SOCKET`` every call does nothing, and
a failure to send is logged at debug level, never raised: readiness reporting must not stop a
proxy.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("socksd")

SEND_TIMEOUT = 1.0
"""Bound on one send; systemd reads its notification socket at once."""


def _address(value: str) -> str | bytes | None:
    """The socket address of ``$NOTIFY_SOCKET``: a path, or ``\\0name`` for ``@name``."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds: not supported, ignored


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines to systemd; True when sent, False when not under systemd or the
    send failed (logged at debug level)."""
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = _address(value)
    if address is None:
        log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", value)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto("\n".join(lines).encode("utf-8", "replace"), address)
    except OSError as e:
        log.debug("sd_notify to %s failed: %s", value, e)
        return False
    return True


def ready(status: str) -> bool:
    """The server accepts connections (at start, and after a reload)."""
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    """A reload starts; ``ready()`` follows when it is done (or refused)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")


def stopping() -> bool:
    """Shutdown has started."""
    return notify("STOPPING=1", "STATUS=shutting down: draining sessions")
