"""The JSON logs' schema as the README documents it: real sessions' access-log lines (CONNECT
ok, refused, denied by a rule, a UDP association, a connection closed before its greeting) and
the server's own lines have exactly the documented keys, of the documented types, present when
the README says; every nullable key is seen both null and set."""

from __future__ import annotations

import json
import re
import socket
import struct
from pathlib import Path

import pytest

import socksd.client
from tests.e2e.service_support import echo_session, launch, line_count
from tests.e2e.support import PASSWORD, USER, UdpEchoServer
from tests.helpers import refused_port, wait_for
from tests.servers import EchoServer, ServerProcess

README = Path(__file__).resolve().parents[2] / "README.md"
TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "object": dict,
}


def documented(marker: str) -> dict[str, tuple[str, bool, str]]:
    """key -> (type, nullable, when present) from the README table after ``<!-- marker``."""
    text = README.read_text()
    table = text.split(f"<!-- {marker}", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    out = {}
    for row in rows:
        key, kind, present = (cell.strip() for cell in row.strip("|").split("|")[:3])
        nullable = kind.endswith(" or null")
        out[key.strip("`")] = (kind.removesuffix(" or null"), nullable, present)
    assert out, f"no table after {marker}"
    return out


def check_line(line: dict[str, object], schema: dict[str, tuple[str, bool, str]]) -> None:
    always = {key for key, (_, _, present) in schema.items() if present == "always"}
    assert always <= set(line), (always - set(line), line)
    assert set(line) <= set(schema), (set(line) - set(schema), line)
    for key, value in line.items():
        kind, nullable, _ = schema[key]
        if value is None:
            assert nullable, (key, line)
        else:
            assert isinstance(value, TYPES[kind]) and not isinstance(value, bool), (key, line)


def test_access_and_server_log_lines_match_the_readme(
    tmp_path: Path, users_file: Path, echo: EchoServer, udp_echo: UdpEchoServer
) -> None:
    denied = refused_port()
    config = tmp_path / "socksd.toml"
    config.write_text(
        f'users = "{users_file}"\nmethods = ["userpass", "none"]\n'
        'protocols = ["socks5", "socks4", "http"]\n'
        f'[[rules]]\naction = "deny"\nto = ["127.0.0.1"]\nports = ["{denied}"]\n'
    )
    access, server_log = tmp_path / "access.log", tmp_path / "socksd.log"
    server = launch(
        tmp_path,
        "--config",
        str(config),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--access-log",
        str(access),
        log_file=server_log,
    )
    try:
        _sessions(server, echo, udp_echo, denied)
        assert wait_for(lambda: line_count(access) == 8, 15), access.read_text()
    finally:
        assert server.stop() == 0

    schema = documented("access-log-schema")
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    for line in lines:
        check_line(line, schema)
        assert ("udp" in line) == (line["command"] == "UDP_ASSOCIATE" and line["reply"] == 0)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))
    protocols = {line["protocol"]: line for line in lines}
    assert set(protocols) == {"socks5", "socks4", "http"}
    assert protocols["socks4"]["userid"] == "schema" and "userid" not in protocols["http"]
    by_command = {line["command"]: line for line in lines}
    assert set(by_command) == {None, "CONNECT", "UDP_ASSOCIATE"}
    udp = by_command["UDP_ASSOCIATE"]["udp"]
    assert set(udp) == {"datagrams_up", "datagrams_down", "dropped"}
    assert udp["datagrams_up"] == udp["datagrams_down"] == 1 and udp["dropped"] == {}
    for key, (_, nullable, _) in schema.items():  # each nullable key seen null and set
        if nullable:
            values = [line[key] for line in lines]
            assert None in values and any(v is not None for v in values), (key, values)

    server_schema = documented("server-log-schema")
    server_lines = [json.loads(line) for line in server_log.read_text().splitlines()]
    assert any("listening on" in str(line["message"]) for line in server_lines)
    for line in server_lines:
        check_line(line, server_schema)
        assert line["level"] in ("debug", "info", "warning", "error", "critical")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["time"]))


def _sessions(server: ServerProcess, echo: EchoServer, udp: UdpEchoServer, denied: int) -> None:
    proxy = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{server.port}"
    with socksd.client.create_connection(proxy, (echo.host, echo.port), timeout=15) as sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
    echo_session(server, echo)  # no authentication: user null
    for port in (refused_port(), denied):  # refused (reply 5), denied by rule 1 (reply 2)
        with pytest.raises(socksd.client.ReplyError):
            socksd.client.create_connection(proxy, ("127.0.0.1", port), timeout=15)
    with socksd.client.create_udp_association(proxy) as assoc:
        assoc.sendto(b"datagram", (udp.host, udp.port))
        assert assoc.recvfrom(timeout=10)[0] == b"datagram"
    for request, answer in (  # SOCKS4 (with a USERID) and HTTP CONNECT
        (struct.pack("!BBH4s", 4, 1, echo.port, socket.inet_aton(echo.host)) + b"schema\0", 8),
        (f"CONNECT {echo.host}:{echo.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 39),
    ):
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
            sock.sendall(request + b"hello")
            received = b""
            while len(received) < answer + 5:
                chunk = sock.recv(100)
                assert chunk, received
                received += chunk
            assert received.endswith(b"hello"), received
    # a connection closed before its greeting: no user, command, target, reply
    socket.create_connection(("127.0.0.1", server.port), timeout=15).close()
