"""GSSAPI bulk transfer: socksd beside Dante's sockd, same client, same KDC, one run.

Both servers require GSSAPI (RFC 1961) with the same keytab of a throwaway realm
(tests/krb5.py). The client is Dante's own client library (LD_PRELOAD of libdsocksd.so from
scripts/build-dante-gssapi.sh into ncat), so the C client is the same for both servers and only
the server differs. Each transfer sends SIZE bytes to the shared bench's C sink (benchsrv), or
receives SIZE bytes from its source, encapsulated at protection level 1 (integrity) or 2
(confidentiality): the server unwraps uploads and wraps downloads. Reported: MB/s (wall)
and server CPU seconds per GB (utime+stime of the server's process tree), median of REPS, and
socksd's ratio to Dante for each. Loopback only; ports 21034 (socksd), 21134-21136 (benchsrv),
21234 (sockd).

    PYTHONPATH=src python3 bench/gssapi_bulk.py [--size-mb 200] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.krb5 import TestRealm  # noqa: E402

SOCKSD_PORT, SINK_PORT, SOURCE_PORT, SOCKD_PORT = 21034, 21134, 21136, 21234
BENCHSRV = Path(os.environ.get("SOCKS_BENCH_BIN", "/tmp/socks-bench-bin")) / "benchsrv"


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def tree_cpu(pid: int) -> float:
    """utime+stime (children reaped included) of ``pid`` and its live descendants, seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(fields[i]) for i in (11, 12, 13, 14)) / tick
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
    return total


def start_socksd(realm: TestRealm) -> subprocess.Popen[bytes]:
    env = {**os.environ, **realm.env}
    return subprocess.Popen(
        [sys.executable, "-m", "socksd", "serve", "--listen", f"127.0.0.1:{SOCKSD_PORT}",
         "--gssapi-keytab", str(realm.keytab), "--access-log", "off", "--log-level", "warning"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def start_sockd(realm: TestRealm, dante: Path, tmp: Path) -> subprocess.Popen[bytes]:
    conf = tmp / "sockd.conf"
    conf.write_text(
        f"logoutput: {tmp / 'sockd.log'}\n"
        f"internal: 127.0.0.1 port = {SOCKD_PORT}\nexternal: 127.0.0.1\n"
        "socksmethod: gssapi\nclientmethod: none\n"
        "user.privileged: root\nuser.unprivileged: root\n"
        "client pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n"
        f"  gssapi.keytab: FILE:{realm.keytab}\n  gssapi.servicename: rcmd\n"
        "  gssapi.enctype: integrity confidentiality\n}\n"
        "socks pass {\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  command: connect\n}\n"
    )
    return subprocess.Popen(
        [str(dante / "sbin" / "sockd"), "-f", str(conf), "-N", "1", "-p", str(tmp / "sockd.pid")],
        env={**os.environ, **realm.env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def transfer(
    realm: TestRealm, dante: Path, tmp: Path, port: int, level: str, size: int, direction: str
) -> float:
    """Move ``size`` bytes up (to the sink) or down (from the source) with Dante's client."""
    conf = tmp / f"socks-{port}-{level}.conf"
    conf.write_text(
        "route {\n"
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}\n"
        "  protocol: tcp\n  proxyprotocol: socks_v5\n  method: gssapi\n"
        f"  gssapi.servicename: rcmd\n  gssapi.enctype: {level}\n}}\n"
    )
    env = {
        **os.environ, **realm.env, "SOCKS_CONF": str(conf), "SOCKS_AUTOADD_LANROUTES": "no",
        "LD_PRELOAD": str(dante / "lib" / "libdsocksd.so"),
    }  # fmt: skip
    start = time.monotonic()
    if direction == "up":
        with subprocess.Popen(
            ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE
        ) as src:
            result = subprocess.run(
                ["ncat", "127.0.0.1", str(SINK_PORT)], stdin=src.stdout, env=env,
                capture_output=True, timeout=600, check=False,
            )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"transfer failed: {result.stderr.decode(errors='replace')}")
    else:
        # Dante's client fails now and then ("Ncat: Protocol error", 0 bytes) when target data
        # follows the reply at once, with Dante's server as with socksd: such a start is retried.
        command = f"ncat --recv-only 127.0.0.1 {SOURCE_PORT} | head -c {size} | wc -c"
        for _ in range(5):
            start = time.monotonic()
            out = subprocess.run(
                ["sh", "-c", command], env=env, capture_output=True, timeout=600, check=False
            )
            if out.stdout.strip() == str(size).encode():
                break
            if out.stdout.strip() != b"0":
                raise RuntimeError(f"download got {out.stdout!r}: {out.stderr!r}")
        else:
            raise RuntimeError(f"download failed 5 times: {out.stderr.decode(errors='replace')}")
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mb * 1_000_000
    dante = Path(subprocess.check_output([str(ROOT / "scripts" / "build-dante-gssapi.sh")],
                                         text=True).strip().splitlines()[-1])  # fmt: skip
    sink = subprocess.Popen(
        [str(BENCHSRV), "--echo", "21135", "--sink", str(SINK_PORT), "--source", "21136"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    realm = TestRealm.start()
    tmp = realm.tmpdir
    rows: dict[tuple[str, str, str], tuple[float, float]] = {}
    cases = [(d, level) for d in ("up", "down") for level in ("integrity", "confidentiality")]
    try:
        wait_port(SINK_PORT, sink)
        for direction, level in cases:
            for name, port, start in (
                ("socksd", SOCKSD_PORT, lambda: start_socksd(realm)),
                ("dante", SOCKD_PORT, lambda: start_sockd(realm, dante, tmp)),
            ):
                server = start()
                try:
                    wait_port(port, server)
                    transfer(realm, dante, tmp, port, level, 1_000_000, direction)  # warm-up
                    rates, cpus = [], []
                    for _ in range(args.reps):
                        before = tree_cpu(server.pid)
                        seconds = transfer(realm, dante, tmp, port, level, size, direction)
                        cpu = tree_cpu(server.pid) - before
                        rates.append(size / seconds / 1e6)
                        cpus.append(cpu / (size / 1e9))
                    rows[(name, direction, level)] = (
                        statistics.median(rates),
                        statistics.median(cpus),
                    )
                finally:
                    server.send_signal(signal.SIGTERM)
                    server.wait(20)
    finally:
        realm.stop()
        sink.terminate()
        sink.wait(10)
    print(f"GSSAPI bulk, {args.size_mb} MB x {args.reps} (median), Dante's client for both")
    print("| direction | level | server | MB/s | server CPU-s/GB | socksd/Dante MB/s | CPU |")
    print("|---|---|---|---|---|---|---|")
    for direction, level in cases:
        d_rate, d_cpu = rows[("dante", direction, level)]
        for name in ("socksd", "dante"):
            rate, cpu = rows[(name, direction, level)]
            ratio = f"{rate / d_rate:.2f} | {cpu / d_cpu:.2f}" if name == "socksd" else "|"
            print(f"| {direction} | {level} | {name} | {rate:.0f} | {cpu:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
