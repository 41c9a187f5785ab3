"""The processes and servers tests start: a ``socksd serve`` process on loopback (its port read
from its "listening on" line: it binds port 0 itself), threaded loopback TCP targets and a stub
DNS server.

Fixtures that start them are in ``conftest.py``; tests import these classes from here.
"""

from __future__ import annotations

import hashlib
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

LISTENING = re.compile(r"listening on ([^\s\"]+)")


@dataclass
class ServerProcess:
    """A ``socksd serve`` process started by a test; ``port``/``host`` from its log line."""

    proc: subprocess.Popen[str]
    host: str
    port: int
    log_path: Path
    addresses: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"socks5://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_server(
    tmp_path: Path,
    *args: str,
    timeout: float = 15.0,
    env: dict[str, str] | None = None,
    launcher: tuple[str, ...] = (),
) -> ServerProcess:
    """Start ``socksd serve ARGS`` (default listen 127.0.0.1:0) and wait for 'listening on'.

    ``launcher`` is a command the server runs under, e.g. ``("prlimit", "--nofile=1024:4096")``.
    """
    argv = [*launcher, sys.executable, "-m", "socksd", "serve", *args]
    if "--listen" not in args and "--config" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    log_path = tmp_path / f"socksd-{time.monotonic_ns()}.log"
    logf = log_path.open("w")
    proc = subprocess.Popen(
        argv, stdout=logf, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = LISTENING.findall(text)
        if found and (text.count("listening on") >= max(1, args.count("--listen"))):
            first = found[0]
            host, _, port = first.rpartition(":")
            return ServerProcess(proc, host.strip("[]"), int(port), log_path, found)
        if proc.poll() is not None:
            raise RuntimeError(f"socksd exited with {proc.returncode}:\n{text}")
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"socksd did not start:\n{log_path.read_text()}")


class ThreadedTarget:
    """A listening socket on loopback (IPv4 or IPv6) with one thread per accepted connection;
    subclasses say what to do with each connection in ``handle``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.peers: list[tuple[str, int]] = []
        self.errors: list[BaseException] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                continue
            self.peers.append(peer[:2])
            threading.Thread(target=self._guarded, args=(conn,), daemon=True).start()

    def _guarded(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            with conn:
                self.handle(conn)
        except OSError as e:
            self.errors.append(e)

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class EchoServer(ThreadedTarget):
    """A threaded TCP echo server on loopback (IPv4 or IPv6); ``mode`` changes what it does.

    modes: ``echo`` (echo until EOF, then close), ``banner`` (send a banner first, then echo),
    ``halfclose`` (read until EOF, then send back the sha of what it read and close).
    """

    def __init__(self, host: str = "127.0.0.1", mode: str = "echo", banner: bytes = b"") -> None:
        self.mode = mode
        self.banner = banner
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        if self.banner:
            conn.sendall(self.banner)
        if self.mode == "halfclose":
            digest = hashlib.sha256()
            while chunk := conn.recv(65536):
                digest.update(chunk)
            conn.sendall(digest.hexdigest().encode())
            return
        while chunk := conn.recv(65536):
            conn.sendall(chunk)


class StubDns:
    """A DNS server on loopback (UDP and TCP on the same port) in a thread, written with
    dnspython; it records every question it gets. It answers NXDOMAIN (with no SOA) to every
    question; subclasses answer otherwise in ``answer``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.udp, self.tcp = _bind_udp_tcp_pair(host)
        self.address: tuple[str, int] = self.udp.getsockname()[:2]
        self.port = self.address[1]
        self.queries: Counter[tuple[str, str, str]] = Counter()  # (name, type, "udp"/"tcp")
        self.questions: list[str] = []  # absolute names as asked ("a.test."), in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def count(self, name: str, qtype: str | None = None, transport: str | None = None) -> int:
        """How many queries for ``name`` (no trailing dot; of ``qtype``, over ``transport``)."""
        return sum(
            n
            for (qname, t, tr), n in self.queries.items()
            if qname == name and qtype in (None, t) and transport in (None, tr)
        )

    def answer(
        self, query: dns.message.QueryMessage, data: bytes, transport: str, peer: object
    ) -> list[bytes]:
        """The messages to send back to ``query`` (``data`` on the wire), in order."""
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.NXDOMAIN)
        return [reply.to_wire()]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.udp.close()
        self.tcp.close()

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.udp, selectors.EVENT_READ)
            sel.register(self.tcp, selectors.EVENT_READ)
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.fileobj is self.udp:
                        data, peer = self.udp.recvfrom(65535)
                        for message in self._handle(data, "udp", peer):
                            self.udp.sendto(message, peer)
                    else:
                        conn, peer = self.tcp.accept()
                        with conn:
                            self._serve_tcp(conn, peer)

    def _serve_tcp(self, conn: socket.socket, peer: object) -> None:
        conn.settimeout(2)
        try:
            (length,) = struct.unpack("!H", _recv_exactly(conn, 2))
            for message in self._handle(_recv_exactly(conn, length), "tcp", peer):
                conn.sendall(struct.pack("!H", len(message)) + message)
        except OSError:
            pass  # the client went away: nothing to answer

    def _handle(self, data: bytes, transport: str, peer: object) -> list[bytes]:
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return []
        if not isinstance(query, dns.message.QueryMessage) or len(query.question) != 1:
            return []
        question = query.question[0]
        name = question.name.to_text()
        self.questions.append(name)
        key = (name.rstrip(".").lower(), dns.rdatatype.to_text(question.rdtype), transport)
        self.queries[key] += 1
        return self.answer(query, data, transport, peer)


def _bind_udp_tcp_pair(host: str) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on the same free port of ``host``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        udp.bind((host, 0))
        tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            tcp.bind(udp.getsockname())
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen()
        return udp, tcp
    raise RuntimeError("no free port pair")


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return data


class RedisServer:
    """A throwaway ``redis-server`` on loopback: no persistence, stopped by its PID.

    :meth:`kill` (SIGKILL) and :meth:`start` again on the same port simulate an outage; the
    restarted server is empty, as a real one without persistence would be."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.tmp_path = tmp_path
        self.args = args
        """More ``redis-server`` arguments (e.g. ``--cluster-enabled yes``)."""
        with socket.socket() as probe:  # redis-server cannot bind port 0: take a free one
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        log = (self.tmp_path / f"redis-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp_path),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL by PID, then reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
