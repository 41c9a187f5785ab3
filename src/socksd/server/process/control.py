"""The control channel: a local Unix socket that ``socksd sessions`` asks who is connected.

Where: ``control_socket`` (``--control-socket PATH``); by default ``$RUNTIME_DIRECTORY/socksd.sock``
when systemd gives the service a runtime directory, else none. Never a TCP port. The socket is
created mode 0600 (0660 and group ``control_group`` when that is set): only the server's user
(and that group) can connect. It is created before connections are accepted on it (bind, chmod,
chown, then listen), so nobody connects in between. A socket file left by a server that is gone
(nobody answers) is replaced; one a running server answers on stops start-up with an error. It
is removed at shutdown, unless another server has replaced it meanwhile.

Protocol: one JSON object on one line each way, then the server closes. Requests:
``{"op": "sessions"}`` and ``{"op": "kill", "id": "W-N"}``. Answers: ``{"version": 1, "pid": P,
"workers": N, "sessions": [...], "errors": [...]}`` (the objects of
:meth:`socksd.sessionview.LiveSession.as_dict`; ``errors`` names workers that did not answer) and
``{"version": 1, "killed": true|false}``; any mistake is ``{"version": 1, "error": "..."}``.
Bounded: a request is at most ``MAX_REQUEST`` bytes and must arrive within ``READ_TIMEOUT``
seconds; at most ``MAX_CLIENTS`` control connections are served at once (others are answered
``busy`` and closed).

Threads, not the event loop: a :class:`ControlServer` accepts on its own thread and serves each
connection on a thread of its own, so a slow or hostile local client never stalls a session. The
facts themselves are read on the event loop that owns the sessions (:func:`answer_in_loop`), one
step of the loop for all sessions, nothing added to a session's per-byte path.

With ``--workers N`` the supervisor owns the control socket and its thread. Each worker gets one
end of a socketpair made before it is forked (:class:`WorkerChannels`); the worker answers on its
event loop (:class:`WorkerControl`), the supervisor sends a request to every worker at once and
merges the answers (a worker that does not answer within ``WORKER_TIMEOUT`` is named in
``errors``). A session id ``W-N`` names its worker, so a kill goes to that worker only.

Fork safety: the supervisor forks the first workers before its control thread starts. A worker
restarted later is forked while that thread runs; the child only detaches and closes the
descriptors of the control socket and of the other channels (:meth:`WorkerChannels.forget`,
:meth:`ControlSocket.forget`: no lock is taken, since the thread that may hold one does not exist
in the child), then builds everything else afresh, as a first worker does. The one lock the
child does need is the one inside ``sys.stderr``: Python re-initialises the logging module's
locks at fork but not the stream's, so a fork while a control thread is in the middle of writing
a log line would leave the new worker stuck at its first line. Control threads therefore log
only under ``_FORK_GUARD``, which every fork takes (``os.register_at_fork``). They import nothing
lazily and hold no other lock a worker uses.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import grp
import itertools
import json
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from socksd.config import Config, ConfigError
from socksd.fdlimit import ACCEPT_PAUSE, is_shortage, out_of_files
from socksd.sessionview import SCHEMA_VERSION

if TYPE_CHECKING:
    from socksd.server.process.context import ServerContext

log = logging.getLogger("socksd.control")

SOCKET_NAME = "socksd.sock"
"""The file name in ``$RUNTIME_DIRECTORY`` when ``control_socket`` is not set."""
SYSTEM_SOCKET = Path("/run/socksd") / SOCKET_NAME
"""Where ``socksd sessions`` looks last: systemd's ``RuntimeDirectory=socksd``."""

MAX_REQUEST = 4096
"""Bytes of one request line, newline included."""
MAX_RESPONSE = 256 * 1024 * 1024
"""Bytes of one answer a reader accepts (tens of thousands of sessions fit)."""
READ_TIMEOUT = 5.0
"""Seconds a control client has to send its whole request."""
WRITE_TIMEOUT = 10.0
"""Seconds a control client has to read its answer."""
WORKER_TIMEOUT = 5.0
"""Seconds a worker (or a single-process server's event loop) has to answer."""
MAX_CLIENTS = 8
"""Control connections served at once."""
BACKLOG = 64
"""Control connections waiting to be accepted."""

KILLED = "killed by the admin"
"""The access-log error of a session ended with ``socksd sessions --kill``."""


_FORK_GUARD = threading.Lock()
"""Held by a control thread while it writes a log line, and by every fork (see the module)."""
os.register_at_fork(
    before=_FORK_GUARD.acquire,
    after_in_parent=_FORK_GUARD.release,
    after_in_child=_FORK_GUARD.release,
)


def _log(level: int, message: str, *args: object, exc_info: bool = False) -> None:
    """Log from a control thread: never while a worker is being forked."""
    with _FORK_GUARD:
        log.log(level, message, *args, exc_info=exc_info)


class ControlError(Exception):
    """A control request or answer is wrong, or the control socket cannot be used."""


# -- where -----------------------------------------------------------------------------------


def control_socket_path(config: Config, environ: Mapping[str, str] | None = None) -> Path | None:
    """The control socket of ``config``: ``control_socket``, or in a systemd service with a
    ``RuntimeDirectory`` its ``socksd.sock``; None when off."""
    value = config.control_socket
    if value == "off":
        return None
    if value:
        return Path(value)
    runtime = (os.environ if environ is None else environ).get("RUNTIME_DIRECTORY", "")
    first = runtime.split(":")[0]
    return Path(first) / SOCKET_NAME if first else None


def group_id(name: str) -> int:
    """The gid of a group name or number; ConfigError naming ``control_group`` otherwise."""
    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(
            f"control_group: no group {name!r} on this host; give an existing group name or id"
        ) from None


# -- the socket ------------------------------------------------------------------------------


def _answers(path: Path) -> bool:
    """True when a process accepts connections on the Unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except PermissionError:
            raise ConfigError(
                f"control_socket: {path} is another user's socket (permission denied); remove "
                "it or choose another path"
            ) from None
        except OSError as e:
            return e.errno != errno.ECONNREFUSED
    return True


class ControlSocket:
    """The listening control socket at ``path`` (see the module comment)."""

    def __init__(self, path: Path, group: str | None = None) -> None:
        self.path = path
        self.sock = self._bind(path, group)
        self._inode = os.stat(path).st_ino

    @staticmethod
    def _bind(path: Path, group: str | None) -> socket.socket:
        gid = group_id(group) if group is not None else None
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError(
                    f"control_socket: {path} exists and is not a socket; remove it or choose "
                    "another path"
                )
            if _answers(path):
                raise ConfigError(
                    f"control_socket: a running server answers on {path}; stop it or give this "
                    "one another control_socket"
                )
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            log.warning(
                "control socket %s: replaced the stale socket of a server that is gone", path
            )
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(str(path))
            bound = True
            # Not listening yet, so nobody can connect before the mode and group are right.
            os.chmod(path, 0o600 if gid is None else 0o660)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(BACKLOG)
        except OSError as e:
            sock.close()
            if bound:  # ours, never listened on: gone again
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise ConfigError(
                f"control_socket: cannot create {path}: {e.strerror or e}"
                + ("; create its directory first" if e.errno == errno.ENOENT else "")
            ) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def forget(self) -> None:
        """In a forked worker: close the inherited descriptor; the file stays (no lock taken)."""
        with contextlib.suppress(OSError):
            os.close(self.sock.detach())

    def close(self) -> None:
        """Stop listening and remove the file, unless it is another server's by now."""
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


# -- protocol --------------------------------------------------------------------------------


def encode(message: Mapping[str, Any]) -> bytes:
    """One message: compact JSON and a newline (``sessions`` given as :class:`Fragments` are
    put in as they are, last)."""
    sessions = message.get("sessions")
    if not isinstance(sessions, Fragments):
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"
    rest = json.dumps({k: v for k, v in message.items() if k != "sessions"}, separators=(",", ":"))
    joined = ",".join(sessions)
    return f'{rest[:-1]}{"," if len(rest) > 2 else ""}"sessions":[{joined}]}}\n'.encode()


def error_answer(text: str) -> dict[str, Any]:
    return {"version": SCHEMA_VERSION, "error": text}


def parse_request(line: bytes) -> dict[str, Any]:
    """A request line as a checked dict; ControlError says what is wrong with it."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise ControlError("not a JSON request line") from None
    if not isinstance(request, dict):
        raise ControlError("a request is a JSON object")
    op = request.get("op")
    if op == "sessions":
        return {"op": "sessions"}
    if op == "kill":
        session_id = request.get("id")
        if not isinstance(session_id, str) or not session_id or len(session_id) > 64:
            raise ControlError('kill: give the session\'s "id" (as socksd sessions shows it)')
        return {"op": "kill", "id": session_id}
    raise ControlError(f"unknown op {op!r}; known: sessions, kill")


def read_line(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """One line from a blocking socket, within ``timeout`` seconds in all and ``limit`` bytes
    (newline included); ControlError otherwise."""
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        end = data.find(b"\n")
        if end >= 0:
            return bytes(data[:end])
        if len(data) >= limit:
            raise ControlError(f"a line is at most {limit} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ControlError(f"no complete line within {timeout:g}s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(65536, limit - len(data)))
        except TimeoutError:
            raise ControlError(f"no complete line within {timeout:g}s") from None
        if not chunk:
            raise ControlError("connection closed before a complete line")
        data += chunk


# -- answers from a server process's sessions (on its event loop) ------------------------------


BATCH = 256
"""Sessions looked at in one step of the event loop; it runs its sessions between two batches."""


class Fragments(list[str]):
    """Session objects already encoded as JSON, each on the event loop that owns the session."""


async def session_fragments(ctx: ServerContext) -> Fragments:
    """Every open session of this process as a JSON object, ``BATCH`` at a time, so a server
    with many sessions is never held up for more than one batch by a query."""
    loop = asyncio.get_running_loop()
    sessions = list(ctx.sessions)
    out = Fragments()
    for start in range(0, len(sessions), BATCH):
        if start:
            await asyncio.sleep(0)
        now, loop_now, live = time.time(), loop.time(), ctx.sessions
        out.extend(
            json.dumps(s.snapshot(now, loop_now).as_dict(), separators=(",", ":"))
            for s in sessions[start : start + BATCH]
            if s in live  # (ended during an earlier batch: not listed)
        )
    return out


async def answer(ctx: ServerContext, request: Mapping[str, Any]) -> dict[str, Any]:
    """Answer ``request`` from this process's sessions, on the event loop that owns them."""
    if request["op"] == "kill":
        for session in ctx.sessions:
            if session.id == request["id"]:
                log.info("session %s (%s): %s", session.id, session.record.client, KILLED)
                session.abort(KILLED)
                return {"killed": True}
        return {"killed": False}
    return {"sessions": await session_fragments(ctx)}


def answer_in_loop(
    ctx: ServerContext, loop: asyncio.AbstractEventLoop, request: Mapping[str, Any]
) -> dict[str, Any]:
    """:func:`answer` from another thread: run on ``loop``, waited for ``WORKER_TIMEOUT`` at most."""
    try:
        future = asyncio.run_coroutine_threadsafe(answer(ctx, request), loop)
    except RuntimeError:  # the loop is closed: the server is stopping
        raise ControlError("the server is stopping") from None
    try:
        return future.result(WORKER_TIMEOUT)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise ControlError(f"the server did not answer within {WORKER_TIMEOUT:g}s") from None


# -- the threaded server ---------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], dict[str, Any]]
"""Answers one checked request (without ``version``); raises ControlError for an error answer."""


def _peer(conn: socket.socket) -> str:
    try:
        pid, uid, _ = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except (OSError, AttributeError, struct.error):
        return "a local client"
    return f"uid {uid} (pid {pid})"


class ControlServer:
    """Serves the control socket on threads: one accepts, one per connection (bounded)."""

    def __init__(self, listener: ControlSocket, handle: Handler, workers: int = 1) -> None:
        self.listener = listener
        self.handle = handle
        self.workers = workers
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._accept_loop, name="socksd-control", daemon=True
        )
        self._thread.start()
        log.info("control socket on %s", self.listener.path)

    def _accept_loop(self) -> None:
        """Wait for a client with poll(), then accept. Not a blocking accept(): the kernel takes
        a descriptor for it before it waits, so out of descriptors this thread would hold the
        one libuv frees and takes back to turn connections away (uvloop's listener then spins)."""
        sock = self.listener.sock
        sock.setblocking(False)
        waiter = select.poll()
        waiter.register(sock, select.POLLIN)
        while not self._stop.is_set():
            try:
                waiter.poll()  # no wake-ups while nobody asks; close() shuts it down (POLLHUP)
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if self._stop.is_set() or e.errno == errno.EBADF:
                    return
                if is_shortage(e):
                    with _FORK_GUARD:
                        out_of_files("control socket", e, f"accepting again in {ACCEPT_PAUSE:g}s")
                else:
                    _log(logging.ERROR, "control socket: accept failed: %s", e.strerror or e)
                self._stop.wait(ACCEPT_PAUSE)
                continue
            if not self._slots.acquire(blocking=False):
                with conn:
                    conn.settimeout(0.5)
                    with contextlib.suppress(OSError):
                        busy = f"busy: {MAX_CLIENTS} control connections open; try again"
                        conn.sendall(encode({**error_answer(busy), "busy": True}))
                continue
            threading.Thread(
                target=self._serve, args=(conn,), name="socksd-control-client", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                try:
                    request = parse_request(read_line(conn, MAX_REQUEST, READ_TIMEOUT))
                    reply = {"version": SCHEMA_VERSION, **self.handle(request)}
                    if request["op"] == "kill":
                        _log(
                            logging.INFO,
                            "control: %s asked to kill session %s: %s",
                            _peer(conn),
                            request["id"],
                            "killed" if reply.get("killed") else "no such session",
                        )
                except ControlError as e:
                    reply = error_answer(str(e))
                conn.settimeout(WRITE_TIMEOUT)
                conn.sendall(encode(reply))
        except OSError:
            pass  # the client went away; nothing to tell it
        except Exception:
            _log(logging.ERROR, "control request failed", exc_info=True)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Stop accepting and remove the socket (connections being served finish on their own,
        within their timeouts)."""
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.sock.shutdown(socket.SHUT_RDWR)  # wakes accept() (EINVAL on Linux)
        if self._thread is not None:
            self._thread.join(2.0)
        self.listener.close()


# -- single process --------------------------------------------------------------------------


@dataclass
class LocalControl:
    """The control channel of a single-process server: the thread asks the event loop."""

    listener: ControlSocket
    server: ControlServer | None = None

    async def start(self, ctx: ServerContext) -> None:
        loop = asyncio.get_running_loop()

        def handle(request: dict[str, Any]) -> dict[str, Any]:
            reply = answer_in_loop(ctx, loop, request)
            if request["op"] == "sessions":
                return {"pid": os.getpid(), "workers": 1, **reply, "errors": []}
            return reply

        self.server = ControlServer(self.listener, handle)
        self.server.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        else:
            self.listener.close()


def local_control(config: Config) -> LocalControl | None:
    """The control channel ``config`` asks for, its socket bound; None when off."""
    path = control_socket_path(config)
    if path is None:
        return None
    return LocalControl(ControlSocket(path, config.control_group))


# -- workers ---------------------------------------------------------------------------------


class _Channel:
    """The supervisor's end of one worker's socketpair; one exchange at a time (``lock``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.pending = bytearray()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes an exchange waiting on it
        with self.lock:
            self.sock.close()

    def receive(self, seq: int, deadline: float) -> dict[str, Any]:
        """The answer with ``seq`` (answers to earlier, timed-out requests are skipped)."""
        while True:
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[:end])
                del self.pending[: end + 1]
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict) and message.get("seq") == seq:
                    return message
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ControlError(f"no answer within {WORKER_TIMEOUT:g}s")
            if len(self.pending) > MAX_RESPONSE:
                self.pending.clear()
                raise ControlError("answer too large")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise ControlError(f"no answer within {WORKER_TIMEOUT:g}s") from None
            if not chunk:
                raise ControlError("its channel is closed (exiting or restarting)")
            self.pending += chunk


class WorkerChannels:
    """The supervisor's side: one socketpair per worker, requests fanned out, answers merged."""

    def __init__(self) -> None:
        self._channels: dict[int, _Channel] = {}
        self._lock = threading.Lock()
        self._seq = itertools.count(1)

    def open(self, index: int) -> socket.socket:
        """A new channel for worker ``index`` (to fork now); returns the worker's end."""
        parent, child = socket.socketpair()
        with self._lock:
            old = self._channels.get(index)
            self._channels[index] = _Channel(parent)
        if old is not None:
            old.close()
        return child

    def forget(self) -> None:
        """In a forked worker: close the supervisor's ends (no lock taken, see the module)."""
        for channel in list(self._channels.values()):
            with contextlib.suppress(OSError):
                os.close(channel.sock.detach())
        self._channels = {}

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control server's handler: ask the workers concerned and merge their answers."""
        with self._lock:
            channels = sorted(self._channels.items())
        if request["op"] == "kill":
            worker = request["id"].partition("-")[0].partition(".")[0]
            channels = [(i, c) for i, c in channels if str(i) == worker]
            if not channels:
                return {"killed": False}
        seq = next(self._seq)
        line = encode({**request, "seq": seq})
        deadline = time.monotonic() + WORKER_TIMEOUT
        errors: list[str] = []
        held: list[tuple[int, _Channel]] = []
        try:
            for index, channel in channels:  # always in index order: no deadlock between clients
                if not channel.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    errors.append(f"worker {index}: busy with another request")
                    continue
                held.append((index, channel))
            asked: list[tuple[int, _Channel]] = []
            for index, channel in held:  # all workers at once: they answer in parallel
                try:
                    channel.sock.settimeout(max(0.001, deadline - time.monotonic()))
                    channel.sock.sendall(line)
                except OSError as e:
                    errors.append(f"worker {index}: {e.strerror or e}")
                    continue
                asked.append((index, channel))
            replies: list[dict[str, Any]] = []
            for index, channel in asked:
                try:
                    reply = channel.receive(seq, deadline)
                except (ControlError, OSError) as e:
                    errors.append(f"worker {index}: {e}")
                    continue
                if "error" in reply:
                    errors.append(f"worker {index}: {reply['error']}")
                else:
                    replies.append(reply)
        finally:
            for _, channel in held:
                channel.lock.release()
        if request["op"] == "kill":
            if errors and not replies:
                raise ControlError("; ".join(errors))
            return {"killed": any(r.get("killed") for r in replies)}
        sessions: list[Any] = []
        for reply in replies:
            sessions.extend(reply.get("sessions", []))
        return {
            "pid": os.getpid(),
            "workers": len(channels),
            "sessions": sessions,
            "errors": errors,
        }


class _WorkerEndpoint(asyncio.Protocol):
    """A worker's end of its channel: each request line is answered on the event loop."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[dict[str, Any]]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            self._answer(line)
        if len(self.buffer) > MAX_REQUEST:
            self.buffer.clear()  # the supervisor never sends this; drop rather than grow

    def _answer(self, line: bytes) -> None:
        try:
            raw = json.loads(line)
            seq = raw.get("seq") if isinstance(raw, dict) else None
            request = parse_request(line)
        except (ControlError, ValueError) as e:
            self._write({"error": str(e), "seq": None})
            return
        task = asyncio.get_running_loop().create_task(answer(self.ctx, request))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, seq))

    def _done(self, task: asyncio.Task[dict[str, Any]], seq: object) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("control request failed: %r", error)
            self._write({"error": f"the worker failed to answer: {error!r}", "seq": seq})
            return
        self._write({**task.result(), "seq": seq})

    def _write(self, reply: dict[str, Any]) -> None:
        if self.transport is not None:  # (the supervisor may be gone by now)
            self.transport.write(encode(reply))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # the supervisor is gone; SIGTERM or its death ends this worker


@dataclass
class WorkerControl:
    """A worker's end of its control channel; it also labels the worker's session ids: ``W``,
    or ``W.G`` when the worker was restarted (its G-th start), so an id listed before a restart
    never names a session of the new worker."""

    sock: socket.socket
    index: int
    start_count: int = 1
    transport: asyncio.BaseTransport | None = None

    async def start(self, ctx: ServerContext) -> None:
        ctx.worker = self.index
        label = str(self.index)
        ctx.worker_label = label if self.start_count <= 1 else f"{label}.{self.start_count}"
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.connect_accepted_socket(
            lambda: _WorkerEndpoint(ctx), self.sock
        )

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        else:
            self.sock.close()


ControlPlane = LocalControl | WorkerControl
"""What ``serve`` starts before accepting and closes after draining."""


# -- the client ------------------------------------------------------------------------------


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """Connect, waiting (until ``deadline``) while the server's backlog is full (EAGAIN)."""
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError("the server's backlog stays full") from None
            time.sleep(0.05)


def query(path: Path, request: Mapping[str, Any], timeout: float = 15.0) -> dict[str, Any]:
    """Send one request to the server at ``path`` and return its answer (asking again while it
    is busy, until ``timeout``); ControlError with a one-line reason (what to do) otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        reply = _query_once(path, request, max(0.1, deadline - time.monotonic()))
        if not reply.get("busy") or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if "error" in reply:
        raise ControlError(f"the server says: {reply['error']}")
    return reply


def _query_once(path: Path, request: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            _connect(sock, path, time.monotonic() + timeout)
        except FileNotFoundError:
            raise ControlError(
                f"control_socket: {path} does not exist; is socksd running with this "
                "control_socket?"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"control_socket: nobody answers on {path} (left by a server that is gone?)"
            ) from None
        except PermissionError:
            raise ControlError(
                f"control_socket: permission denied on {path}; run as the server's user or a "
                "member of its control_group"
            ) from None
        except OSError as e:
            raise ControlError(
                f"control_socket: cannot connect to {path}: {e.strerror or e}"
            ) from None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(encode(request))  # a busy server answers without reading: read on
            line = read_line(sock, MAX_RESPONSE, timeout)
        except OSError as e:
            raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"control socket {path}: the answer is not JSON") from None
    if not isinstance(reply, dict):
        raise ControlError(f"control socket {path}: the answer is not a JSON object")
    return reply
