"""Running a server process: event loop choice, logging, signals, graceful shutdown.

SIGTERM/SIGINT shut down gracefully; SIGHUP reloads the configuration (``socksd.server.process.reload``);
SIGUSR1 reopens the log files (``socksd.server.process.serverlog``). SIGHUP and SIGUSR1 are ignored
from the start of :func:`run` until the handlers are in place, so an early one does not kill the
process (their default action). Under systemd the process reports readiness, reloads and
shutdown (``socksd.server.process.notify``).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from socksd import fdlimit
from socksd.accesslog import iso_time
from socksd.config import Config, ConfigError
from socksd.limitstore import READY_TIMEOUT, refresh_shares
from socksd.protocol import format_hostport
from socksd.server.process import notify, serverlog
from socksd.server.process.context import ServerContext
from socksd.server.process.control import ControlPlane, local_control
from socksd.server.process.listener import Server
from socksd.server.process.reload import ConfigSource, reload
from socksd.server.process.workers import Supervisor, sessions_split, worker_count

log = logging.getLogger("socksd")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, as the access log's), level, logger, message, and the
    traceback as ``exception`` when there is one (README: "JSON server log")."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(config: Config) -> None:
    """Server logs go to stderr (``log_file``: a file made stderr), as text or JSON lines; text
    for journald has its priority and no timestamp. OSError when ``log_file`` cannot be opened."""
    serverlog.use_log_file(config.log_file)
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
    elif serverlog.stderr_is_journal():
        handler.setFormatter(serverlog.JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


async def serve(
    config: Config,
    ctx: ServerContext | None = None,
    *,
    sockets: list[socket.socket] | None = None,
    announce: bool = True,
    source: ConfigSource | None = None,
    on_ready: Callable[[], None] | None = None,
    control: ControlPlane | None = None,
) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads from
    ``source`` (by default the same config: the user file is read again, the access log
    reopened); SIGUSR1 reopens the log files. ``announce``: this process is the server (not one
    of several workers), which logs the "listening on" lines and notifies systemd. ``control``
    (``socksd sessions``) answers from before the first accept until the sessions are drained."""
    ctx = ctx or ServerContext.create(config)
    server = Server(ctx)
    loop = asyncio.get_running_loop()
    store = ctx.limits.store
    if store is not None:
        metrics = ctx.metrics
        name = store.name
        store.start(None if metrics is None else lambda up: metrics.limits_store_up(name, up))
        await store.ready(READY_TIMEOUT)  # bounded: a store that is away is warned about
        shares = loop.create_task(refresh_shares(ctx.limits))
    stop = asyncio.Event()
    # Installed before the first "listening on" line, so a signal sent as soon as a script sees
    # that line already means "shut down gracefully" (not asyncio.Runner's KeyboardInterrupt).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, _reload, ctx, source or (lambda: config), server if announce else None
    )
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs, ctx)
    if control is not None:
        await control.start(ctx)
    await server.start(sockets, announce=announce)
    if on_ready is not None:
        on_ready()  # a worker tells its supervisor: accepting, signal handlers in place
    if announce:
        notify.ready(_status(server))
    await stop.wait()
    log.info("signal received: shutting down")
    if announce:
        notify.stopping()
    stop.clear()
    drained = asyncio.ensure_future(server.shutdown())
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait([drained, again], return_when=asyncio.FIRST_COMPLETED)
    if not drained.done():
        log.warning("second signal: closing all sessions now")
        server.abort_all("second signal")
        await drained
    again.cancel()
    if control is not None:
        control.close()
    if store is not None:
        shares.cancel()
        await store.close()
    ctx.refusals.close()  # the summary of refusals not logged yet, if any
    ctx.access_log.close()


def _status(server: Server) -> str:
    """What ``systemctl status`` shows of a running server."""
    return "listening on " + ", ".join(format_hostport(h, p) for h, p in server.addresses)


def _reload(ctx: ServerContext, source: ConfigSource, server: Server | None) -> None:
    """SIGHUP; ``server`` when this process notifies systemd (not a worker), which it does once
    the server is listening (before, systemd is still waiting for the first READY=1)."""
    log.info("SIGHUP received: reloading the configuration")
    notifying = server is not None and bool(server.addresses)
    if notifying:
        notify.reloading()
    old = reload(ctx, source)
    if ctx.metrics is not None:
        ctx.metrics.reloaded(old is not None)
    if old is not None and serverlog.log_settings(old) != serverlog.log_settings(ctx.config):
        try:
            setup_logging(ctx.config)
        except OSError as e:
            log.error("log_file: cannot open %s: %s; logging as before", ctx.config.log_file, e)
    if notifying and server is not None:
        failed = "; the last reload failed, see the log" if old is None else ""
        notify.ready(_status(server) + failed)


def reopen_logs(ctx: ServerContext) -> None:
    """SIGUSR1 (logrotate): open the server log file and the access log file again by name."""
    server_log = serverlog.reopen_log_file(ctx.config.log_file)
    access_log = ctx.access_log.reopen()
    if server_log and access_log:
        log.info("SIGUSR1 received: log files reopened")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for or, with ``auto``, when installed; else the default loop."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def tune_gc() -> None:
    """Fewer, larger garbage collections: sessions allocate many short-lived containers.

    Objects alive at start-up (modules, config) are frozen out of every later collection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def run(
    config: Config, ctx: ServerContext | None = None, source: ConfigSource | None = None
) -> int:
    """Run the server in the foreground with ``config``; return the exit status.

    ``source`` rebuilds the config on SIGHUP (the CLI re-reads the file and applies its flags).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        setup_logging(config)
    except OSError as e:
        raise ConfigError(f"log_file: cannot open {config.log_file}: {e.strerror or e}") from None
    fdlimit.check(config.max_sessions, sessions_split(config))
    factory = loop_factory(config.loop)
    tune_gc()
    log.info("socksd starting (%s loop)", "uvloop" if factory else "asyncio")
    if worker_count(config) > 1:
        if ctx is not None:
            ctx.access_log.close()
        return Supervisor(config, source).run()
    control = local_control(config)  # a running server on its socket stops us here
    endpoint = None
    if config.metrics is not None:
        from socksd.metrics import Endpoint, single_process

        ctx = ctx or ServerContext.create(config)
        ctx.metrics, registry = single_process(ctx.sessions)
        endpoint = Endpoint(config.metrics, registry)
        gc.freeze()  # prometheus_client's modules and objects: out of every later collection
    kwargs: dict[str, Any] = {"loop_factory": factory} if factory else {}
    try:
        with asyncio.Runner(**kwargs) as runner:
            runner.run(serve(config, ctx, source=source, control=control))
    finally:
        if control is not None:
            control.close()  # (again: a no-op after serve's close)
        if endpoint is not None:
            endpoint.close()
    return 0
