"""Prometheus metrics end to end: real sessions through socksd, the endpoint scraped before and
after, the text parsed with prometheus_client's parser, each counter checked to have moved by
exactly what the sessions did (single process and ``--workers 2``); reloads and worker restarts;
the refusal of a non-loopback address; the Grafana dashboard's queries against what is exported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.support import (
    IO_TIMEOUT,
    PASSWORD,
    USER,
    HttpServer,
    UdpEchoServer,
    access_lines,
    connect_proxy,
    echo_roundtrip,
    parse_udp,
    read_reply,
    recv_exact,
    recv_until_eof,
    request,
    socks_open,
    socks_request,
    socksd_cli,
    udp_header,
    userpass,
    wait_for,
)
from tests.servers import EchoServer, ServerProcess

DASHBOARD = Path(__file__).parents[2] / "contrib" / "grafana" / "socksd.json"
METRICS_ON = re.compile(r"metrics on (http://\S+/metrics)")

Key = tuple[str, tuple[tuple[str, str], ...]]


def metrics_url(server: ServerProcess) -> str:
    found = METRICS_ON.findall(server.log())
    assert found, f"no 'metrics on' line:\n{server.log()}"
    return str(found[0])


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=IO_TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode())


def scrape(url: str) -> dict[Key, float]:
    """Every sample of one scrape, by name and sorted labels."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(scrape_text(url)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def key(name: str, **labels: str) -> Key:
    return (name, tuple(sorted(labels.items())))


def socksd_series(samples: dict[Key, float]) -> dict[Key, float]:
    """The counters and histograms of sessions (what the traffic moves)."""
    moving = (
        "socksd_sessions_total",
        "socksd_relayed_bytes_total",
        "socksd_handshake_seconds_count",
        "socksd_resolve_seconds_count",
        "socksd_connect_seconds_count",
        "socksd_auth_failures_total",
        "socksd_throttled_logins_total",
        "socksd_limit_refusals_total",
        "socksd_rule_denials_total",
        "socksd_udp_datagrams_total",
        "socksd_udp_dropped_total",
    )
    return {k: v for k, v in samples.items() if k[0] in moving}


def assert_moved(url: str, before: dict[Key, float], expected: dict[Key, float]) -> None:
    """Wait (bounded) until the scrape shows ``expected`` deltas; then every session series
    moved by exactly its expected delta and no other moved at all."""

    def delta() -> dict[Key, float]:
        now = socksd_series(scrape(url))
        old = socksd_series(before)
        moved = {k: now.get(k, 0.0) - old.get(k, 0.0) for k in now.keys() | old.keys()}
        return {k: v for k, v in moved.items() if v}

    wait_for(lambda: all(delta().get(k, 0.0) >= v for k, v in expected.items()), 20)
    time.sleep(0.3)  # anything counted late would show now
    assert delta() == {k: v for k, v in expected.items() if v}


def sum_field(lines: list[str], field: str) -> int:
    """The sum of ``field=N`` over access-log lines."""
    total = 0
    for line in lines:
        found = re.search(rf" {field}=(\d+) ", line)
        assert found, line
        total += int(found.group(1))
    return total


# -- the traffic ------------------------------------------------------------------------------


def connect_echo(server: ServerProcess, echo: EchoServer, payload: bytes) -> None:
    """A CONNECT as alice, one round trip, the client closes first and sees the echo's close."""
    sock = socks_open(server, "127.0.0.1", echo.port, user=USER, password=PASSWORD)
    with sock:
        echo_roundtrip(sock, payload)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""


def failed_login(server: ServerProcess) -> None:
    with connect_proxy(server) as sock:
        sock.sendall(b"\x05\x01\x02")
        assert recv_exact(sock, 2) == b"\x05\x02"
        sock.sendall(userpass(USER, "wrong"))
        assert recv_exact(sock, 2) == b"\x01\x01"
        assert recv_until_eof(sock) == b""


def refused_request(server: ServerProcess, port: int) -> bytes:
    sock, raw, _, _ = socks_request(server, "127.0.0.1", port, user=USER, password=PASSWORD)
    with sock:
        recv_until_eof(sock)
    return raw[:2]


def curl_get(server: ServerProcess, http: HttpServer) -> str:
    proxy = f"socks5h://{USER}:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{server.port}"
    result = subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--proxy", proxy, f"http://localhost:{http.port}/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def udp_round(server: ServerProcess, udp_echo: UdpEchoServer, payload: bytes, count: int) -> None:
    """One association: ``count`` datagrams echoed and one fragment (dropped as ``frag``) before
    the last of them, so the drop is counted once its echo is back."""
    control = connect_proxy(server)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with control, udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(IO_TIMEOUT)
        control.sendall(b"\x05\x01\x02")
        assert recv_exact(control, 2) == b"\x05\x02"
        control.sendall(userpass(USER, PASSWORD))
        assert recv_exact(control, 2) == b"\x01\x00"
        control.sendall(request(*udp.getsockname()[:2], cmd=3))
        raw, host, port = read_reply(control)
        assert raw[1] == 0
        for i in range(count):
            if i == count - 1:
                udp.sendto(udp_header("127.0.0.1", udp_echo.port, frag=1) + payload, (host, port))
            udp.sendto(udp_header("127.0.0.1", udp_echo.port) + payload, (host, port))
            assert parse_udp(udp.recv(65536))[3] == payload


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def http() -> Iterator[HttpServer]:
    server = HttpServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def denied_target() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


def write_config(path: Path, users: Path, denied_port: int, extra: str = "") -> Path:
    path.write_text(
        f'users = "{users}"\n'
        "auth_delay = 0.01\n"
        "max_auth_delay = 0.1\n"
        f"{extra}"
        "[[rules]]\n"
        'action = "deny"\n'
        f'ports = ["{denied_port}"]\n'
    )
    return path


def run_traffic(
    server: ServerProcess,
    echo: EchoServer,
    udp_echo: UdpEchoServer,
    http: HttpServer,
    denied_port: int,
) -> dict[Key, float]:
    """Real sessions of every kind through ``server``; the deltas they must cause (bytes of the
    curl session from the access log, every other number known in advance)."""
    payload = b"m" * 1000
    marker = len(access_lines(server))
    for _ in range(3):
        connect_echo(server, echo, payload)
    body = curl_get(server, http)
    assert body == HttpServer.body.decode()
    assert refused_request(server, closed_port()) == b"\x05\x05"
    assert refused_request(server, denied_port) == b"\x05\x02"
    for _ in range(2):
        failed_login(server)
    udp_round(server, udp_echo, b"u" * 100, 3)
    wait_for(lambda: len(access_lines(server)) >= marker + 9, 20)
    lines = access_lines(server)[marker:]
    connects = [line for line in lines if " CONNECT " in line and "rep=0x00" in line]
    assert len(connects) == 4, lines
    assert sum(" up=1000 down=1000 " in line for line in connects) == 3, lines
    up, down = sum_field(connects, "up"), sum_field(connects, "down")
    assert up > 3000 and down > 3000 + len(body)
    return {
        key("socksd_sessions_total", command="CONNECT", reply="0x00"): 4,
        key("socksd_sessions_total", command="CONNECT", reply="0x05"): 1,
        key("socksd_sessions_total", command="CONNECT", reply="0x02"): 1,
        key("socksd_sessions_total", command="UDP_ASSOCIATE", reply="0x00"): 1,
        key("socksd_sessions_total", command="none", reply="none"): 2,
        key("socksd_relayed_bytes_total", command="CONNECT", direction="up"): up,
        key("socksd_relayed_bytes_total", command="CONNECT", direction="down"): down,
        key("socksd_relayed_bytes_total", command="UDP_ASSOCIATE", direction="up"): 300,
        key("socksd_relayed_bytes_total", command="UDP_ASSOCIATE", direction="down"): 300,
        key("socksd_handshake_seconds_count"): 7,
        key("socksd_resolve_seconds_count", result="ok"): 1,  # curl's "localhost"
        key("socksd_connect_seconds_count", result="ok"): 4,
        key("socksd_connect_seconds_count", result="error"): 1,
        key("socksd_auth_failures_total", method="userpass"): 2,
        key("socksd_throttled_logins_total", limit="auth_delay"): 2,
        key("socksd_rule_denials_total", rule="1"): 1,
        key("socksd_udp_datagrams_total", direction="up"): 3,
        key("socksd_udp_datagrams_total", direction="down"): 3,
        key("socksd_udp_dropped_total", reason="frag"): 1,
    }


def check_traffic(
    server: ServerProcess,
    echo: EchoServer,
    udp_echo: UdpEchoServer,
    http: HttpServer,
    denied_port: int,
) -> None:
    url = metrics_url(server)
    before = scrape(url)
    assert before[key("socksd_sessions_active")] == 0
    expected = run_traffic(server, echo, udp_echo, http, denied_port)
    assert_moved(url, before, expected)
    # a session held open is active; once it ends, none is
    sock = socks_open(server, "127.0.0.1", echo.port, user=USER, password=PASSWORD)
    with sock:
        wait_for(lambda: scrape(url)[key("socksd_sessions_active")] == 1, 10)
        assert scrape(url)[key("socksd_sessions_active")] == 1
    wait_for(lambda: scrape(url)[key("socksd_sessions_active")] == 0, 10)
    assert scrape(url)[key("socksd_sessions_active")] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_counters_move_by_exactly_what_the_sessions_did(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    users_file: Path,
    echo: EchoServer,
    udp_echo: UdpEchoServer,
    http: HttpServer,
    denied_target: EchoServer,
    workers: int,
) -> None:
    config = write_config(tmp_path / "socksd.toml", users_file, denied_target.port)
    server = socksd(
        "--config", str(config), "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
        "--workers", str(workers),
    )  # fmt: skip
    text = server.log()
    assert text.index("metrics on") < text.index("listening on")  # known once the server is
    check_traffic(server, echo, udp_echo, http, denied_target.port)
    samples = scrape(metrics_url(server))
    assert samples[key("socksd_workers")] == workers
    assert samples[key("socksd_build_info", version="0.1.0")] == 1
    # the same again: the numbers keep adding up (children cached, files shared)
    check_traffic(server, echo, udp_echo, http, denied_target.port)


@pytest.mark.parametrize("workers", [1, 2])
def test_reloads_are_counted_ok_and_failed(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    users_file: Path,
    denied_target: EchoServer,
    workers: int,
) -> None:
    config = write_config(tmp_path / "reload.toml", users_file, denied_target.port)
    server = socksd("--config", str(config), "--metrics", "127.0.0.1:0", "--workers", str(workers))
    url = metrics_url(server)
    ok, failed = (key("socksd_config_reloads_total", result=r) for r in ("ok", "failed"))
    loaded_at = key("socksd_config_loaded_timestamp_seconds")
    first = scrape(url)
    assert (first[ok], first[failed]) == (0, 0)
    assert abs(first[loaded_at] - time.time()) < 120
    assert first[key("socksd_config_age_seconds")] >= 0
    time.sleep(0.05)
    write_config(config, users_file, denied_target.port, "max_sessions_per_ip = 50\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: scrape(url)[ok] == 1, 15)
    after = scrape(url)
    assert (after[ok], after[failed]) == (1, 0), server.log()
    assert after[loaded_at] > first[loaded_at]
    config.write_text("max_sessions = -1\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: scrape(url)[failed] == 1, 15)
    last = scrape(url)
    assert (last[ok], last[failed]) == (1, 1)
    assert last[loaded_at] == after[loaded_at]  # the running configuration is still that one
    assert "reload failed" in server.log()


def worker_pids(supervisor: int) -> list[int]:
    path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
    return [int(pid) for pid in path.read_text().split()]


def test_worker_restarts_counted_and_dead_workers_leave_the_gauge(
    socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    server = socksd("--metrics", "127.0.0.1:0", "--workers", "2")
    url = metrics_url(server)
    before = scrape(url)
    assert before[key("socksd_worker_restarts_total")] == 0
    for _ in range(4):
        with socks_open(server, "127.0.0.1", echo.port) as sock:
            echo_roundtrip(sock, b"x" * 10)
    done = key("socksd_sessions_total", command="CONNECT", reply="0x00")
    wait_for(lambda: scrape(url).get(done) == 4, 10)
    held = socks_open(server, "127.0.0.1", echo.port)
    with held:
        wait_for(lambda: scrape(url)[key("socksd_sessions_active")] == 1, 10)
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: scrape(url)[key("socksd_worker_restarts_total")] == 2, 15)
        samples = scrape(url)
        assert samples[key("socksd_worker_restarts_total")] == 2
        assert samples[key("socksd_sessions_active")] == 0  # the dead workers' gauges are gone
        assert samples[done] == 4  # their counters stay in the totals
    wait_for(lambda: len(worker_pids(server.proc.pid)) == 2, 10)
    with socks_open(server, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, b"y" * 10)
    wait_for(lambda: scrape(url).get(done) == 5, 10)
    assert scrape(url)[done] == 5


def test_a_long_session_counts_its_bytes_as_it_goes(
    socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    server = socksd("--metrics", "127.0.0.1:0", "--workers", "2")
    url = metrics_url(server)
    up = key("socksd_relayed_bytes_total", command="CONNECT", direction="up")
    down = key("socksd_relayed_bytes_total", command="CONNECT", direction="down")
    before = scrape(url)
    with socks_open(server, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, b"a" * 5000)
        # counted within PROGRESS_INTERVAL (5 s), the session still open
        wait_for(lambda: scrape(url)[up] - before[up] == 5000, 15)
        now = scrape(url)
        assert (now[up] - before[up], now[down] - before[down]) == (5000, 5000)
        assert now[key("socksd_sessions_active")] == 1
        echo_roundtrip(sock, b"b" * 700)
    # the rest at the end, nothing counted twice
    done = key("socksd_sessions_total", command="CONNECT", reply="0x00")
    wait_for(lambda: scrape(url).get(done) == 1, 10)
    end = scrape(url)
    assert (end[up] - before[up], end[down] - before[down]) == (5700, 5700)


def test_metrics_dir_is_private_and_removed(socksd: Callable[..., ServerProcess]) -> None:
    server = socksd("--metrics", "127.0.0.1:0", "--workers", "2")
    dirs = set()
    for pid in worker_pids(server.proc.pid):  # the workers map their value files
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            path = line.split()[-1]
            if "/socksd-metrics-" in path:
                dirs.add(Path(path).parent)
    assert len(dirs) == 1
    path = dirs.pop()
    assert path.is_dir()
    assert path.stat().st_mode & 0o777 == 0o700
    assert server.stop() == 0
    assert not path.exists()


def test_limits_and_block_are_counted(
    socksd: Callable[..., ServerProcess], users_file: Path, echo: EchoServer
) -> None:
    server = socksd(
        "--users", str(users_file), "--metrics", "127.0.0.1:0", "--max-sessions-per-ip", "1",
        "--auth-delay", "0.01", "--max-auth-delay", "0.1", "--max-auth-failures", "2",
        "--auth-block", "--auth-block-time", "60",
    )  # fmt: skip
    url = metrics_url(server)
    before = scrape(url)
    with (
        socks_open(server, "127.0.0.1", echo.port, user=USER, password=PASSWORD),
        connect_proxy(server) as second,
    ):
        assert recv_until_eof(second) == b""  # over max_sessions_per_ip: closed at once
    wait_for(lambda: scrape(url)[key("socksd_sessions_active")] == 0, 10)
    for _ in range(2):
        failed_login(server)
    with connect_proxy(server) as blocked:
        assert recv_until_eof(blocked) == b""  # blocked at accept (auth_block)
    assert_moved(
        url,
        before,
        {
            key("socksd_sessions_total", command="CONNECT", reply="0x00"): 1,
            key("socksd_sessions_total", command="none", reply="none"): 2,
            key("socksd_handshake_seconds_count"): 1,
            key("socksd_connect_seconds_count", result="ok"): 1,
            key("socksd_limit_refusals_total", limit="max_sessions_per_ip"): 1,
            key("socksd_auth_failures_total", method="userpass"): 2,
            key("socksd_throttled_logins_total", limit="auth_delay"): 2,
            key("socksd_throttled_logins_total", limit="auth_block"): 1,
        },
    )


def test_a_remote_address_is_refused_without_intent() -> None:
    result = socksd_cli("serve", "--listen", "127.0.0.1:0", "--metrics", "0.0.0.0:9464")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("socksd: error: metrics: 0.0.0.0:9464 is reachable")
    assert "--metrics-allow-remote" in lines[0]


def test_check_config_shows_the_endpoint(tmp_path: Path) -> None:
    config = tmp_path / "socksd.toml"
    config.write_text('metrics = "127.0.0.1:9464"\n')
    result = socksd_cli("check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "metrics: http://127.0.0.1:9464/metrics" in result.stdout.splitlines()
    config.write_text('metrics = "[::]:9464"\n')
    result = socksd_cli("check-config", str(config))
    assert result.returncode == 2
    assert result.stderr.startswith("socksd: error: metrics: [::]:9464 is reachable")


def test_a_busy_port_is_a_clear_error(socksd: Callable[..., ServerProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for workers in ("1", "2"):
            result = socksd_cli(
                "serve", "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}",
                "--workers", workers,
            )  # fmt: skip
            assert result.returncode == 2
            assert f"socksd: error: metrics: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_off_by_default(server: ServerProcess) -> None:
    assert "metrics on" not in server.log()


# -- the Grafana dashboard ----------------------------------------------------------------------

PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "histogram_quantile", "by", "without", "on", "ignoring",
    "time", "max", "min", "avg", "count", "topk", "and", "or", "unless", "le", "clamp_min",
    "delta", "deriv", "changes", "resets", "label_values", "group_left", "group_right", "offset",
    "vector", "scalar", "abs", "round", "max_over_time", "min_over_time",
}  # fmt: skip


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop()
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            exprs.append(target["expr"])
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            text = query["query"] if isinstance(query, dict) else query
            exprs.append(re.sub(r"label_values\((\w+),\s*\w+\)", r"\1", text))
    return exprs


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings, label matchers,
    ranges and grouping clauses, minus functions and keywords (any other word fails the test)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text)) - PROMQL_WORDS
    unknown = {w for w in words if not w.startswith("socksd_")}
    assert not unknown, f"{expr!r}: not a metric of socksd nor a known PromQL word: {unknown}"
    return words


def exported_series(text: str) -> set[str]:
    """Series names the endpoint exports: from each family's type (so a family with no sample
    yet counts) and from the samples themselves."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("_sum", "_count", ""),
    }
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_dashboard_queries_name_exported_metrics(
    socksd: Callable[..., ServerProcess], echo: EchoServer
) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = set().union(*(metric_names(e) for e in exprs))
    for required in (
        "socksd_sessions_active",
        "socksd_sessions_total",
        "socksd_relayed_bytes_total",
        "socksd_handshake_seconds_bucket",
        "socksd_auth_failures_total",
        "socksd_udp_dropped_total",
    ):
        assert required in used, f"the dashboard has no panel on {required}"
    single = socksd("--metrics", "127.0.0.1:0")
    missing = used - exported_series(scrape_text(metrics_url(single)))
    assert not missing, f"the dashboard queries metrics socksd does not export: {missing}"
    # with --workers the supervisor serves what the workers wrote (after some traffic)
    multi = socksd("--metrics", "127.0.0.1:0", "--workers", "2")
    with socks_open(multi, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, b"z")
    wanted = used - {"socksd_rule_denials_total", "socksd_udp_dropped_total"}  # none yet
    url = metrics_url(multi)
    # the session is counted when the server has ended it, which may be just after the client
    wait_for(lambda: not wanted - exported_series(scrape_text(url)), 10)
    exported = exported_series(scrape_text(url))
    assert not wanted - exported, wanted - exported


def test_metric_names_parser_strips_what_is_not_a_metric() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(socksd_handshake_seconds_bucket"
        '{instance=~"$instance"}[$__rate_interval])))'
    )
    assert metric_names(expr) == {"socksd_handshake_seconds_bucket"}
    assert metric_names("time() - socksd_config_loaded_timestamp_seconds") == {
        "socksd_config_loaded_timestamp_seconds"
    }
    with pytest.raises(AssertionError):
        metric_names("rate(nginx_requests_total[5m])")
    # a counter is exported as NAME_total, a histogram as _bucket/_sum/_count, never bare
    text = (
        "# HELP socksd_x_total x\n# TYPE socksd_x_total counter\n"
        "# HELP socksd_h_seconds h\n# TYPE socksd_h_seconds histogram\n"
    )
    exported = exported_series(text)
    assert "socksd_x_total" in exported and "socksd_x" not in exported
    assert {"socksd_h_seconds_bucket", "socksd_h_seconds_count"} <= exported
    assert "socksd_h_seconds" not in exported


# -- with the real Prometheus (Debian package prometheus) ----------------------------------------

needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus and promtool are not installed (Debian package prometheus)",
)


@needs_prometheus
@pytest.mark.parametrize("workers", ["1", "2"])
def test_promtool_finds_nothing_to_lint(
    socksd: Callable[..., ServerProcess], echo: EchoServer, workers: str
) -> None:
    server = socksd("--metrics", "127.0.0.1:0", "--workers", workers)
    with socks_open(server, "127.0.0.1", echo.port) as sock:
        echo_roundtrip(sock, b"lint")
    done = key("socksd_sessions_total", command="CONNECT", reply="0x00")
    url = metrics_url(server)
    wait_for(lambda: scrape(url).get(done) == 1, 10)
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=scrape_text(url),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def promql(base: str, expr: str) -> dict[str, object]:
    query = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{base}/api/v1/query?{query}", timeout=IO_TIMEOUT) as response:
        answer: dict[str, object] = json.loads(response.read())
    return answer


@needs_prometheus
def test_prometheus_scrapes_and_the_dashboard_queries_answer(
    socksd: Callable[..., ServerProcess],
    tmp_path: Path,
    users_file: Path,
    echo: EchoServer,
    udp_echo: UdpEchoServer,
    http: HttpServer,
    denied_target: EchoServer,
) -> None:
    config = write_config(tmp_path / "socksd.toml", users_file, denied_target.port)
    server = socksd("--config", str(config), "--metrics", "127.0.0.1:0", "--workers", "2")
    target = metrics_url(server).removeprefix("http://").removesuffix("/metrics")
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: socksd\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        run_traffic(server, echo, udp_echo, http, denied_target.port)

        def scraped() -> bool:
            try:
                found = promql(base, 'socksd_sessions_total{command="UDP_ASSOCIATE"}')
            except OSError:
                return False
            return bool(found["data"]["result"])  # type: ignore[index]

        wait_for(scraped, 30)
        assert scraped(), (tmp_path / "prometheus.log").read_text()
        time.sleep(3)  # a few more scrapes: rate() needs two samples
        empty = []
        for expr in dashboard_exprs():
            concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            answer = promql(base, concrete)
            assert answer["status"] == "success", (expr, answer)
            if not answer["data"]["result"]:  # type: ignore[index]
                empty.append(expr)
        # every series exists from the start (known labels at 0) or was caused by the traffic
        assert not empty, f"dashboard queries without data: {empty}"
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(15)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(5)
        log.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_connections_from_a_load_balancer_leave_the_gauge_at_zero(
    socksd: Callable[..., ServerProcess], echo: EchoServer, workers: int
) -> None:
    """Behind a balancer (PROXY protocol): a health check (LOCAL header, then close), a bad
    header and a header cut short are never left in ``socksd_sessions_active``; a client's
    session through the header is counted once, as the client's."""
    from socksd.protocol.proxy_header import ProxyCommand, build_v2

    server = socksd(
        "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--workers", str(workers),
        "--proxy-protocol-from", "127.0.0.1",
    )  # fmt: skip
    url = metrics_url(server)
    before = scrape(url)
    for header in (
        build_v2(ProxyCommand.LOCAL),  # a health check
        b"PROXY TCP9 nonsense\r\n",  # refused: bad header
        build_v2(source=("198.51.100.7", 40000), destination=("127.0.0.1", 1080))[:20],  # cut
    ):
        with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT) as sock:
            sock.sendall(header)
            sock.shutdown(socket.SHUT_WR)
            recv_until_eof(sock)
    with socket.create_connection((server.host, server.port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(build_v2(source=("127.0.0.5", 40000), destination=("127.0.0.1", 1080)))
        sock.sendall(b"\x05\x01\x00" + request("127.0.0.1", echo.port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_reply(sock)[0][1] == 0
        echo_roundtrip(sock, b"through the balancer")
    expected = {
        key("socksd_sessions_total", command="CONNECT", reply="0x00"): 1,
        key("socksd_sessions_total", command="none", reply="none"): 1,  # the health check
        key("socksd_relayed_bytes_total", command="CONNECT", direction="up"): 20,
        key("socksd_relayed_bytes_total", command="CONNECT", direction="down"): 20,
        key("socksd_handshake_seconds_count"): 1,
        key("socksd_connect_seconds_count", result="ok"): 1,
    }
    assert_moved(url, before, expected)
    errors = key("socksd_proxy_header_errors_total")
    assert scrape(url)[errors] - before[errors] == 2  # the bad header and the one cut short
    wait_for(lambda: scrape(url)[key("socksd_sessions_active")] == 0, 10)
    assert scrape(url)[key("socksd_sessions_active")] == 0
    assert server.alive
    assert "Traceback" not in server.log()
