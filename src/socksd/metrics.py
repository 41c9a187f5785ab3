"""Prometheus metrics (``metrics = "HOST:PORT"``): what sessions did, and what the server did.

Two kinds of numbers, kept apart:

- :class:`SessionMetrics`, updated by the sessions of one serving process (the single process,
  or each worker of ``--workers N``): most of it from the finished session's
  :class:`~socksd.accesslog.SessionRecord` in :meth:`SessionMetrics.finished` (command, reply,
  bytes, UDP datagrams and drops), the rest from a few events a record does not keep (the
  handshake, resolve and connect latencies, failed and throttled logins, rule denials, limit
  refusals); every ``PROGRESS_INTERVAL`` the bytes open sessions relayed so far
  (:meth:`SessionMetrics.progress`), so a long session shows as it goes. The session reaches it through ``ServerContext.metrics``, which is None when metrics
  are off: the cost is then one ``is None`` test per hook.
- :class:`ServerMetrics`, kept by whoever runs the server (the single process, or the supervisor of
  the workers): configuration reloads, when the running configuration was loaded, worker restarts.
  Plain integers read at scrape time by a collector, so a signal handler may update them (no lock).

With ``--workers N`` the workers write their values to memory-mapped files in a private directory
the supervisor creates (prometheus-client's multiprocess mode: :func:`enable_multiprocess`) and
removes at exit; the supervisor serves the endpoint, reading every worker's files
(``MultiProcessCollector``) beside its own :class:`ServerMetrics`, so one scrape reports the whole
server. A worker that exits has its gauge files removed (:meth:`MultiprocessExport.worker_exited`);
its counters stay in the totals, as they should.

The endpoint (:class:`Endpoint`) is a small HTTP server on one daemon thread, serving one request
at a time, each bounded by a timeout. In the supervisor it runs while workers are forked (a
restarted worker): it never logs, never writes to stderr and takes no lock a worker uses, and the
child closes the inherited listening socket at once (see docs/design-notes.md). Out of file
descriptors, it stops accepting for ``ACCEPT_PAUSE`` (the scraper's connection waits in the listen
queue) instead of retrying at once: ``socketserver`` would go round its loop at full speed.

Labels are bounded: commands, protocols, reply codes, directions, methods, drop reasons, rule labels of the
configuration and setting names; never a client address or a user name. ``prometheus_client`` is
imported only when metrics are on.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import socket
import socketserver
import tempfile
import threading
import time
import weakref
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING, Any

from socksd import __version__
from socksd.fdlimit import ACCEPT_PAUSE, is_shortage

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from socksd.accesslog import SessionRecord
    from socksd.config import ListenAddress
    from socksd.server.handshake.admission import Refusal
    from socksd.server.handshake.session import Session

log = logging.getLogger("socksd")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Seconds: loopback connects take well under a millisecond, a slow handshake several seconds."""

THROTTLES = ("auth_delay", "auth_block", "max_auth_checks_per_ip")
"""The settings of the login throttle (``socksd_throttled_logins_total``); other limits are
session limits (``socksd_limit_refusals_total``)."""

SESSION_LIMITS = ("max_sessions", "max_sessions_per_ip", "max_sessions_per_user")

PROGRESS_INTERVAL = 5.0
"""Seconds between two counts of the bytes of open sessions."""

SCRAPE_TIMEOUT = 10.0
"""Seconds one scrape connection may take (a client that sends nothing is dropped)."""


def _reply_label(reply: int | None) -> str:
    return "none" if reply is None else f"0x{reply:02x}"


class SessionMetrics:
    """The metrics the sessions of one serving process update.

    ``registry`` None: the metrics are registered nowhere (a worker in multiprocess mode: the
    values go to its files, the supervisor reads them).
    """

    def __init__(
        self,
        registry: CollectorRegistry | None,
        server: ServerMetrics | None,
        sessions: Collection[Session] = (),
    ) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.sessions = sessions
        """The open sessions, whose bytes so far are counted every ``PROGRESS_INTERVAL``."""
        self._progress: asyncio.TimerHandle | None = None
        self.server = server
        """The process's server metrics (reloads) when it runs the server alone; None in a worker."""
        reg: Any = registry
        self.active = Gauge(
            "socksd_sessions_active",
            "Sessions open now (admitted, not yet ended).",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._store_up = Gauge(
            "socksd_limits_store_up",
            "1 while the shared limit store (limits_store) answers, 0 while sessions are "
            "admitted on local limits because it does not; absent with the local store.",
            ("store",),
            registry=reg,
            multiprocess_mode="livemin",
        )
        self._sessions = Counter(
            "socksd_sessions",
            "Sessions ended, by command (none: no request was made) and reply code sent "
            "(none: no reply).",
            ("command", "reply"),
            registry=reg,
        )
        self._protocols = Counter(
            "socksd_sessions_by_protocol",
            "Sessions ended, by the protocol the client spoke (socks5, socks4, http).",
            ("protocol",),
            registry=reg,
        )
        self._bytes = Counter(
            "socksd_relayed_bytes",
            "Bytes relayed, by command and direction (up: client to target), counted every few "
            "seconds while a session runs; for UDP the datagrams' data.",
            ("command", "direction"),
            registry=reg,
        )
        self._handshake = Histogram(
            "socksd_handshake_seconds",
            "From accept to a complete request (greeting, authentication, request).",
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self._resolve = Histogram(
            "socksd_resolve_seconds",
            "Name lookups of requests and UDP datagrams, by result (ok, error).",
            ("result",),
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self._connect = Histogram(
            "socksd_connect_seconds",
            "CONNECT: opening the connection to the target, by result (ok, error).",
            ("result",),
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self._auth_failures = Counter(
            "socksd_auth_failures",
            "Failed logins, by method (userpass, gssapi).",
            ("method",),
            registry=reg,
        )
        self._store_unavailable = Counter(
            "socksd_user_store_unavailable",
            "Logins refused because the user store (PAM, LDAP) could not answer (down, too slow); "
            "not counted as failed logins. By the store's kind (pam, ldap, htpasswd).",
            ("store",),
            registry=reg,
        )
        self._throttled = Counter(
            "socksd_throttled_logins",
            "Logins slowed or refused by the login throttle, by the setting: auth_delay (a "
            "failure answered late), max_auth_checks_per_ip, auth_block (refused, also at accept).",
            ("limit",),
            registry=reg,
        )
        self._refused = Counter(
            "socksd_limit_refusals",
            "Connections or requests refused by a session limit, by the setting "
            "(max_sessions, max_sessions_per_ip, max_sessions_per_user).",
            ("limit",),
            registry=reg,
        )
        self._denials = Counter(
            "socksd_rule_denials",
            "Denials by the access rules, by rule (its number, default, protect_local): at "
            "accept, request, resolved address, BIND peer and UDP datagram.",
            ("rule",),
            registry=reg,
        )
        self._datagrams = Counter(
            "socksd_udp_datagrams",
            "UDP datagrams relayed, by direction (up: client to target), counted when the "
            "association ends.",
            ("direction",),
            registry=reg,
        )
        self._dropped = Counter(
            "socksd_udp_dropped",
            "UDP datagrams dropped, by reason (as in the access log), counted when the "
            "association ends.",
            ("reason",),
            registry=reg,
        )
        self.proxy_header_errors = Counter(
            "socksd_proxy_header_errors",
            "Connections from a load balancer (proxy_protocol_from) closed for a missing, invalid "
            "or incomplete PROXY protocol header.",
            registry=reg,
        )
        # Children by label values: a dict lookup instead of .labels() on the hot path.
        self._children: dict[tuple[object, ...], Any] = {}
        self._ok = {True: "ok", False: "error"}
        # Known label values start at 0: each series exists (and rate() works) from the start.
        for command in ("CONNECT", "BIND", "UDP_ASSOCIATE"):
            for direction in ("up", "down"):
                self._child(self._bytes, command, direction)
        for direction in ("up", "down"):
            self._child(self._datagrams, direction)
        for result in self._ok.values():
            self._child(self._resolve, result)
            self._child(self._connect, result)
        for method in ("userpass", "gssapi"):
            self._child(self._auth_failures, method)
        for limit in THROTTLES:
            self._child(self._throttled, limit)
        for limit in SESSION_LIMITS:
            self._child(self._refused, limit)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    # -- the session's end ------------------------------------------------------------------

    def limits_store_up(self, store: str, up: bool) -> None:
        """The shared limit store (``host``, ``redis``) answers (True) or not."""
        self._store_up.labels(store).set(1 if up else 0)

    def opened(self) -> None:
        """A session was admitted."""
        self.active.inc()
        if self._progress is None:
            self._schedule_progress()

    def finished(self, record: SessionRecord, counted_up: int = 0, counted_down: int = 0) -> None:
        """An admitted session ended: count it from its access-log record (``counted_*``: its
        bytes already counted by :meth:`progress`)."""
        self.active.dec()
        command = record.command or "none"
        self._child(self._sessions, command, _reply_label(record.reply)).inc()
        self._child(self._protocols, record.protocol).inc()
        if record.bytes_up > counted_up:
            self._child(self._bytes, command, "up").inc(record.bytes_up - counted_up)
        if record.bytes_down > counted_down:
            self._child(self._bytes, command, "down").inc(record.bytes_down - counted_down)
        udp = record.udp
        if udp is not None:
            if udp.datagrams_up:
                self._child(self._datagrams, "up").inc(udp.datagrams_up)
            if udp.datagrams_down:
                self._child(self._datagrams, "down").inc(udp.datagrams_down)
            for reason, count in udp.dropped.items():
                if count:
                    self._child(self._dropped, reason).inc(count)

    def progress(self) -> None:
        """Count the bytes open sessions relayed since the last time, so a long session shows in
        the throughput as it goes, not all at its end."""
        for session in self.sessions:
            relay = session.relay
            if relay is None:
                continue
            up, down = relay.up, relay.down
            command = session.record.command or "none"
            if up > session.metered_up:
                self._child(self._bytes, command, "up").inc(up - session.metered_up)
                session.metered_up = up
            if down > session.metered_down:
                self._child(self._bytes, command, "down").inc(down - session.metered_down)
                session.metered_down = down

    def _schedule_progress(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a test): nothing runs long
            return
        self._progress = loop.call_later(PROGRESS_INTERVAL, self._tick)

    def _tick(self) -> None:
        self._progress = None
        self.progress()
        if self.sessions:
            self._schedule_progress()  # else the next opened() starts it again

    # -- events -----------------------------------------------------------------------------

    def handshake_done(self, seconds: float) -> None:
        self._handshake.observe(seconds)

    def resolved(self, seconds: float, ok: bool) -> None:
        self._child(self._resolve, self._ok[ok]).observe(seconds)

    def connected(self, seconds: float, ok: bool) -> None:
        self._child(self._connect, self._ok[ok]).observe(seconds)

    def auth_failed(self, method: str) -> None:
        self._child(self._auth_failures, method).inc()

    def user_store_unavailable(self, store: str) -> None:
        self._child(self._store_unavailable, store).inc()

    def throttled(self, limit: str) -> None:
        self._child(self._throttled, limit).inc()

    def refused(self, limit: str) -> None:
        self._child(self._refused, limit).inc()

    def denied(self, rule: str) -> None:
        self._child(self._denials, rule).inc()

    def refusal(self, refusal: Refusal) -> None:
        """A checkpoint said no: a rule denial, a session limit or the login throttle."""
        if refusal.rule is not None:
            self.denied(refusal.rule)
        elif refusal.limit in THROTTLES:
            self.throttled(refusal.limit)
        elif refusal.limit is not None:
            self.refused(refusal.limit)

    def reloaded(self, ok: bool) -> None:
        """A reload of this process ended; counted only where it runs the server alone."""
        if self.server is not None:
            self.server.reloaded(ok)


class ServerMetrics:
    """What the process running the server counts: reloads, config load time, worker restarts.

    A collector: the numbers are plain attributes, read at scrape time.
    """

    def __init__(self, workers: int = 1) -> None:
        self.reloads = {"ok": 0, "failed": 0}
        self.loaded = time.time()
        self.restarts = 0
        self.workers = workers

    def reloaded(self, ok: bool) -> None:
        self.reloads["ok" if ok else "failed"] += 1
        if ok:
            self.loaded = time.time()

    def worker_restarted(self) -> None:
        self.restarts += 1

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

        reloads = CounterMetricFamily(
            "socksd_config_reloads", "Configuration reloads (SIGHUP), by result.", labels=["result"]
        )
        for result, count in self.reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        yield GaugeMetricFamily(
            "socksd_config_loaded_timestamp_seconds",
            "When the running configuration was loaded (start or last successful reload), "
            "seconds since the epoch.",
            value=self.loaded,
        )
        yield GaugeMetricFamily(
            "socksd_config_age_seconds",
            "Seconds since the running configuration was loaded.",
            value=max(0.0, time.time() - self.loaded),
        )
        yield CounterMetricFamily(
            "socksd_worker_restarts",
            "Workers restarted after dying unexpectedly.",
            value=self.restarts,
        )
        yield GaugeMetricFamily(
            "socksd_workers", "Worker processes configured.", value=self.workers
        )
        info = GaugeMetricFamily("socksd_build_info", "socksd version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info


def _quiet_created_series() -> None:
    """No ``*_created`` samples: one series fewer per counter, the same in both modes."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # type: ignore[no-untyped-call]


def single_process(sessions: Collection[Session]) -> tuple[SessionMetrics, CollectorRegistry]:
    """The metrics of a server running in one process (``sessions``: its open sessions), and
    the registry its endpoint serves."""
    os.environ.pop(MULTIPROC_ENV, None)  # never multiprocess files for a single process
    from prometheus_client import CollectorRegistry, values
    from prometheus_client.process_collector import ProcessCollector

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _quiet_created_series()
    registry = CollectorRegistry(auto_describe=True)
    server = ServerMetrics()
    registry.register(server)
    ProcessCollector(registry=registry)
    return SessionMetrics(registry, server, sessions), registry


def enable_multiprocess() -> str:
    """Multiprocess mode in this process and the processes it forks: a private directory for the
    values (the caller removes it), and prometheus-client's value class switched to it."""
    path = tempfile.mkdtemp(prefix="socksd-metrics-")
    os.environ[MULTIPROC_ENV] = path
    from prometheus_client import values

    # The value class is chosen from the environment when prometheus_client is imported; choose
    # again, so the mode is right even if something imported it earlier.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _quiet_created_series()
    return path


def worker_metrics(sessions: Collection[Session]) -> SessionMetrics:
    """A worker's session metrics (multiprocess mode: the supervisor serves them)."""
    return SessionMetrics(None, None, sessions)


class MultiprocessExport:
    """The supervisor's side of ``--workers N``: its own metrics, the workers' files, the endpoint."""

    def __init__(self, address: ListenAddress, workers: int) -> None:
        self.path = enable_multiprocess()
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        self.server = ServerMetrics(workers)
        self.registry = CollectorRegistry(auto_describe=True)
        MultiProcessCollector(self.registry, path=self.path)  # type: ignore[no-untyped-call]
        self.registry.register(self.server)
        self.address = address
        self.endpoint: Endpoint | None = None

    def start(self) -> None:
        """Serve the endpoint (before the workers are forked: a bind error stops the start)."""
        self.endpoint = Endpoint(self.address, self.registry)

    def worker_exited(self, pid: int) -> None:
        """A worker is gone: drop its live gauges (its counters stay in the totals)."""
        from prometheus_client.multiprocess import mark_process_dead

        mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        shutil.rmtree(self.path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == self.path:
            del os.environ[MULTIPROC_ENV]


class Endpoint:
    """``GET /metrics`` (any path) in the Prometheus text format, on a daemon thread; logs
    ``metrics on http://HOST:PORT/metrics`` once bound (port 0: the port the kernel chose)."""

    def __init__(self, address: ListenAddress, registry: CollectorRegistry) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        from socksd.config import ConfigError
        from socksd.protocol import format_hostport

        class Handler(WSGIRequestHandler):
            timeout = SCRAPE_TIMEOUT

            def log_message(self, format: str, *args: Any) -> None:
                """Nothing: a scrape is not news, and this thread must not log (fork safety)."""

            def get_stderr(self) -> io.StringIO:
                """Not stderr: a failed scrape is answered 500 and written nowhere."""
                return io.StringIO()

        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except OSError as e:
            raise ConfigError(f"metrics: cannot use {address}: {e.strerror or e}") from None

        class Server(WSGIServer):
            address_family = family

            def server_bind(self) -> None:
                """Bind without ``HTTPServer``'s ``getfqdn`` (a reverse DNS lookup)."""
                socketserver.TCPServer.server_bind(self)
                self.server_name = str(self.server_address[0])
                self.server_port = int(self.server_address[1])
                self.setup_environ()

            def handle_error(self, request: Any, client_address: Any) -> None:
                """Nothing: a broken scrape connection is the scraper's business."""

            def get_request(self) -> tuple[socket.socket, Any]:
                """Accept; out of file descriptors, wait ``ACCEPT_PAUSE`` first (not logged)."""
                try:
                    return self.socket.accept()
                except OSError as e:
                    if is_shortage(e):
                        time.sleep(ACCEPT_PAUSE)
                    raise

        try:
            self.httpd = make_server(
                str(sockaddr[0]), address.port, make_wsgi_app(registry), Server, Handler
            )
        except OSError as e:
            raise ConfigError(f"metrics: cannot listen on {address}: {e.strerror or e}") from None
        host, port = self.httpd.socket.getsockname()[:2]
        self.url = f"http://{format_hostport(host, port)}/metrics"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="socksd-metrics", daemon=True
        )
        self.thread.start()
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _close_in_child(ref))
        from socksd.server.process.listener import ready_log

        ready_log.info("metrics on %s", self.url)

    def close(self) -> None:
        """Stop serving (waits for the request in progress, at most its timeout)."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(SCRAPE_TIMEOUT)


def _close_in_child(ref: weakref.ref[Endpoint]) -> None:
    """A forked child (a worker) does not serve the endpoint: close its copy of the socket."""
    endpoint = ref()
    if endpoint is not None:
        endpoint.httpd.socket.close()
