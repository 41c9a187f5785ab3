"""Several worker processes on the same listening ports (``workers`` > 1).

The supervisor binds, for each worker, one SO_REUSEPORT socket per listen address (the kernel
spreads new connections over them), then forks the workers. Each worker runs its own event loop
and its own sessions; ``max_sessions`` is split between them. The supervisor forwards SIGTERM and
SIGINT to the workers, which drain as a single server would, and restarts a worker that dies
unexpectedly (giving up when workers keep dying).

Forking happens before any event loop or thread exists in the supervisor, so each worker starts
clean; it builds its own resolver, authenticator (with its bcrypt threads) and access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from types import FrameType
from typing import Any

from socksd.config import Config
from socksd.protocol import format_hostport
from socksd.server.listener import bind_for_workers, ready_log

log = logging.getLogger("socksd")

RESTART_WINDOW = 60.0
MAX_RESTARTS = 5


def worker_count(config: Config) -> int:
    """The number of worker processes: ``workers``, with 0 meaning one per CPU."""
    return config.workers or os.cpu_count() or 1


class Supervisor:
    """Forks and watches the worker processes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = worker_count(config)
        per_worker = -(-config.max_sessions // self.count)
        self.worker_config = dataclasses.replace(config, max_sessions=per_worker)
        self.sockets = bind_for_workers(config.listen, self.count)
        self.children: dict[int, int] = {}  # pid -> worker index
        self.stopping = False
        self.restarts: list[float] = []

    def run(self) -> int:
        """Run until told to stop; return the exit status."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(self.count):
                self._spawn(index)
            for sock in self.sockets[0]:
                host, port = sock.getsockname()[:2]
                ready_log.info(
                    "listening on %s (%d workers)", format_hostport(host, port), self.count
                )
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for socks in self.sockets:
                for sock in socks:
                    sock.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("signal received: stopping %d workers", len(self.children))
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                for i, socks in enumerate(self.sockets):
                    if i != index:
                        for sock in socks:
                            sock.close()
                _worker_main(self.worker_config, self.sockets[index])
                status = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = index

    def _watch(self) -> int:
        status = 0
        while self.children:
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                break
            index = self.children.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            if self.stopping:
                status = status or (code if code > 0 else 0)
                continue
            log.error("worker %d (pid %d) exited with %d", index, pid, code)
            now = time.monotonic()
            self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
            if len(self.restarts) > MAX_RESTARTS:
                log.error(
                    "workers keep dying (%d restarts in %gs): stopping",
                    MAX_RESTARTS,
                    RESTART_WINDOW,
                )
                self._on_signal(signal.SIGTERM, None)
                status = 1
                continue
            time.sleep(0.5)
            self._spawn(index)
        return status


def _worker_main(config: Config, sockets: list[socket.socket]) -> None:
    from socksd.server.run import build_context, loop_factory, serve

    ctx = build_context(config)
    factory = loop_factory(config.loop)
    kwargs: dict[str, Any] = {"loop_factory": factory} if factory else {}
    with asyncio.Runner(**kwargs) as runner:
        runner.run(serve(config, ctx, sockets=sockets, announce=False))
