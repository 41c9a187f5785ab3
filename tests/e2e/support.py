"""Helpers of the end-to-end tests: raw SOCKS5 bytes, loopback targets, a stub DNS server.

Everything here talks to loopback only (127.0.0.1 and ::1). Every wait is bounded by a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import ipaddress
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.helpers import wait_for  # also imported from here by the e2e tests
from tests.servers import ServerProcess, ThreadedTarget

USER = "alice"
PASSWORD = "s3cret-Pass word"
"""The user of the e2e users file (the ``users_file`` fixture) and the password."""

IO_TIMEOUT = 15.0
"""Generous per-operation socket timeout: the machine may be loaded."""

CLOSE_TIMEOUT = 5.0
"""How long a peer may take to close the connection after a failure reply."""


def has_ipv6() -> bool:
    """True when a socket can be bound on ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- wire helpers --------------------------------------------------------------------------------


def addr_bytes(host: str | bytes, port: int) -> bytes:
    """ATYP ADDR PORT for an IPv4/IPv6 literal or a host name (bytes are sent as they are)."""
    if isinstance(host, bytes):
        return b"\x03" + bytes((len(host),)) + host + struct.pack("!H", port)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        return b"\x03" + bytes((len(name),)) + name + struct.pack("!H", port)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return atyp + ip.packed + struct.pack("!H", port)


def request(host: str | bytes, port: int, cmd: int = 1) -> bytes:
    """A SOCKS5 request VER CMD RSV ATYP ADDR PORT."""
    return bytes((5, cmd, 0)) + addr_bytes(host, port)


def userpass(user: bytes | str, password: bytes | str) -> bytes:
    """An RFC 1929 username/password request."""
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return bytes((1, len(u))) + u + bytes((len(p),)) + p


def failure_reply(code: int) -> bytes:
    """The reply socksd sends for a failure: REP=code, BND 0.0.0.0:0."""
    return bytes((5, code, 0, 1)) + bytes(6)


def connect_proxy(server: ServerProcess, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A TCP connection to the socksd server (IPv4 or IPv6 address from its log)."""
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes, or AssertionError when the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {len(buf)} of {n} bytes: {bytes(buf)!r}")
        buf += chunk
    return bytes(buf)


def recv_until_eof(
    sock: socket.socket,
    timeout: float = CLOSE_TIMEOUT,
    limit: int = 1 << 26,
) -> bytes:
    """Everything until the peer closes; AssertionError if it does not within ``timeout``.

    A reset counts as a close (the data read before it is returned).
    """
    deadline = time.monotonic() + timeout
    buf = bytearray()
    while len(buf) <= limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"peer did not close within {timeout}s; got {bytes(buf[:64])!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise AssertionError("peer sent more than the limit without closing")


def assert_closed(sock: socket.socket, timeout: float = CLOSE_TIMEOUT) -> None:
    """The peer closes without sending anything more."""
    rest = recv_until_eof(sock, timeout)
    assert rest == b"", f"unexpected bytes before close: {rest!r}"


def read_reply(sock: socket.socket) -> tuple[bytes, str, int]:
    """Read one SOCKS5 reply; return (its raw bytes, BND host, BND port)."""
    head = recv_exact(sock, 4)
    assert head[0] == 5, f"reply version {head!r}"
    atyp = head[3]
    if atyp == 1:
        body = recv_exact(sock, 6)
        host = str(ipaddress.IPv4Address(body[:4]))
    elif atyp == 4:
        body = recv_exact(sock, 18)
        host = str(ipaddress.IPv6Address(body[:16]))
    elif atyp == 3:
        length = recv_exact(sock, 1)
        body = length + recv_exact(sock, length[0] + 2)
        host = body[1:-2].decode("ascii", "replace")
    else:
        raise AssertionError(f"reply with unknown ATYP: {head!r}")
    port = struct.unpack("!H", body[-2:])[0]
    return head + body, host, port


def handshake(sock: socket.socket, user: str | None = None, password: str | None = None) -> None:
    """Greeting (and username/password when given); asserts the server's answers."""
    if user is None:
        sock.sendall(b"\x05\x01\x00")
        assert recv_exact(sock, 2) == b"\x05\x00"
        return
    sock.sendall(b"\x05\x01\x02")
    assert recv_exact(sock, 2) == b"\x05\x02"
    sock.sendall(userpass(user, password or ""))
    assert recv_exact(sock, 2) == b"\x01\x00"


def socks_request(
    server: ServerProcess,
    host: str | bytes,
    port: int,
    *,
    cmd: int = 1,
    user: str | None = None,
    password: str | None = None,
) -> tuple[socket.socket, bytes, str, int]:
    """Handshake + request; return (socket, raw reply, BND host, BND port). Caller closes."""
    sock = connect_proxy(server)
    try:
        handshake(sock, user, password)
        sock.sendall(request(host, port, cmd))
        raw, bhost, bport = read_reply(sock)
    except BaseException:
        sock.close()
        raise
    return sock, raw, bhost, bport


def socks_open(
    server: ServerProcess,
    host: str | bytes,
    port: int,
    **kw: str | None,
) -> socket.socket:
    """A socket relayed to host:port through ``server``; asserts the reply is success."""
    sock, raw, _, _ = socks_request(server, host, port, **kw)  # type: ignore[arg-type]
    if raw[1] != 0:
        sock.close()
        raise AssertionError(f"CONNECT {host!r}:{port} failed: {raw!r}")
    return sock


def echo_roundtrip(sock: socket.socket, payload: bytes) -> None:
    """Send ``payload`` through an echoing relay and check it comes back unchanged."""
    sock.sendall(payload)
    assert recv_exact(sock, len(payload)) == payload


def access_lines(server: ServerProcess) -> list[str]:
    """The access-log lines of the server's log so far (text format)."""
    return [line for line in server.log().splitlines() if " rep=" in line]


def wait_for_log(server: ServerProcess, needle: str, timeout: float = 10.0) -> str:
    """Wait until ``needle`` appears in the server's log; return the log."""
    wait_for(lambda: needle in server.log(), timeout)
    text = server.log()
    assert needle in text, f"{needle!r} not in the log:\n{text}"
    return text


def rss_kb(pid: int) -> int:
    """VmRSS of process ``pid`` in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc status")


def socksd_cli(
    *args: str,
    stdin: str | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m socksd ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "socksd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def add_user(path: Path, name: str, password: str) -> None:
    """``socksd user add NAME --users PATH --password-stdin`` with the password on stdin."""
    result = socksd_cli(
        "user", "add", name, "--users", str(path), "--password-stdin", stdin=password + "\n"
    )
    assert result.returncode == 0, result.stderr


# -- loopback targets ----------------------------------------------------------------------------


_ThreadedTarget = ThreadedTarget  # the shared base, from tests/servers.py


class SourceServer(_ThreadedTarget):
    """Sends ``data`` to each client, then closes (a download)."""

    def __init__(self, data: bytes, host: str = "127.0.0.1") -> None:
        self.data = data
        self.digest = hashlib.sha256(data).hexdigest()
        self.sent_all = threading.Event()
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.data)
        self.sent_all.set()


class ReverseHalfCloseServer(_ThreadedTarget):
    """Sends a greeting and shuts down its write side, then reads the client until EOF."""

    greeting = b"target says hello and stops talking\n"

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.received_digest: str | None = None
        self.received_bytes = 0
        self.done = threading.Event()
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(self.greeting)
        conn.shutdown(socket.SHUT_WR)
        digest = hashlib.sha256()
        while chunk := conn.recv(65536):
            digest.update(chunk)
            self.received_bytes += len(chunk)
        self.received_digest = digest.hexdigest()
        self.done.set()


class ResettingServer(_ThreadedTarget):
    """Sends a little data, then resets the connection (SO_LINGER 0)."""

    def handle(self, conn: socket.socket) -> None:
        conn.sendall(b"bye")
        time.sleep(0.1)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class SilentServer(_ThreadedTarget):
    """Accepts and holds each connection open, never sending; closes at ``close()``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.release = threading.Event()
        super().__init__(host)

    def handle(self, conn: socket.socket) -> None:
        self.release.wait(60)

    def close(self) -> None:
        self.release.set()
        super().close()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    body = b"hello from the loopback http server\n" * 100

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Http6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


class HttpServer:
    """http.server on loopback in a thread; GET answers ``HttpServer.body``."""

    body = _QuietHandler.body

    def __init__(self, host: str = "127.0.0.1") -> None:
        cls = _Http6Server if ":" in host else http.server.ThreadingHTTPServer
        self.httpd = cls((host, 0), _QuietHandler)
        self.httpd.daemon_threads = True
        self.host = host
        self.port: int = self.httpd.server_address[1]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(2)


@contextlib.contextmanager
def full_backlog_target() -> Iterator[tuple[str, int]]:
    """A 127.0.0.1 port whose accept queue is full: new SYNs are dropped, connects hang."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    addr = listener.getsockname()
    fillers: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(addr)
            fillers.append(s)
        # full once one of them is connected: the queue holds one, the others' SYNs are dropped
        assert wait_for(lambda: any(_connected(s) for s in fillers), 10)
        yield addr
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:  # not (yet) connected
        return False
    return True


def connecting_to(addr: tuple[str, int]) -> int:
    """How many TCP sockets of this host are connecting (SYN sent) to IPv4 ``addr``."""
    packed = socket.inet_aton(addr[0])[::-1].hex().upper()  # /proc/net/tcp: host byte order
    remote = f"{packed}:{addr[1]:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[2] == remote and line.split()[3] == "02")


def probe_hangs(addr: tuple[str, int], timeout: float = 1.5) -> bool:
    """True when a plain connect to ``addr`` does not complete within ``timeout``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(addr)
        except TimeoutError:
            return True
        except OSError:
            return False
        return False


def random_bytes(n: int, seed: int = 1) -> bytes:
    """``n`` pseudo-random bytes, reproducible and fast (no os.urandom for 10 MB)."""
    import random

    return random.Random(seed).randbytes(n)


def clean_env() -> dict[str, str]:
    """The environment without proxy variables (curl and httpx must not pick them up)."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


class UdpEchoServer:
    """A UDP echo server on loopback in a thread; ``received`` counts datagrams, ``sources``
    records who sent them. ``reply_size``, when set, answers with that many bytes instead."""

    def __init__(self, host: str = "127.0.0.1", reply_size: int | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.reply_size = reply_size
        self.received = 0
        self.sources: list[tuple[str, int]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, addr = self.sock.recvfrom(65535)
            except OSError:
                continue
            self.received += 1
            if len(self.sources) < 10000:
                self.sources.append(addr[:2])
            reply = data if self.reply_size is None else b"r" * self.reply_size
            with contextlib.suppress(OSError):
                self.sock.sendto(reply, addr)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def udp_header(host: str, port: int, frag: int = 0) -> bytes:
    """The SOCKS UDP request header RSV RSV FRAG ATYP ADDR PORT."""
    return bytes((0, 0, frag)) + addr_bytes(host, port)


def parse_udp(datagram: bytes) -> tuple[int, str, int, bytes]:
    """(FRAG, source host, source port, DATA) of a datagram from the relay."""
    atyp = datagram[3]
    if atyp == 1:
        host, end = str(ipaddress.IPv4Address(datagram[4:8])), 10
    elif atyp == 4:
        host, end = str(ipaddress.IPv6Address(datagram[4:20])), 22
    else:
        n = datagram[4]
        host, end = datagram[5 : 5 + n].decode(), 7 + n
    port = struct.unpack("!H", datagram[end - 2 : end])[0]
    return datagram[2], host, port, datagram[end:]


def udp_associate_raw(
    server: ServerProcess, declared: tuple[str, int] | None = None, *, family: int = socket.AF_INET
) -> tuple[socket.socket, socket.socket, tuple[str, int], bytes]:
    """Raw UDP ASSOCIATE: (control TCP socket, client UDP socket, relay address, raw reply).

    The UDP socket is bound on the control connection's local address; ``declared`` is sent as
    DST (default: the UDP socket's own address).
    """
    control = connect_proxy(server)
    udp = socket.socket(control.family, socket.SOCK_DGRAM)
    try:
        udp.bind((control.getsockname()[0], 0))
        udp.settimeout(IO_TIMEOUT)
        handshake(control)
        host, port = declared if declared is not None else udp.getsockname()[:2]
        control.sendall(request(host, port, cmd=3))
        raw, bhost, bport = read_reply(control)
    except BaseException:
        control.close()
        udp.close()
        raise
    return control, udp, (bhost, bport), raw
