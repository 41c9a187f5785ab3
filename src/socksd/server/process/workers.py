"""Several worker processes on the same listening ports (``workers`` > 1).

The supervisor binds, for each worker, one SO_REUSEPORT socket per listen address (the kernel
spreads new connections over them), then forks the workers. Each worker runs its own event loop
and its own sessions; ``max_sessions`` is split between them unless ``limits_store`` shares
it (then each worker may hold all of it and the store counts the total; the per-IP and per-user
limits, the failed-login guard and the bandwidth rates are each worker's own unless
``limits_store`` shares them: with ``host`` the supervisor makes the shared table before
forking and clears a dead worker's counts when it reaps it). The supervisor forwards
SIGTERM and SIGINT to the workers, which drain as a single server would, and restarts a worker
that dies unexpectedly (giving up when workers keep dying). On SIGHUP it checks the new config
first (a broken one is logged once and no worker is disturbed), then forwards SIGHUP to every
worker, which reloads itself; workers started later get the new config. On SIGUSR1 it reopens
its own log file and forwards the signal; each worker reopens its own log files. Under systemd
the supervisor is the main process and the only one that notifies it (``notify``).

Forking happens before any event loop exists in the supervisor, so each worker starts
clean; it builds its own resolver, authenticator (with its check threads) and access log. The
control socket (``socksd sessions``) is the supervisor's: it is bound before the first fork, and
its thread starts once the workers are ready; a worker restarted later is forked while that
thread runs, which is safe as ``socksd.server.process.control`` explains (the child only closes
the inherited control descriptors, taking no lock). Each worker answers on one end of a
socketpair made just before it is forked.
The metrics endpoint's thread (``socksd.metrics``) is started before the first fork and written
so that a worker forked beside it (a restart) inherits no lock it holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from socksd.config import Config
from socksd.limitstore import HostStore, LimitStore
from socksd.metrics import MultiprocessExport, worker_metrics
from socksd.protocol import format_hostport
from socksd.server.process import notify, serverlog
from socksd.server.process.control import (
    ControlServer,
    ControlSocket,
    WorkerChannels,
    WorkerControl,
    control_socket_path,
)
from socksd.server.process.listener import bind_for_workers, ready_log
from socksd.server.process.reload import ConfigSource, ReloadError, prepare

log = logging.getLogger("socksd")

READY_TIMEOUT = 30.0
RESTART_WINDOW = 60.0
MAX_RESTARTS = 5


def worker_count(config: Config) -> int:
    """The number of worker processes: ``workers``, with 0 meaning one per usable CPU."""
    return config.workers or usable_cpus()


def sessions_split(config: Config) -> int:
    """The processes of a host ``max_sessions`` is split between: the workers, or 1 when a
    limit store shares a ``max_sessions`` the admin set (the store counts the total; each
    process may hold all of it)."""
    shared = config.limits_store != "local" and config.shared_max_sessions
    return 1 if shared else worker_count(config)


def usable_cpus() -> int:
    """The CPUs this process may use: its CPU affinity (``taskset``, a cpuset), capped by a
    cgroup v2 CPU quota (a container given 1.5 CPUs counts 2); at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    quota = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):  # cgroup v2: the CPU quota of this process's group
                path = Path("/sys/fs/cgroup", line[3:].lstrip("/"), "cpu.max")
                quota = quota_cpus(path.read_text())
    return max(1, min(count, quota or count))


def quota_cpus(cpu_max: str) -> int | None:
    """The CPUs a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD": none) allows, rounded
    up; None without a quota or when the text is not one."""
    fields = cpu_max.split()
    if len(fields) != 2 or not fields[0].isdigit() or not fields[1].isdigit() or fields[1] == "0":
        return None
    return max(1, -(-int(fields[0]) // int(fields[1])))


class Supervisor:
    """Forks and watches the worker processes."""

    def __init__(self, config: Config, source: ConfigSource | None = None) -> None:
        self.config = config
        self.source: ConfigSource = source or (lambda: config)
        self.count = worker_count(config)
        self.worker_config = self.for_worker(config)
        self.sockets = bind_for_workers(config.listen, self.count)
        self.metrics: MultiprocessExport | None = None
        self.control: ControlSocket | None = None
        self.control_server: ControlServer | None = None
        self.channels = WorkerChannels()
        path = control_socket_path(config)
        if path is not None:
            try:
                self.control = ControlSocket(path, config.control_group)
            except BaseException:
                self._close_sockets()
                raise
        self.children: dict[int, int] = {}  # pid -> worker index
        self.starts: dict[int, int] = {}  # worker index -> times started
        self.ready_pipes: set[int] = set()  # read ends: a worker writes one byte once serving
        self.announced = False
        self.stopping = False
        self.restarts: list[float] = []
        self.logging = serverlog.log_settings(config)
        self.status = ""
        self.host_store = HostStore(self.count) if config.limits_store == "host" else None

    def for_worker(self, config: Config) -> Config:
        """``config`` with each worker's share of ``max_sessions`` (all of it with a limit
        store: the store counts the total), and the running listen."""
        # the running workers and store (restart-only), the new max_sessions (a reload may set it)
        running = dataclasses.replace(
            config, workers=self.config.workers, limits_store=self.config.limits_store
        )
        per_worker = -(-config.max_sessions // sessions_split(running))
        return dataclasses.replace(
            config, max_sessions=per_worker, listen=self.config.listen, workers=self.config.workers
        )

    def run(self) -> int:
        """Run until told to stop; return the exit status."""
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_reload)
        previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._on_reopen)
        try:
            if self.config.metrics is not None:  # before the first fork: workers inherit the mode
                self.metrics = MultiprocessExport(self.config.metrics, self.count)
                self.metrics.start()
            for index in range(self.count):
                self._spawn(index)
            self._wait_ready()
            self.announced = True
            if self.control is not None:
                self.control_server = ControlServer(self.control, self.channels.ask)
                self.control_server.start()
            for sock in self.sockets[0]:
                host, port = sock.getsockname()[:2]
                ready_log.info(
                    "listening on %s (%d workers)", format_hostport(host, port), self.count
                )
            addresses = (format_hostport(*s.getsockname()[:2]) for s in self.sockets[0])
            self.status = f"listening on {', '.join(addresses)} ({self.count} workers)"
            notify.ready(self.status)
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._close_sockets()

    def _close_sockets(self) -> None:
        for socks in self.sockets:
            for sock in socks:
                sock.close()
        if self.control_server is not None:
            self.control_server.close()
        if self.control is not None:
            self.control.close()
        self.channels.close()
        if self.metrics is not None:
            self.metrics.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("signal received: stopping %d workers", len(self.children))
            notify.stopping()
        self.stopping = True
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            return
        if self.announced:  # before, systemd still waits for the first READY=1
            notify.reloading()
        try:
            parts, changes = prepare(self.source, self.config)
        except ReloadError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            if self.metrics is not None:
                self.metrics.server.reloaded(False)
            if self.announced:
                notify.ready(self.status + "; the last reload failed, see the log")
            return
        if self.metrics is not None:
            self.metrics.server.reloaded(True)
        parts.close()  # checked only: each worker derives its own parts
        self._apply_logging(parts.config)
        for change in changes:
            log.warning("reload: %s needs a restart; keeping the running value", change)
        self.worker_config = self.for_worker(parts.config)
        log.info("SIGHUP received: reloading %d workers", len(self.children))
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        if self.announced:
            notify.ready(self.status)

    def _apply_logging(self, config: Config) -> None:
        """The supervisor's own logging after a reload that changed it (workers do theirs)."""
        from socksd.server.process.run import setup_logging

        if serverlog.log_settings(config) == self.logging:
            return
        try:
            setup_logging(config)
        except OSError as e:
            log.error("log_file: cannot open %s: %s; logging as before", config.log_file, e)
            return
        self.logging = serverlog.log_settings(config)

    def _on_reopen(self, signum: int, frame: FrameType | None) -> None:
        """SIGUSR1: reopen the supervisor's log file, then have each worker reopen its own."""
        if serverlog.reopen_log_file(self.logging[2]):
            log.info("SIGUSR1 received: reopening the log files of %d workers", len(self.children))
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)

    def _wait_ready(self) -> None:
        """Wait (bounded) until each worker said it accepts and handles signals, so that the
        "listening on" line, which scripts wait for, means the whole server is ready."""
        deadline = time.monotonic() + READY_TIMEOUT
        while self.ready_pipes and time.monotonic() < deadline:
            fds = list(self.ready_pipes)
            readable, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
            for fd in readable:
                os.read(fd, 1)
                os.close(fd)
                self.ready_pipes.discard(fd)
        if self.ready_pipes:
            log.warning("%d workers not ready after %gs", len(self.ready_pipes), READY_TIMEOUT)

    def _spawn(self, index: int) -> None:
        ready_r, ready_w = os.pipe()
        channel = self.channels.open(index) if self.control is not None else None
        self.starts[index] = self.starts.get(index, 0) + 1
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            os.close(ready_r)
            for fd in self.ready_pipes:
                os.close(fd)
            if self.control is not None:
                self.control.forget()
            self.channels.forget()

            def ready() -> None:
                with contextlib.suppress(OSError):  # a restarted worker: nobody listens
                    os.write(ready_w, b"r")
                os.close(ready_w)

            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                for sig in (signal.SIGHUP, signal.SIGUSR1):
                    signal.signal(sig, signal.SIG_IGN)  # until serve() handles it
                for i, socks in enumerate(self.sockets):
                    if i != index:
                        for sock in socks:
                            sock.close()
                source = self.source
                if self.host_store is not None:
                    self.host_store.use_column(index)
                _worker_main(
                    self.worker_config,
                    self.sockets[index],
                    lambda: self.for_worker(source()),
                    ready,
                    None if channel is None else WorkerControl(channel, index, self.starts[index]),
                    store=self.host_store,
                )
                status = 0
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(status)
        os.close(ready_w)
        if channel is not None:
            channel.close()  # the worker's end
        if self.announced:
            os.close(ready_r)  # a restarted worker: nobody waits for it
        else:
            self.ready_pipes.add(ready_r)
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
            if self.metrics is not None:
                self.metrics.worker_exited(pid)
            if self.host_store is not None:
                self.host_store.forget_column(index)  # its sessions are gone
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
            if self.metrics is not None:
                self.metrics.server.worker_restarted()
            self._spawn(index)
        return status


def _worker_main(
    config: Config,
    sockets: list[socket.socket],
    source: ConfigSource,
    ready: Callable[[], None],
    control: WorkerControl | None = None,
    *,
    store: LimitStore | None = None,
) -> None:
    from socksd.server.process.context import ServerContext
    from socksd.server.process.run import loop_factory, serve

    ctx = ServerContext.create(config, store)
    if config.metrics is not None:
        # values in the supervisor's directory: it serves them
        ctx.metrics = worker_metrics(ctx.sessions)
        gc.freeze()  # what metrics imported and built: out of every later collection
    factory = loop_factory(config.loop)
    kwargs: dict[str, Any] = {"loop_factory": factory} if factory else {}
    with asyncio.Runner(**kwargs) as runner:
        runner.run(
            serve(
                config,
                ctx,
                sockets=sockets,
                announce=False,
                source=source,
                on_ready=ready,
                control=control,
            )
        )
