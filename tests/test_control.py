"""The control channel on a real Unix socket: where it is, how it is created and replaced, and
what it answers to bad input (oversized, garbage, too slow, too many at once)."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from socksd.config import Config, ConfigError, build_config, load_file
from socksd.server.dataplane.idle import ActivityMark, tcp_quiet_for
from socksd.server.process import control
from socksd.server.process.control import (
    ControlError,
    ControlServer,
    ControlSocket,
    WorkerChannels,
    control_socket_path,
    parse_request,
    query,
)
from tests.helpers import wait_for


def raw_exchange(path: Path, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send ``data`` as it is, read the one answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError):
            sock.sendall(data)  # refused unread: the answer is there all the same
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    result: dict[str, Any] = json.loads(answer)
    return result


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    """A control server whose handler records requests and lists one fake session."""
    seen: list[dict[str, Any]] = []

    def handle(request: dict[str, Any]) -> dict[str, Any]:
        seen.append(request)
        if request["op"] == "kill":
            return {"killed": request["id"] == "0-1"}
        return {"pid": 1, "workers": 1, "sessions": [], "errors": []}

    path = tmp_path / "c.sock"
    server = ControlServer(ControlSocket(path), handle)
    server.start()
    yield path, seen
    server.close()


# -- where ---------------------------------------------------------------------------------------


def test_default_is_off_unless_systemd_gives_a_runtime_directory() -> None:
    assert control_socket_path(Config(), {}) is None
    env = {"RUNTIME_DIRECTORY": "/run/socksd:/run/other"}
    assert control_socket_path(Config(), env) == Path("/run/socksd/socksd.sock")
    off = build_config({"control_socket": "off"}, {})
    assert control_socket_path(off, env) is None
    given = build_config({}, {"control_socket": "/tmp/x.sock"})
    assert control_socket_path(given, env) == Path("/tmp/x.sock")


def test_config_keys(tmp_path: Path) -> None:
    file = tmp_path / "socksd.toml"
    file.write_text('control_socket = "run/c.sock"\ncontrol_group = 0\n')
    config = build_config(load_file(file), {})
    assert config.control_socket == str(tmp_path / "run/c.sock")  # relative to the file
    assert config.control_group == "0"
    assert build_config({"control_socket": ""}, {}).control_socket == "off"
    with pytest.raises(ConfigError, match=r"^control_socket: expected the path"):
        build_config({"control_socket": 5}, {})
    with pytest.raises(ConfigError, match=r"^control_group: expected a group"):
        build_config({"control_group": ["wheel"]}, {})


def test_unknown_group_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^control_group: no group 'no-such-group-x'"):
        ControlSocket(tmp_path / "c.sock", "no-such-group-x")
    assert not (tmp_path / "c.sock").exists()


# -- the socket file -----------------------------------------------------------------------------


def test_socket_is_0600_and_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    listener = ControlSocket(path)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    listener.close()
    assert not path.exists()


def test_group_socket_is_0660_with_that_group(tmp_path: Path) -> None:
    gid = os.getgid() if os.getgid() != 0 else grp.getgrall()[-1].gr_gid
    path = tmp_path / "c.sock"
    listener = ControlSocket(path, str(gid))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    listener.close()


def test_stale_socket_is_replaced_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: a server that died
    assert path.exists()
    first = ControlSocket(path)
    with pytest.raises(ConfigError, match="a running server answers on"):
        ControlSocket(path)
    assert path.exists()  # the running one keeps its socket
    first.close()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    path.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        ControlSocket(path)
    assert path.read_text() == "precious"


def test_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot create .*; create its directory first"):
        ControlSocket(tmp_path / "no" / "c.sock")


def test_close_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "c.sock"
    old = ControlSocket(path)
    os.unlink(path)  # replaced meanwhile (an admin, another server)
    new = ControlSocket(path)
    old.close()
    assert path.exists()
    new.close()
    assert not path.exists()


# -- requests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"garbage", "not a JSON request line"),
        (b"\xff\xfe", "not a JSON request line"),
        (b"[1, 2]", "a request is a JSON object"),
        (b'{"op": "shutdown"}', "unknown op 'shutdown'"),
        (b"{}", "unknown op None"),
        (b'{"op": "kill"}', 'give the session\'s "id"'),
        (b'{"op": "kill", "id": 17}', 'give the session\'s "id"'),
        (b'{"op": "kill", "id": "' + b"9" * 65 + b'"}', 'give the session\'s "id"'),
    ],
)
def test_bad_requests(line: bytes, error: str) -> None:
    with pytest.raises(ControlError, match=error.replace("(", r"\(")):
        parse_request(line)


def test_good_requests_keep_only_what_they_need() -> None:
    assert parse_request(b'{"op": "sessions", "x": 1}') == {"op": "sessions"}
    assert parse_request(b'{"op": "kill", "id": "1-5"}') == {"op": "kill", "id": "1-5"}


def test_server_answers_and_kills(served: tuple[Path, list[dict[str, Any]]]) -> None:
    path, seen = served
    assert query(path, {"op": "sessions"})["sessions"] == []
    assert query(path, {"op": "kill", "id": "0-1"}) == {"version": 1, "killed": True}
    assert query(path, {"op": "kill", "id": "0-2"})["killed"] is False
    assert [r["op"] for r in seen] == ["sessions", "kill", "kill"]


def test_garbage_gets_an_error_answer(served: tuple[Path, list[dict[str, Any]]]) -> None:
    path, seen = served
    assert raw_exchange(path, b"\x16\x03\x01 hello\n") == {
        "version": 1,
        "error": "not a JSON request line",
    }
    with pytest.raises(ControlError, match="the server says: unknown op 'reboot'"):
        query(path, {"op": "reboot"})
    assert seen == []


def test_oversized_request_is_refused_unread(served: tuple[Path, list[dict[str, Any]]]) -> None:
    path, seen = served
    answer = raw_exchange(path, b'{"op": "sessions", "pad": "' + b"x" * 10_000)
    assert answer["error"] == f"a line is at most {control.MAX_REQUEST} bytes"
    assert seen == []


def test_silent_client_is_answered_after_the_read_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "READ_TIMEOUT", 0.3)
    path = tmp_path / "c.sock"
    server = ControlServer(ControlSocket(path), lambda r: {})
    server.start()
    try:
        answer = raw_exchange(path, b'{"op": "sess')  # never finishes its line
        assert answer["error"] == "no complete line within 0.3s"
    finally:
        server.close()


def test_more_clients_than_the_bound_are_told_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control, "MAX_CLIENTS", 2)
    release = threading.Event()

    def slow(request: dict[str, Any]) -> dict[str, Any]:
        release.wait(10)
        return {"sessions": []}

    path = tmp_path / "c.sock"
    server = ControlServer(ControlSocket(path), slow)
    server.start()
    held = []
    try:
        for _ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(path))
            sock.sendall(b'{"op": "sessions"}\n')
            held.append(sock)
        time.sleep(0.3)  # let both be accepted and held (a wait that only makes the test valid)
        assert raw_exchange(path, b'{"op": "sessions"}\n')["error"].startswith("busy: 2 control")
        release.set()
        for sock in held:
            sock.settimeout(10)
            assert json.loads(sock.recv(65536))["sessions"] == []
        assert query(path, {"op": "sessions"})["sessions"] == []  # the slots came back
    finally:
        release.set()
        for sock in held:
            sock.close()
        server.close()


def test_a_client_that_disconnects_early_does_not_hurt(
    served: tuple[Path, list[dict[str, Any]]],
) -> None:
    path, _ = served
    for _ in range(20):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"op": "ses')
    assert query(path, {"op": "sessions"})["workers"] == 1


def test_client_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="does not exist; is socksd running"):
        query(tmp_path / "none.sock", {"op": "sessions"})
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    with pytest.raises(ControlError, match="nobody answers on"):
        query(tmp_path / "stale.sock", {"op": "sessions"})


# -- workers' channels ---------------------------------------------------------------------------


def _fake_worker(sock: socket.socket, label: str, reply: bool = True) -> threading.Thread:
    """Answers requests on a channel end as a worker would (its sessions: one, ``label-1``)."""

    def run() -> None:
        with sock, sock.makefile("rb") as lines:
            for line in lines:
                request = json.loads(line)
                if not reply:
                    continue
                if request["op"] == "kill":
                    answer = {"killed": request["id"] == f"{label}-1", "seq": request["seq"]}
                else:
                    answer = {"sessions": [{"id": f"{label}-1"}], "seq": request["seq"]}
                sock.sendall(json.dumps(answer).encode() + b"\n")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_channels_merge_every_worker_and_route_kills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "WORKER_TIMEOUT", 0.5)
    channels = WorkerChannels()
    _fake_worker(channels.open(0), "0")
    _fake_worker(channels.open(1), "1")
    _fake_worker(channels.open(2), "2", reply=False)  # hangs
    answer = channels.ask({"op": "sessions"})
    assert [s["id"] for s in answer["sessions"]] == ["0-1", "1-1"]
    assert answer["workers"] == 3
    assert answer["errors"] == ["worker 2: no answer within 0.5s"]
    assert channels.ask({"op": "kill", "id": "1-1"}) == {"killed": True}
    assert channels.ask({"op": "kill", "id": "1-2"}) == {"killed": False}
    assert channels.ask({"op": "kill", "id": "7-1"}) == {"killed": False}
    # a restarted worker 1 gets a new channel; the next answers come from it
    _fake_worker(channels.open(1), "1.2")
    answer = channels.ask({"op": "sessions"})
    assert [s["id"] for s in answer["sessions"]] == ["0-1", "1.2-1"]
    assert channels.ask({"op": "kill", "id": "1.2-1"}) == {"killed": True}
    channels.close()


def test_a_late_answer_is_not_taken_for_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "WORKER_TIMEOUT", 0.3)
    channels = WorkerChannels()
    end = channels.open(0)
    first = channels.ask({"op": "sessions"})  # nobody answers in time
    assert first["errors"] == ["worker 0: no answer within 0.3s"]
    with end, end.makefile("rb") as lines:
        old = json.loads(lines.readline())
        end.sendall(json.dumps({"sessions": [{"id": "stale"}], "seq": old["seq"]}).encode() + b"\n")
        result: dict[str, Any] = {}
        asker = threading.Thread(target=lambda: result.update(channels.ask({"op": "sessions"})))
        asker.start()
        new = json.loads(lines.readline())
        end.sendall(json.dumps({"sessions": [{"id": "0-9"}], "seq": new["seq"]}).encode() + b"\n")
        asker.join(5)
    assert [s["id"] for s in result["sessions"]] == ["0-9"]
    channels.close()


# -- idle time -----------------------------------------------------------------------------------


def test_activity_mark() -> None:
    mark = ActivityMark(0, 100.0)
    assert mark.see(0, 104.0) == 4.0
    assert mark.see(3, 105.0) == 0.0  # moved since the last look
    assert mark.see(3, 112.5) == 7.5


def test_tcp_quiet_for_reads_the_kernel() -> None:
    """Seconds since data last arrived: at least the pause the peer made, then back near 0."""

    async def main() -> tuple[float | None, bool]:
        got = asyncio.Event()
        transports: list[asyncio.BaseTransport] = []

        class Sink(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.append(transport)

            def data_received(self, data: bytes) -> None:
                got.set()

        server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        await got.wait()
        await asyncio.sleep(0.3)
        quiet = tcp_quiet_for(transports[0])
        writer.write(b"y")
        await writer.drain()
        moved = wait_for(lambda: (tcp_quiet_for(transports[0]) or 1.0) < quiet - 0.1, 5)  # type: ignore[operator]
        writer.close()
        server.close()
        return quiet, moved

    quiet, moved = asyncio.run(main())
    assert quiet is not None and quiet >= 0.25
    assert moved
    assert tcp_quiet_for(None) is None


# -- the command line ----------------------------------------------------------------------------


def test_check_config_shows_the_control_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from socksd.cli import main

    file = tmp_path / "socksd.toml"
    file.write_text('control_socket = "c.sock"\ncontrol_group = 0\n')
    assert main(["check-config", str(file)]) == 0
    assert f"control socket: {tmp_path / 'c.sock'} (mode 0660, group 0: gid 0)\n" in (
        capsys.readouterr().out
    )
    file.write_text('control_group = "no-such-group-x"\ncontrol_socket = "c.sock"\n')
    assert main(["check-config", str(file)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("socksd: error: control_group: no group 'no-such-group-x'")


def test_serve_refuses_a_live_control_socket_before_serving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from socksd.cli import main

    path = tmp_path / "c.sock"
    running = ControlSocket(path)
    try:
        args = ["serve", "--listen", "127.0.0.1:0", "--control-socket", str(path)]
        assert main([*args, "--access-log", "off"]) == 2
        assert "control_socket: a running server answers on" in capsys.readouterr().err
        assert path.exists()
    finally:
        running.close()


def test_sessions_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from socksd.cli import main

    file = tmp_path / "socksd.toml"
    file.write_text('control_socket = "off"\n')
    assert main(["sessions", "--config", str(file)]) == 2
    assert "turns the control socket off" in capsys.readouterr().err
    assert main(["sessions", "--control-socket", "x.sock", "--count", "2"]) == 2
    assert "--count: give a number of refreshes" in capsys.readouterr().err
    assert main(["sessions", "--control-socket", "x.sock", "--kill", "0-1", "--watch"]) == 2
    assert "--kill ends one session; leave out --watch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sessions", "--watch", "0.01"])
    assert "must be from 0.2 to 3600 seconds" in capsys.readouterr().err


# -- answers in batches --------------------------------------------------------------------------


def test_encode_puts_encoded_sessions_in_as_they_are() -> None:
    items = control.Fragments(['{"id":"0-1"}', '{"id":"0-2"}'])
    line = control.encode({"version": 1, "workers": 1, "sessions": items, "errors": []})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "version": 1,
        "workers": 1,
        "errors": [],
        "sessions": [{"id": "0-1"}, {"id": "0-2"}],
    }
    assert json.loads(control.encode({"sessions": control.Fragments()})) == {"sessions": []}


class _View:
    def __init__(self, number: int) -> None:
        self.number = number

    def as_dict(self) -> dict[str, Any]:
        return {"id": f"0-{self.number}"}


class _FakeSession:
    """What ``session_fragments`` uses of a session: ``snapshot``."""

    def __init__(self, number: int) -> None:
        self.number = number

    def snapshot(self, now: float, loop_now: float) -> _View:
        return _View(self.number)


def test_sessions_are_looked_at_in_batches_with_the_loop_running_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(control, "BATCH", 2)
    ctx = SimpleNamespace(sessions={_FakeSession(n) for n in range(1, 6)})

    async def main() -> tuple[list[str], str]:
        last = list(ctx.sessions)[-1]  # the order session_fragments takes them in
        # runs between two batches: the session that ends then is not listed
        asyncio.get_running_loop().call_soon(ctx.sessions.discard, last)
        fragments = await control.session_fragments(ctx)  # type: ignore[arg-type]
        return [json.loads(f)["id"] for f in fragments], f"0-{last.number}"

    ids, ended = asyncio.run(main())
    assert len(ids) == 4 and ended not in ids


# -- garbage never crashes -----------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.binary(max_size=300))
def test_any_bytes_are_a_request_or_a_control_error(line: bytes) -> None:
    try:
        request = parse_request(line)
    except ControlError:
        return
    assert request["op"] in ("sessions", "kill")


@given(_json)
def test_any_json_is_a_request_or_a_control_error(value: object) -> None:
    for candidate in (value, {"op": "kill", "id": value}, {"op": value}):
        try:
            request = parse_request(json.dumps(candidate).encode())
        except ControlError:
            continue
        assert request in ({"op": "sessions"}, {"op": "kill", "id": request.get("id")})
        assert request["op"] == "sessions" or isinstance(request["id"], str)
