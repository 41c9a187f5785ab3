"""A connection storm at a limit does not flood the log (socksd.server.handshake.refusals): the
first refusals of a reason are logged one by one, the rest are summed up in one line with their
exact count and addresses, per process (``--workers``); the metrics still count each one."""

from __future__ import annotations

import re
import signal
import socket
from collections.abc import Callable

from tests.e2e.admin_support import closed_before_negotiation, connect_from
from tests.e2e.support import wait_for
from tests.e2e.test_metrics import key, metrics_url, scrape
from tests.servers import ServerProcess

STORM = 300
"""Connections refused in each test: far more than a window logs one by one."""
BUDGET = 10
"""``refusals.LINES_PER_REASON``: what the README promises, checked against the log."""

SUMMARY = re.compile(r"refused (\d+) more in the last [\d.]+s without a line each \((.*)\);")


def _hold(server: ServerProcess, source: str = "127.0.0.1") -> socket.socket | None:
    """A connection that is admitted (its greeting answered), or None when it was refused."""
    sock = connect_from(server, source)
    try:
        sock.sendall(b"\x05\x01\x00")
        if sock.recv(2) == b"\x05\x00":
            return sock
    except (ConnectionResetError, BrokenPipeError):
        pass
    sock.close()
    return None


def _summaries(log: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in SUMMARY.finditer(log)]


def test_max_sessions_storm_is_logged_within_the_budget_and_summed_up_exactly(
    socksd: Callable[..., ServerProcess],
) -> None:
    server = socksd(
        "--max-sessions", "2", "--handshake-timeout", "60", "--metrics", "127.0.0.1:0"
    )  # fmt: skip
    held = [_hold(server), _hold(server)]
    try:
        assert all(held)
        # 200 refusals from one address, then 100 from another
        for n in range(STORM):
            source = "127.0.0.2" if n < 200 else "127.0.0.3"
            assert closed_before_negotiation(connect_from(server, source))
        assert wait_for(lambda: _summaries(server.log()), 30), server.log()[-3000:]
        log = server.log()
        logged = log.count("sessions open (max_sessions)")
        assert logged == BUDGET, log[-3000:]
        assert log.count("max_sessions: more than 10 refusals within 10s") == 1
        [(count, detail)] = _summaries(log)
        assert count + logged == STORM
        assert detail == f"max_sessions: {200 - BUDGET + 100} from 2 addresses: 127.0.0.2 " + (
            f"({200 - BUDGET}), 127.0.0.3 (100)"
        )
        # every refusal is still counted in the metrics
        samples = scrape(metrics_url(server))
        assert samples[key("socksd_limit_refusals_total", limit="max_sessions")] == STORM
        # after the summary each refusal is logged again
        assert closed_before_negotiation(connect_from(server, "127.0.0.4"))
        assert wait_for(lambda: "refusing 127.0.0.4:" in server.log(), 10)
    finally:
        for sock in held:
            if sock is not None:
                sock.close()


def test_each_worker_bounds_its_lines_and_sums_up_at_shutdown(
    socksd: Callable[..., ServerProcess],
) -> None:
    """--workers 2, max_sessions_per_ip counted per worker: each worker logs its own budget and
    its own summary, written when it stops; together they account for every refusal."""
    server = socksd("--workers", "2", "--max-sessions-per-ip", "1")
    held: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(STORM):
            sock = _hold(server)
            if sock is None:
                refused += 1
            else:
                held.append(sock)
        assert len(held) <= 2 and refused >= STORM - 2
    finally:
        for sock in held:
            sock.close()
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    logged = log.count("sessions open from this address (max_sessions_per_ip)")
    summaries = _summaries(log)
    assert logged <= 2 * BUDGET, log[-3000:]
    assert 1 <= len(summaries) <= 2, log[-3000:]
    assert logged + sum(count for count, _ in summaries) == refused, log[-3000:]
