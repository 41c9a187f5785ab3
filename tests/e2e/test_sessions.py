"""``socksd sessions`` against a real server, single process and ``--workers 2``: curl
downloading slowly, python-socks connections held open, a UDP association, a client still in its
handshake; the JSON, the table, ``--watch``, ``--kill``; the control socket's mode, a second
server on the same socket, a stale socket, removal at shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from python_socks.sync import Proxy

from tests.e2e.support import (
    PASSWORD,
    USER,
    UdpEchoServer,
    access_lines,
    clean_env,
    connect_proxy,
    read_reply,
    recv_until_eof,
    request,
    socksd_cli,
    udp_associate_raw,
    udp_header,
    wait_for,
    wait_for_log,
)
from tests.servers import EchoServer, ServerProcess, ThreadedTarget


class SlowHttp(ThreadedTarget):
    """Answers any request with a large body sent in small chunks with pauses (a slow download
    that lasts up to ~60 s or until the client goes away)."""

    chunk = b"d" * 8192

    def handle(self, conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        for _ in range(3000):
            conn.sendall(self.chunk)
            time.sleep(0.02)


@pytest.fixture
def slow_http() -> Iterator[SlowHttp]:
    server = SlowHttp()
    yield server
    server.close()


def sessions(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return socksd_cli("sessions", "--control-socket", str(path), *args, timeout=30)


def listing(path: Path) -> dict[str, Any]:
    result = sessions(path, "--json")
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


def by_client(path: Path) -> dict[str, dict[str, Any]]:
    return {s["client"]: s for s in listing(path)["sessions"]}


def client_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def start_curl(server: ServerProcess, url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            "60",
            "--socks5",
            f"{server.host}:{server.port}",
            url,
        ],
        env=clean_env(),
    )


def test_sessions_lists_every_kind_and_kills_one(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    users_file: Path,
    slow_http: SlowHttp,
    echo: EchoServer,
    udp_echo: UdpEchoServer,
) -> None:
    path = tmp_path / "control.sock"
    server = socksd(
        "--users", str(users_file), "--methods", "userpass,none", "--control-socket", str(path)
    )
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert listing(path)["sessions"] == []

    curl = start_curl(server, f"http://127.0.0.1:{slow_http.port}/")
    proxy = Proxy.from_url(f"socks5://{USER}:{quote(PASSWORD)}@{server.host}:{server.port}")
    held = [proxy.connect("127.0.0.1", echo.port, timeout=15) for _ in range(2)]
    control, udp, relay, _ = udp_associate_raw(server)
    shy = connect_proxy(server)  # says nothing: still in its handshake
    try:
        for sock in held:
            sock.sendall(b"ping")
            assert sock.recv(4) == b"ping"
        udp.sendto(udp_header("127.0.0.1", udp_echo.port) + b"dgram", relay)
        udp.recv(100)
        target = f"127.0.0.1:{slow_http.port}"
        assert wait_for(
            lambda: any(s["target"] == target and s["bytes_down"] > 0
                        for s in listing(path)["sessions"]),
            20,
        )  # fmt: skip
        answer = listing(path)
        assert answer["version"] == 1 and answer["workers"] == 1 and answer["errors"] == []
        assert answer["pid"] == server.proc.pid
        found = {s["client"]: s for s in answer["sessions"]}
        assert len(answer["sessions"]) == 5
        for sock in held:
            s = found[client_of(sock)]
            assert (s["user"], s["command"], s["target"], s["state"]) == (
                USER, "CONNECT", f"127.0.0.1:{echo.port}", "relaying",
            )  # fmt: skip
            assert (s["bytes_up"], s["bytes_down"]) == (4, 4)
            assert s["remote"] == f"127.0.0.1:{echo.port}" and s["id"].startswith("0-")
        u = found[client_of(control)]
        assert (u["user"], u["command"], u["state"]) == (None, "UDP_ASSOCIATE", "udp")
        assert u["udp"]["datagrams_up"] == 1 and u["udp"]["datagrams_down"] == 1
        assert (u["bytes_up"], u["bytes_down"]) == (5, 5)
        h = found[client_of(shy)]
        assert (h["state"], h["command"], h["target"], h["bytes_up"]) == (
            "handshake",
            None,
            None,
            0,
        )
        download = next(s for s in answer["sessions"] if s["target"] == target)
        assert download["user"] is None and download["state"] == "relaying"
        assert download["client"].startswith("127.0.0.1:")
        first = download["bytes_down"]
        assert wait_for(  # live counts: they grow while curl downloads
            lambda: by_client(path)[download["client"]]["bytes_down"] > first + 100_000, 20
        )
        assert all(s["age"] >= 0 and s["idle"] is not None for s in answer["sessions"])

        table = sessions(path, "--sort", "client")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:5] == ["ID", "CLIENT", "USER", "COMMAND", "TARGET"]
        assert lines[-1].startswith("5 sessions (1 worker), ")
        for s in answer["sessions"]:
            row = next(line for line in lines if line.startswith(s["id"] + " "))
            assert s["client"] in row and s["state"] in row
        assert sum(f" {USER} " in line and " CONNECT " in line for line in lines) == 2
        assert any(" UDP " in line and " udp " in line for line in lines)

        victim, survivor = held
        victim_id = found[client_of(victim)]["id"]
        killed = sessions(path, "--kill", victim_id)
        assert killed.returncode == 0 and killed.stdout.strip() == f"session {victim_id}: killed"
        assert recv_until_eof(victim) == b""  # the client sees the close
        survivor.sendall(b"still")
        assert survivor.recv(5) == b"still"
        log = wait_for_log(server, 'error="killed by the admin"')
        lines_killed = [line for line in access_lines(server) if "killed by the admin" in line]
        assert len(lines_killed) == 1 and f" {client_of(victim)} user={USER} " in lines_killed[0]
        assert f"asked to kill session {victim_id}: killed" in log
        after = by_client(path)
        assert client_of(victim) not in after and len(after) == 4
        again = sessions(path, "--kill", victim_id)
        assert again.returncode == 1 and "no such session" in again.stdout

        # the UDP association can be killed too: its control connection closes
        udp_id = found[client_of(control)]["id"]
        assert sessions(path, "--kill", udp_id, "--json").stdout.strip() == json.dumps(
            {"id": udp_id, "killed": True}
        )
        assert recv_until_eof(control) == b""

        # a second server on the same control socket is refused; the first keeps it
        second = socksd_cli("serve", "--listen", "127.0.0.1:0", "--control-socket", str(path))
        assert second.returncode == 2
        assert f"a running server answers on {path}" in second.stderr
        assert listing(path)["pid"] == server.proc.pid
    finally:
        curl.kill()
        curl.wait(10)
        for sock in (*held, control, udp, shy):
            sock.close()
    assert server.stop() == 0
    assert not path.exists()  # removed at shutdown


def test_watch_refreshes_and_ends_cleanly(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    path = tmp_path / "control.sock"
    server = socksd("--control-socket", str(path))
    proxy = Proxy.from_url(f"socks5://{server.host}:{server.port}")
    sock = proxy.connect("127.0.0.1", echo.port, timeout=15)
    try:
        counted = sessions(path, "--watch", "0.2", "--count", "3")
        assert counted.returncode == 0, counted.stderr
        assert counted.stdout.count("ID  ") == 3 and counted.stdout.count("1 session (") == 3
        assert counted.stdout.count("every 0.2s (Ctrl-C ends)\n") == 3
        jsonl = sessions(path, "--watch", "0.2", "--count", "2", "--json").stdout.splitlines()
        assert len(jsonl) == 2 and all(len(json.loads(line)["sessions"]) == 1 for line in jsonl)

        watcher = subprocess.Popen(
            [sys.executable, "-m", "socksd", "sessions", "--control-socket", str(path), "--watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watcher.stdout is not None
        title = watcher.stdout.readline()  # the first table is coming: it is running
        assert title.rstrip().endswith(f"{path}  every 2s (Ctrl-C ends)")
        assert watcher.stdout.readline().startswith("ID")
        watcher.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = watcher.communicate(timeout=15)
        assert watcher.returncode == 0 and err == ""
    finally:
        sock.close()


def test_stale_socket_is_replaced(socksd: Callable[..., ServerProcess], tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # what a killed server leaves behind
    server = socksd("--control-socket", str(path))
    assert "replaced the stale socket" in server.log()
    assert listing(path)["pid"] == server.proc.pid


def test_cli_finds_the_socket_in_the_config_and_says_when_there_is_none(
    socksd: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    config = tmp_path / "socksd.toml"
    config.write_text('listen = ["127.0.0.1:0"]\ncontrol_socket = "ctl.sock"\n')
    server = socksd("--config", str(config))
    result = socksd_cli("sessions", "--config", str(config), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == server.proc.pid
    assert (tmp_path / "ctl.sock").exists()  # relative to the config file
    env_free = {k: v for k, v in os.environ.items() if k != "RUNTIME_DIRECTORY"}
    none = subprocess.run(
        [sys.executable, "-m", "socksd", "sessions"],
        capture_output=True, text=True, timeout=30, env=env_free, check=False,
    )  # fmt: skip
    if not Path("/run/socksd/socksd.sock").exists():
        assert none.returncode == 2
        assert none.stderr.startswith("socksd: error: control_socket: no control socket known")
    gone = socksd_cli("sessions", "--control-socket", str(tmp_path / "nothing.sock"))
    assert gone.returncode == 2 and "does not exist; is socksd running" in gone.stderr


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_workers_every_worker_listed_kill_reaches_the_right_one(
    socksd: Callable[..., ServerProcess], tmp_path: Path, echo: EchoServer
) -> None:
    path = tmp_path / "control.sock"
    server = socksd("--workers", "2", "--control-socket", str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    proxy = Proxy.from_url(f"socks5://{server.host}:{server.port}")
    held: dict[str, socket.socket] = {}
    try:

        def both_workers() -> bool:
            sock = proxy.connect("127.0.0.1", echo.port, timeout=15)
            sock.sendall(b"hi")
            sock.recv(2)
            held[client_of(sock)] = sock
            workers = {s["worker"] for s in listing(path)["sessions"]}
            return workers == {0, 1} or len(held) >= 40

        assert wait_for(both_workers, 60, interval=0)
        answer = listing(path)
        assert answer["workers"] == 2 and answer["errors"] == []
        listed = {s["client"]: s for s in answer["sessions"]}
        assert set(listed) == set(held)  # every connection, whichever worker has it
        assert {s["worker"] for s in listed.values()} == {0, 1}
        for s in listed.values():
            assert s["id"].startswith(f"{s['worker']}-")
            assert (s["command"], s["state"], s["bytes_up"], s["bytes_down"]) == (
                "CONNECT", "relaying", 2, 2,
            )  # fmt: skip
        victim = next(c for c, s in listed.items() if s["worker"] == 1)
        killed = sessions(path, "--kill", listed[victim]["id"])
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert recv_until_eof(held.pop(victim)) == b""
        for sock in held.values():  # every other session still relays
            sock.sendall(b"ok")
            assert sock.recv(2) == b"ok"
        assert set(by_client(path)) == set(held)
        wait_for_log(server, 'error="killed by the admin"')

        # a worker restarted while the control thread runs: listed again, ids of its own
        worker1 = _children(server.proc.pid)
        before = {s["client"] for s in listing(path)["sessions"] if s["worker"] == 1}
        victim_pid = max(worker1)  # the second fork
        os.kill(victim_pid, signal.SIGKILL)
        assert wait_for(lambda: len(set(_children(server.proc.pid)) - set(worker1)) == 1, 20)
        for client in before:
            held.pop(client).close()

        def new_worker_listed() -> bool:
            sock = proxy.connect("127.0.0.1", echo.port, timeout=15)
            held[client_of(sock)] = sock
            ids = [s["id"] for s in listing(path)["sessions"]]
            return any(i.startswith("1.2-") for i in ids) or len(held) >= 60

        assert wait_for(new_worker_listed, 60, interval=0)
        answer = listing(path)
        assert answer["errors"] == [] and answer["workers"] == 2
        assert any(s["id"].startswith("1.2-") for s in answer["sessions"])
        assert {s["client"] for s in answer["sessions"]} == set(held)
    finally:
        for sock in held.values():
            sock.close()
    assert server.stop() == 0
    assert not path.exists()


def test_kill_while_the_command_runs(socksd: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """A BIND waiting for its peer is ``connecting``; killed, its client sees the close and the
    port it listened on is closed too."""
    path = tmp_path / "control.sock"
    server = socksd("--control-socket", str(path))
    sock = connect_proxy(server)
    try:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(request("127.0.0.1", 9, cmd=2))
        _, host, port = read_reply(sock)  # the first BIND reply: listening
        (s,) = listing(path)["sessions"]
        assert (s["state"], s["command"], s["target"]) == ("connecting", "BIND", "127.0.0.1:9")
        assert sessions(path, "--kill", s["id"]).returncode == 0
        assert recv_until_eof(sock) == b""
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5).close()
        line = wait_for_log(server, 'error="killed by the admin"')
        assert " BIND 127.0.0.1:9 " in line
        assert listing(path)["sessions"] == []
    finally:
        sock.close()


def _connects_as(uid: int, gid: int, path: Path) -> str:
    """Connect to ``path`` from a forked child running as ``uid``/``gid``: what happened."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no exec (the interpreter may not be reachable for that user)
        outcome = b"error"
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(path))
                sock.sendall(b'{"op": "sessions"}\n')
                outcome = b"answered" if b'"sessions"' in sock.recv(65536) else b"no answer"
        except PermissionError:
            outcome = b"denied"
        finally:
            os.write(write, outcome)
            os._exit(0)
    os.close(write)
    try:
        return os.read(read, 100).decode()
    finally:
        os.close(read)
        os.waitpid(pid, 0)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_only_the_owner_or_the_control_group_may_connect(
    socksd: Callable[..., ServerProcess],
) -> None:
    import grp
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_name
    directory = Path(tempfile.mkdtemp(prefix="socksd-control-"))
    try:
        directory.chmod(0o755)  # anyone may reach the socket file: its own mode decides
        private = directory / "private.sock"
        socksd("--control-socket", str(private))
        assert _connects_as(nobody.pw_uid, nobody.pw_gid, private) == "denied"
        shared = directory / "shared.sock"
        socksd("--control-socket", str(shared), "--control-group", group)
        st = os.stat(shared)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == nobody.pw_gid
        assert _connects_as(nobody.pw_uid, nobody.pw_gid, shared) == "answered"
        assert _connects_as(nobody.pw_uid, 0 if nobody.pw_gid else 1, shared) == "denied"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
