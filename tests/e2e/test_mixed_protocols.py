"""SOCKS5, SOCKS4/4a and HTTP CONNECT on one socksd listener (``protocols``): real clients (curl,
python-socks, proxychains4, headless Chromium) and raw probes (every SOCKS4 reply, malformed first
bytes, slow and oversized HTTP heads, other methods, a protocol that is not enabled).

No DNS leaves the machine: names come from the servers' ``hosts`` map, and every other name goes to
a stub DNS server on loopback that answers NXDOMAIN.
"""

from __future__ import annotations

import base64
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.support import (
    IO_TIMEOUT,
    PASSWORD,
    USER,
    HttpServer,
    access_lines,
    assert_closed,
    clean_env,
    connect_proxy,
    echo_roundtrip,
    has_ipv6,
    recv_exact,
    recv_until_eof,
    socks_open,
    socksd_cli,
    wait_for,
    wait_for_log,
)
from tests.helpers import refused_port
from tests.servers import EchoServer, ServerProcess, StubDns

NAME = "origin.test"
"""A name only the servers' hosts map knows (127.0.0.1)."""
PAYLOAD = bytes(range(32))


def socks4_request(port: int, ip: str = "127.0.0.1", cmd: int = 1, userid: bytes = b"") -> bytes:
    return struct.pack("!BBH4s", 4, cmd, port, socket.inet_aton(ip)) + userid + b"\0"


def socks4a_request(port: int, name: str, cmd: int = 1, userid: bytes = b"") -> bytes:
    return struct.pack("!BBH4s", 4, cmd, port, b"\0\0\0\1") + userid + b"\0" + name.encode() + b"\0"


def socks4_reply(sock: socket.socket) -> tuple[int, str, int]:
    """One SOCKS4 reply: (CD, DSTIP, DSTPORT)."""
    raw = recv_exact(sock, 8)
    assert raw[0] == 0, raw
    return raw[1], socket.inet_ntoa(raw[4:8]), struct.unpack("!H", raw[2:4])[0]


def socks4_probe(server: ServerProcess, request: bytes, source: str | None = None) -> int:
    """Send one SOCKS4 request; the reply's CD (the connection is closed after a 91)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    with sock:
        if source is not None:
            sock.bind((source, 0))
        sock.connect((server.host, server.port))
        sock.sendall(request)
        code, _, _ = socks4_reply(sock)
        if code == 91:
            assert_closed(sock)
        return code


def http_exchange(server: ServerProcess, head: bytes) -> bytes:
    """Send ``head``; everything socksd answers until it closes."""
    with connect_proxy(server) as sock:
        sock.sendall(head)
        return recv_until_eof(sock)


def connect_head(target: str, *extra: str) -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", *extra, "", ""]
    return "\r\n".join(lines).encode()


def basic(user: str, password: str) -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}"


def access_line(server: ServerProcess, needle: str) -> str:
    assert wait_for(lambda: any(needle in line for line in access_lines(server))), server.log()
    return [line for line in access_lines(server) if needle in line][-1]


def still_serves(server: ServerProcess, echo: EchoServer) -> None:
    """A SOCKS5 CONNECT still goes through."""
    with socks_open(server, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, PAYLOAD)


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", "20", *args],
        capture_output=True,
        timeout=40,
        env=clean_env(),
        check=False,
    )


def write_config(path: Path, dns: StubDns, extra: str = "", top: str = "") -> Path:
    path.write_text(
        f'{top}protocols = ["socks5", "socks4", "http"]\ndns = ["127.0.0.1:{dns.port}"]\n'
        f'[hosts]\n"{NAME}" = ["127.0.0.1"]\n{extra}'
    )
    return path


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def denied_port() -> int:
    return refused_port()


@pytest.fixture(scope="module")
def mixed(
    module_socksd: Callable[..., ServerProcess],
    nx_dns: StubDns,
    denied_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """No login; SOCKS5, SOCKS4 and HTTP; a rule denies 127.0.0.1:``denied_port``."""
    rule = f'[[rules]]\naction = "deny"\nto = ["127.0.0.1"]\nports = ["{denied_port}"]\n'
    config = write_config(tmp_path_factory.mktemp("mixed") / "socksd.toml", nx_dns, rule)
    return module_socksd("--config", str(config), "--listen", "127.0.0.1:0", "--metrics",
                         "127.0.0.1:0")  # fmt: skip


@pytest.fixture(scope="module")
def mixed_auth(
    module_socksd: Callable[..., ServerProcess],
    nx_dns: StubDns,
    users_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> ServerProcess:
    """alice's login required; SOCKS4 let in from 127.0.0.2 only (``socks4 = true``)."""
    rule = '[[rules]]\naction = "allow"\nclients = ["127.0.0.2"]\nsocks4 = true\n'
    config = write_config(tmp_path_factory.mktemp("mixed") / "socksd.toml", nx_dns, rule)
    return module_socksd(
        "--config", str(config), "--listen", "127.0.0.1:0", "--users", str(users_file),
        "--auth-delay", "0.01", "--max-auth-delay", "0.1",
    )  # fmt: skip


# -- real clients ----------------------------------------------------------------------------------


def test_curl_socks4_socks4a_http_and_socks5_on_one_port(
    mixed: ServerProcess, http4: HttpServer
) -> None:
    proxy = f"{mixed.host}:{mixed.port}"
    named = f"http://{NAME}:{http4.port}/"
    for args in (
        ("--socks5", proxy, http4.url),
        ("--socks4", proxy, http4.url),
        ("--socks4a", proxy, named),
        ("--proxytunnel", "--proxy", f"http://{proxy}", http4.url),
        ("--proxytunnel", "--proxy", f"http://{proxy}", named),
    ):
        result = curl(*args)
        assert result.returncode == 0, (args, result.stderr, mixed.log())
        assert result.stdout == HttpServer.body
    access_line(mixed, f"CONNECT {NAME}:{http4.port} -> 127.0.0.1:{http4.port} rep=0x00")
    for protocol in ("socks4", "http"):

        def logged(protocol: str = protocol) -> bool:
            suffix = f"protocol={protocol}" + ("" if protocol == "http" else ' userid=""')
            return any(
                f"CONNECT {NAME}:{http4.port} -> 127.0.0.1:{http4.port} rep=0x00" in x
                and x.endswith(suffix)
                for x in access_lines(mixed)
            )

        wait_for(logged)  # a session's line is written once the server has seen it end
        assert logged(), (protocol, mixed.log())


def test_curl_http_connect_login(mixed_auth: ServerProcess, http4: HttpServer) -> None:
    proxy = f"http://{mixed_auth.host}:{mixed_auth.port}"
    result = curl("--proxytunnel", "--proxy", proxy, "-U", f"{USER}:{PASSWORD}", http4.url)
    assert result.returncode == 0, (result.stderr, mixed_auth.log())
    assert result.stdout == HttpServer.body
    line = access_line(mixed_auth, f"user={USER} CONNECT 127.0.0.1:{http4.port}")
    assert "rep=0x00" in line and "protocol=http" in line
    for login in ((), ("-U", f"{USER}:wrong")):
        result = curl("--proxytunnel", "--proxy", proxy, *login, "-w", "%{http_connect}",
                      http4.url)  # fmt: skip
        assert result.returncode != 0
        assert result.stdout.endswith(b"407"), result
    failed = [
        x for x in mixed_auth.log().splitlines() if "authentication failed for user 'alice'" in x
    ]
    assert failed and "answered in 0.01s" in failed[0], failed  # the throttle's delay applies


def test_http_407_carries_the_basic_challenge(mixed_auth: ServerProcess, echo: EchoServer) -> None:
    answer = http_exchange(mixed_auth, connect_head(f"127.0.0.1:{echo.port}"))
    assert answer.startswith(b"HTTP/1.1 407 ")
    assert b'\r\nProxy-Authenticate: Basic realm="socksd"\r\n' in answer


def test_python_socks_socks4_and_http(mixed_auth: ServerProcess, echo: EchoServer) -> None:
    pytest.importorskip("python_socks")
    from python_socks.sync import Proxy

    where = f"{mixed_auth.host}:{mixed_auth.port}"
    for url in (f"http://{USER}:{PASSWORD.replace(' ', '%20')}@{where}", f"socks4://{where}"):
        proxy = Proxy.from_url(url, rdns=True)
        sock = proxy.connect(dest_host=NAME, dest_port=echo.port, timeout=IO_TIMEOUT,
                             local_addr=("127.0.0.2", 0))  # fmt: skip
        with sock:
            echo_roundtrip(sock, PAYLOAD)
    for protocol in ("http", "socks4"):
        assert wait_for(lambda p=protocol: any(
            f"CONNECT {NAME}:{echo.port}" in x and f"protocol={p}" in x and "rep=0x00" in x
            for x in access_lines(mixed_auth))), (protocol, mixed_auth.log())  # fmt: skip


@pytest.mark.skipif(shutil.which("proxychains4") is None, reason="proxychains4 is not installed")
def test_proxychains4_socks4(mixed: ServerProcess, http4: HttpServer, tmp_path: Path) -> None:
    conf = tmp_path / "proxychains.conf"
    conf.write_text(
        "strict_chain\ntcp_read_time_out 15000\ntcp_connect_time_out 8000\n"
        f"[ProxyList]\nsocks4 {mixed.host} {mixed.port}\n"
    )
    result = subprocess.run(
        ["proxychains4", "-q", "-f", str(conf), "curl", "--silent", "--show-error",
         "--max-time", "20", http4.url],
        capture_output=True, timeout=40, env=clean_env(), check=False,
    )  # fmt: skip
    assert result.returncode == 0, (result.stderr, mixed.log())
    assert result.stdout == HttpServer.body
    line = access_line(mixed, f"CONNECT 127.0.0.1:{http4.port}")
    assert any("protocol=socks4" in x and f":{http4.port} " in x for x in access_lines(mixed)), line


@pytest.fixture
def https_origin(tmp_path: Path) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; its port."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    body = b"<html><body><p id=found>fetched through socksd over CONNECT</p></body></html>"

    class Page(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
    thread.daemon = True
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None or shutil.which("openssl") is None,
                    reason="chromium or openssl is not installed")  # fmt: skip
def test_headless_chromium_through_http_connect(
    module_socksd: Callable[..., ServerProcess],
    nx_dns: StubDns,
    https_origin: int,
    tmp_path: Path,
) -> None:
    # The proxy lets Chromium reach loopback only, and resolves nothing off the machine.
    rules = '[[rules]]\naction = "allow"\nto = ["127.0.0.0/8"]\n'
    config = write_config(tmp_path / "socksd.toml", nx_dns, rules, top='default = "deny"\n')
    server = module_socksd("--config", str(config), "--listen", "127.0.0.1:0")
    assert CHROMIUM is not None
    argv = [
        CHROMIUM, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--disable-extensions", "--disable-domain-reliability",
        "--disable-client-side-phishing-detection", "--metrics-recording-only",
        f"--user-data-dir={tmp_path / 'profile'}", f"--proxy-server=http://127.0.0.1:{server.port}",
        "--proxy-bypass-list=<-loopback>", "--ignore-certificate-errors",
        "--dump-dom", f"https://127.0.0.1:{https_origin}/",
    ]  # fmt: skip
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")
    result = subprocess.run(argv, capture_output=True, timeout=120, env=clean_env(), check=False)
    assert b"fetched through socksd over CONNECT" in result.stdout, (result.stderr[-2000:],
                                                                     server.log())  # fmt: skip
    line = access_line(server, f"CONNECT 127.0.0.1:{https_origin}")
    assert "rep=0x00" in line and "protocol=http" in line
    for other in access_lines(server):  # whatever else Chromium tried went nowhere
        assert "rep=0x00" not in other or f"127.0.0.1:{https_origin} ->" in other, other


# -- raw probes --------------------------------------------------------------------------------------


def test_every_socks4_reply(
    mixed: ServerProcess, mixed_auth: ServerProcess, echo: EchoServer, denied_port: int
) -> None:
    closed = refused_port()
    with connect_proxy(mixed) as sock:  # 90, then the data; 4a name from the hosts map
        sock.sendall(socks4a_request(echo.port, NAME, userid=b"bob \xff") + PAYLOAD)
        assert socks4_reply(sock)[0] == 90
        assert recv_exact(sock, len(PAYLOAD)) == PAYLOAD
    line = access_line(mixed, f"CONNECT {NAME}:{echo.port}")
    assert 'userid="bob \\udcff"' in line, line
    cases = [  # request, what its access-log line has
        (mixed, socks4_request(closed), f":{closed} -> 127.0.0.1:{closed} rep=0x05"),  # refused
        (mixed, socks4_request(denied_port), f":{denied_port} -> - rep=0x02"),  # denied by a rule
        (mixed, socks4a_request(81, "nowhere.invalid"), "nowhere.invalid:81 -> - rep=0x04"),
        (mixed, socks4a_request(82, "bad name!"), "rep=0x04 up=0 down=0"),  # no host has it
        (mixed, socks4_request(echo.port, cmd=3), "rep=0x07"),  # no such command
        (mixed_auth, socks4_request(echo.port), f":{echo.port} -> - rep=0x02"),  # login required
    ]
    for server, request, needle in cases:
        assert socks4_probe(server, request) == 91, request
        assert wait_for(lambda s=server, n=needle: any(
            n in x and "protocol=socks4" in x for x in access_lines(s))), (
            needle, server.log())  # fmt: skip
    assert "no rule with socks4 = true" in mixed_auth.log()
    assert socks4_probe(mixed_auth, socks4_request(echo.port), source="127.0.0.2") == 90
    still_serves(mixed, echo)


def test_socks4_bind_gives_two_replies(mixed: ServerProcess) -> None:
    with connect_proxy(mixed) as control:
        control.sendall(socks4_request(0, "0.0.0.0", cmd=2))
        code, ip, port = socks4_reply(control)
        assert code == 90 and ip == "127.0.0.1" and port > 0
        with socket.create_connection((ip, port), timeout=IO_TIMEOUT) as peer:
            code, peer_ip, peer_port = socks4_reply(control)
            assert (code, peer_ip, peer_port) == (90, *peer.getsockname())
            peer.sendall(b"from the peer")
            assert recv_exact(control, 13) == b"from the peer"
            control.sendall(b"to the peer")
            assert recv_exact(peer, 11) == b"to the peer"
    line = access_line(mixed, "BIND 0.0.0.0:0")
    assert "protocol=socks4" in line


@pytest.mark.skipif(not has_ipv6(), reason="::1 is not available")
def test_socks4_bind_on_an_ipv6_listener_is_refused(
    module_socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    server = module_socksd("--listen", "[::1]:0", "--protocols", "socks5,socks4")
    with socket.create_connection(("::1", server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(socks4_request(0, "0.0.0.0", cmd=2))
        raw = recv_until_eof(sock)
    assert raw[:2] == b"\x00\x5b" and len(raw) == 8, raw
    assert "is not IPv4, which a SOCKS4 reply cannot carry" in wait_for_log(server, "not IPv4")


REFUSED4 = b"\x00\x5b" + b"\0" * 6
"""SOCKS4's 91 with no address."""


@pytest.mark.parametrize(
    ("first", "answer"),
    [
        (b"\x00", b"\x05\xff"),
        (b"\x01\x02\x03", b"\x05\xff"),
        (b"\xff" * 64, b"\x05\xff"),
        (b"\x04\x09" + b"\0" * 7, REFUSED4),  # no such SOCKS4 command
        (b"\x04\x01\x00", b""),  # half a request, then EOF: closed without a reply
    ],
    ids=["nul", "ver1", "ff", "socks4-bad-command", "socks4-truncated"],
)
def test_malformed_first_bytes_are_closed_and_the_server_keeps_serving(
    mixed: ServerProcess, echo: EchoServer, first: bytes, answer: bytes
) -> None:
    with connect_proxy(mixed) as sock:
        sock.sendall(first)
        if first == b"\x04\x01\x00":
            sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == answer
    still_serves(mixed, echo)


def test_http_get_is_405(mixed: ServerProcess, echo: EchoServer) -> None:
    answer = http_exchange(mixed, b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert b"\r\nAllow: CONNECT\r\n" in answer and b"CONNECT only" in answer
    still_serves(mixed, echo)


def test_http_oversized_head_is_431(mixed: ServerProcess, echo: EchoServer) -> None:
    big = connect_head(f"127.0.0.1:{echo.port}", "X-Filler: " + "a" * 20000)
    assert http_exchange(mixed, big).startswith(b"HTTP/1.1 431 ")
    many = connect_head(f"127.0.0.1:{echo.port}", *(f"X-{i}: {i}" for i in range(150)))
    assert http_exchange(mixed, many).startswith(b"HTTP/1.1 431 ")
    still_serves(mixed, echo)


def test_http_slow_header_gets_408_at_the_handshake_timeout(
    module_socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    """A head that never ends (slow-loris): 408 Request Timeout, then the close."""
    server = module_socksd("--protocols", "http", "--handshake-timeout", "1")
    with connect_proxy(server) as sock:
        head = connect_head(f"127.0.0.1:{echo.port}")
        answer = b""
        for byte in head[:-2]:  # never the final CRLF
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            sock.setblocking(False)
            try:
                answer += sock.recv(4096)
            except BlockingIOError:
                pass
            finally:
                sock.setblocking(True)
            if answer:
                break
        answer += recv_until_eof(sock, timeout=IO_TIMEOUT)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    assert answer.endswith(b"no complete request head within 1s\n"), answer
    assert b"Connection: close\r\n" in answer
    assert "handshake not done within 1s" in wait_for_log(server, "handshake not done")


def test_http_bytes_after_the_blank_line_are_relayed(
    mixed: ServerProcess, echo: EchoServer
) -> None:
    with connect_proxy(mixed) as sock:
        sock.sendall(connect_head(f"127.0.0.1:{echo.port}") + PAYLOAD)
        answer = recv_exact(sock, len(b"HTTP/1.1 200 Connection established\r\n\r\n"))
        assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
        assert recv_exact(sock, len(PAYLOAD)) == PAYLOAD


def test_http_failures_map_to_statuses(
    mixed: ServerProcess, denied_port: int, echo: EchoServer
) -> None:
    closed = refused_port()
    assert http_exchange(mixed, connect_head(f"127.0.0.1:{closed}")).startswith(b"HTTP/1.1 502 ")
    denied = http_exchange(mixed, connect_head(f"127.0.0.1:{denied_port}"))
    assert denied.startswith(b"HTTP/1.1 403 ")
    nowhere = http_exchange(mixed, connect_head("nowhere.invalid:80"))
    assert nowhere.startswith(b"HTTP/1.1 502 ")
    assert http_exchange(mixed, connect_head("no-port")).startswith(b"HTTP/1.1 400 ")


def test_a_protocol_not_enabled_is_closed_and_logged(
    open_server: ServerProcess, echo: EchoServer
) -> None:
    for first, name in ((socks4_request(echo.port), "socks4"), (connect_head("a:1"), "http")):
        with connect_proxy(open_server) as sock:
            sock.sendall(first)
            assert_closed(sock)
        access_line(open_server, f'error="{name} is not enabled (protocols)"')
    still_serves(open_server, echo)


def test_reload_applies_protocols(
    module_socksd: Callable[..., ServerProcess], nx_dns: StubDns, echo: EchoServer,
    tmp_path: Path,
) -> None:  # fmt: skip
    config = tmp_path / "socksd.toml"
    config.write_text('protocols = ["socks5"]\n')
    server = module_socksd("--config", str(config), "--listen", "127.0.0.1:0")
    with connect_proxy(server) as sock:
        sock.sendall(socks4_request(echo.port))
        assert_closed(sock)
    config.write_text('protocols = ["socks5", "socks4"]\n')
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, "reloaded configuration")
    assert socks4_probe(server, socks4_request(echo.port)) == 90
    config.write_text('protocols = ["socks5", "gopher"]\n')
    server.proc.send_signal(signal.SIGHUP)
    log = wait_for_log(server, "reload failed")
    assert "protocols: 'gopher' is not one of socks5, socks4, http" in log


def test_metrics_count_sessions_by_protocol(mixed: ServerProcess, echo: EchoServer) -> None:
    with connect_proxy(mixed) as sock:
        sock.sendall(connect_head(f"127.0.0.1:{echo.port}") + PAYLOAD)
        recv_exact(sock, 39 + len(PAYLOAD))
    url = next(w for w in mixed.log().split() if w.startswith("http://") and "/metrics" in w)

    def count(protocol: str) -> float:
        with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as response:
            text = response.read().decode()
        needle = f'socksd_sessions_by_protocol_total{{protocol="{protocol}"}} '
        lines = [x for x in text.splitlines() if x.startswith(needle)]
        return float(lines[0].split()[-1]) if lines else 0.0

    assert wait_for(lambda: count("http") >= 1), mixed.log()


def test_sessions_and_check_config_show_the_protocol(
    module_socksd: Callable[..., ServerProcess], echo: EchoServer, tmp_path: Path
) -> None:
    control = tmp_path / "control.sock"
    config = tmp_path / "socksd.toml"
    config.write_text(
        f'listen = ["127.0.0.1:0"]\nprotocols = ["socks5", "http"]\ncontrol_socket = "{control}"\n'
    )
    checked = socksd_cli("check-config", str(config))
    assert "protocols: socks5, http" in checked.stdout.splitlines(), checked
    server = module_socksd("--config", str(config))
    with connect_proxy(server) as sock:
        sock.sendall(connect_head(f"127.0.0.1:{echo.port}") + PAYLOAD)
        recv_exact(sock, 39 + len(PAYLOAD))
        answer = socksd_cli("sessions", "--control-socket", str(control), "--json", timeout=30)
        sessions = json.loads(answer.stdout)["sessions"]
        assert [(s["protocol"], s["command"]) for s in sessions] == [("http", "CONNECT")], answer
        table = socksd_cli("sessions", "--control-socket", str(control), timeout=30).stdout
        assert "CONNECT/http" in table, table


def test_http_session_limit_is_503(
    module_socksd: Callable[..., ServerProcess], users_file: Path, echo: EchoServer
) -> None:
    server = module_socksd(
        "--users", str(users_file), "--protocols", "http", "--max-sessions-per-user", "1"
    )
    login = basic(USER, PASSWORD)
    with connect_proxy(server) as first:
        first.sendall(connect_head(f"127.0.0.1:{echo.port}", login))
        assert recv_exact(first, 39).startswith(b"HTTP/1.1 200 ")
        second = http_exchange(server, connect_head(f"127.0.0.1:{echo.port}", login))
        assert second.startswith(b"HTTP/1.1 503 "), second
    line = access_line(server, "max_sessions_per_user")
    assert "protocol=http" in line and "rep=0x01" in line


def test_the_protocol_is_sniffed_after_a_trusted_proxy_header(
    module_socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    server = module_socksd(
        "--protocols", "socks5,socks4,http", "--proxy-protocol-from", "127.0.0.1/32"
    )
    header = f"PROXY TCP4 192.0.2.7 127.0.0.1 5555 {server.port}\r\n".encode()
    with connect_proxy(server) as sock:  # the header's client is not local: protect_local says no
        sock.sendall(header + socks4_request(echo.port))
        assert recv_until_eof(sock) == REFUSED4
    line = access_line(server, "192.0.2.7:5555")
    assert "protocol=socks4" in line and "rule=protect_local" in line, line
    with connect_proxy(server) as sock:
        sock.sendall(header)
        time.sleep(0.1)  # the header alone first: the next bytes are sniffed
        sock.sendall(connect_head(f"127.0.0.1:{echo.port}"))
        assert recv_until_eof(sock).startswith(b"HTTP/1.1 403 ")
