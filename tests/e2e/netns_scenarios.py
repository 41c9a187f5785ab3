"""Run inside a fresh network namespace (``unshare -rn``): clients that are not on loopback.

Every test client is otherwise on 127.0.0.1, which ``protect_local`` exempts. Here the namespace
gets 10.99.0.1 on its own loopback device: a client bound to it is "another machine" to socksd,
and 10.99.0.1 is one of the host's own addresses. Nothing leaves the namespace.

Usage: ``unshare -rn python3 netns_scenarios.py WORKDIR``; prints one JSON object: scenario name ->
list of [request, REP] pairs (REP -1: closed without a reply).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

OTHER = "10.99.0.1"


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _echo(host: str) -> int:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((host, 0))
    server.listen(64)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return int(server.getsockname()[1])


def _start(workdir: Path, name: str, body: str) -> tuple[subprocess.Popen[bytes], int, Path]:
    config = workdir / f"{name}.toml"
    config.write_text(f'listen = ["{OTHER}:0"]\nallow_open = true\n{body}\n')
    log = workdir / f"{name}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "socksd", "serve", "--config", str(config)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.search(r"listening on [\d.]+:(\d+)", log.read_text())
        if found:
            return proc, int(found.group(1)), log
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(log.read_text())


def _request(port: int, source: str, host: str, target_port: int) -> int:
    with socket.socket() as sock:
        sock.settimeout(15)
        sock.bind((source, 0))
        sock.connect((OTHER, port))
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) != b"\x05\x00":
            return -1
        try:
            packed = b"\x01" + socket.inet_aton(host)
        except OSError:
            packed = b"\x03" + bytes((len(host),)) + host.encode()
        sock.sendall(b"\x05\x01\x00" + packed + struct.pack("!H", target_port))
        head = sock.recv(10)
        return head[1] if len(head) >= 2 else -1


def main(workdir: Path) -> None:
    _run("ip", "link", "set", "lo", "up")
    _run("ip", "addr", "add", f"{OTHER}/32", "dev", "lo")
    loop_port = _echo("127.0.0.1")
    own_port = _echo(OTHER)
    requests = [
        ("other", "127.0.0.1", loop_port),
        ("other", OTHER, own_port),
        ("other", "localhost", loop_port),
        ("other", "169.254.169.254", 80),
        ("other", "0.0.0.0", loop_port),
        ("loopback", "127.0.0.1", loop_port),
    ]
    scenarios = {
        "default": "",
        "allow_clients": '[[rules]]\naction = "allow"\nclients = ["10.99.0.0/24"]',
        "allow_listed": f'[[rules]]\naction = "allow"\nto = ["127.0.0.1/32"]\nports = ["{loop_port}"]',
        "allow_name": '[[rules]]\naction = "allow"\nto = ["localhost"]',
        "off": "protect_local = false",
    }
    results: dict[str, list[tuple[str, int]]] = {}
    for name, body in scenarios.items():
        proc, port, log = _start(workdir, name, body)
        try:
            results[name] = [
                (f"{who} {host}", _request(port, OTHER if who == "other" else "127.0.0.1", host, p))
                for who, host, p in requests
            ]
        finally:
            proc.terminate()
            proc.wait(15)
        results[name + ".log"] = [
            (line, 0) for line in log.read_text().splitlines() if "rep=" in line
        ]
    print(json.dumps(results))


if __name__ == "__main__":
    os.environ.pop("http_proxy", None)
    main(Path(sys.argv[1]))
