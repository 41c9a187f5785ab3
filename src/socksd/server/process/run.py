"""Running a server process: event loop choice, logging, signals, graceful shutdown.

SIGTERM/SIGINT shut down gracefully; SIGHUP reloads the configuration (``socksd.server.process.reload``).
SIGHUP is ignored from the start of :func:`run` until the handler is in place, so an early one
does not kill the process (its default action).
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
from socksd.config import Config
from socksd.server.process.context import ServerContext
from socksd.server.process.listener import Server
from socksd.server.process.reload import ConfigSource, reload
from socksd.server.process.workers import Supervisor, worker_count

log = logging.getLogger("socksd")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(config: Config) -> None:
    """Server logs go to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
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
) -> None:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads from
    ``source`` (by default the same config: the user file is read again, the access log
    reopened)."""
    ctx = ctx or ServerContext.create(config)
    server = Server(ctx)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Installed before the first "listening on" line, so a signal sent as soon as a script sees
    # that line already means "shut down gracefully" (not asyncio.Runner's KeyboardInterrupt).
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload, ctx, source or (lambda: config))
    await server.start(sockets, announce=announce)
    if on_ready is not None:
        on_ready()  # a worker tells its supervisor: accepting, signal handlers in place
    await stop.wait()
    log.info("signal received: shutting down")
    stop.clear()
    drained = asyncio.ensure_future(server.shutdown())
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait([drained, again], return_when=asyncio.FIRST_COMPLETED)
    if not drained.done():
        log.warning("second signal: closing all sessions now")
        server.abort_all("second signal")
        await drained
    again.cancel()
    ctx.access_log.close()


def _reload(ctx: ServerContext, source: ConfigSource) -> None:
    log.info("SIGHUP received: reloading the configuration")
    old = reload(ctx, source)
    if ctx.metrics is not None:
        ctx.metrics.reloaded(old is not None)
    if old is not None and (old.log_format, old.log_level) != (
        ctx.config.log_format,
        ctx.config.log_level,
    ):
        setup_logging(ctx.config)


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
    setup_logging(config)
    fdlimit.check(config.max_sessions, worker_count(config))
    factory = loop_factory(config.loop)
    tune_gc()
    log.info("socksd starting (%s loop)", "uvloop" if factory else "asyncio")
    if worker_count(config) > 1:
        if ctx is not None:
            ctx.access_log.close()
        return Supervisor(config, source).run()
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
            runner.run(serve(config, ctx, source=source))
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0
