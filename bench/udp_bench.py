#!/usr/bin/env python3
"""UDP ASSOCIATE benchmark: socksd beside Dante (and the no-proxy loopback baseline), one run.

Builds ``udpload`` (bench/udpload.c), starts its UDP echo target on 127.0.0.1:21041, then for
every workload (datagram size x concurrent associations) and repetition starts each server
fresh, runs ``udpload run`` against it and stops it. Servers: socksd on 21033 (``python3 -m
socksd serve --access-log off``, the PYTHONPATH of this process), Dante on 21035 (danted with
bench/danted-udp.conf), ``direct`` (no proxy). Reports medians, the socksd/Dante ratio, loss and
server CPU seconds per million datagrams (utime+stime of the server's process tree, from /proc).

    PYTHONPATH=$PWD/src python3 bench/udp_bench.py --reps 3 --duration 5 \\
        --out bench/results/udp-$(date +%Y%m%d).md

Only one benchmark at a time on the machine: it refuses to start while run_anchors runs.
Loopback only; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ECHO_PORT = 21041
SOCKSD_PORT = 21033
DANTE_PORT = 21035
TICKS = os.sysconf("SC_CLK_TCK")


def build(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    exe = out_dir / "udpload"
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(exe), str(HERE / "udpload.c")], check=True, timeout=120
    )
    return exe


def wait_tcp(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def tree_cpu(pid: int) -> float:
    """utime+stime (children reaped included) of ``pid`` and its live descendants, seconds."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        parents[int(entry)] = int(fields[1])
        stats[int(entry)] = fields
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            f = stats[p]
            total += sum(int(x) for x in f[11:15]) / TICKS  # utime stime cutime cstime
        todo.extend(c for c, parent in parents.items() if parent == p)
    return total


class Server:
    def __init__(self, name: str, argv: list[str] | None, port: int | None, env: dict[str, str]):
        self.name, self.argv, self.port, self.env = name, argv, port, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        if self.argv is None:
            return
        with log.open("ab") as f:
            self.proc = subprocess.Popen(
                self.argv, stdout=f, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        assert self.port is not None
        wait_tcp(self.port)

    def cpu(self) -> float:
        return tree_cpu(self.proc.pid) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and its children
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


def summary(
    rows: list[dict[str, object]], names: list[str], sizes: list[int], assocs: list[int]
) -> list[str]:
    """Markdown tables: datagrams/s and ratios to Dante, then MB/s, loss and CPU per datagram."""

    def pick(name: str, size: int, nassoc: int) -> list[dict[str, object]]:
        return [
            r for r in rows if r["server"] == name and r["size"] == size and r["assoc"] == nassoc
        ]

    def median(name: str, size: int, nassoc: int, key: str) -> float | None:
        values = [float(str(r[key])) for r in pick(name, size, nassoc)]
        return statistics.median(values) if values else None

    def fmt(value: float | None, spec: str = ".0f") -> str:
        return "-" if value is None else format(value, spec)

    proxies = [n for n in names if n != "direct"]
    ours = [n for n in proxies if n.startswith("socksd")]
    head = ["size", "assoc", *(f"{n} dgram/s" for n in names)]
    if "dante" in names:
        head += [f"{n}/dante" for n in ours]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        for nassoc in assocs:
            d = {n: median(n, size, nassoc, "dgrams_per_s") for n in names}
            cells = [str(size), str(nassoc), *(fmt(d[n]) for n in names)]
            if "dante" in names:
                cells += [fmt((d[n] or 0) / d["dante"], ".2f") if d["dante"] else "-" for n in ours]
            out.append("| " + " | ".join(cells) + " |")
    out += [
        "",
        "Payload MB/s of the echoes (median), datagrams lost (sum of the repetitions), "
        "server CPU seconds per million echoed datagrams:",
        "",
    ]
    head = ["size", "assoc"]
    for n in proxies:
        head += [f"{n} MB/s", f"{n} lost", f"{n} CPU-s/M"]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        for nassoc in assocs:
            cells = [str(size), str(nassoc)]
            for n in proxies:
                rs = pick(n, size, nassoc)
                received = sum(int(str(r["received"])) for r in rs)
                cpu = sum(float(str(r["server_cpu_s"])) for r in rs)
                cells += [
                    fmt(median(n, size, nassoc, "mb_per_s"), ".1f"),
                    str(sum(int(str(r["lost"])) for r in rs)),
                    fmt(cpu / received * 1e6 if received else None, ".1f"),
                ]
            out.append("| " + " | ".join(cells) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--sizes", default="64,512,1400,8192")
    ap.add_argument("--assoc", default="1,8", help="concurrent associations per workload")
    ap.add_argument("--window", type=int, default=16, help="datagrams in flight per association")
    ap.add_argument(
        "--only",
        default="direct,socksd,dante",
        help="servers: direct, socksd, socksd-w2 (2 workers), dante",
    )
    ap.add_argument("--bin", type=Path, default=Path("/tmp/socks-bench-bin"))
    ap.add_argument("--out", type=Path, default=None, help="markdown table (raw .jsonl beside it)")
    args = ap.parse_args()

    if subprocess.run(["pgrep", "-f", "run_anchors"], capture_output=True).returncode == 0:
        print("another benchmark (run_anchors) is running; try later", file=sys.stderr)
        return 1
    udpload = build(args.bin)
    work = Path(tempfile.mkdtemp(prefix="udp-bench-"))
    dante_conf = work / "danted-udp.conf"
    dante_conf.write_text((HERE / "danted-udp.conf").read_text().replace("{port}", str(DANTE_PORT)))
    env = dict(os.environ)
    danted = shutil.which("danted") or shutil.which("sockd")
    servers = {
        "direct": Server("direct", None, None, env),
        "socksd": Server(
            "socksd",
            [
                sys.executable,
                "-m",
                "socksd",
                "serve",
                "--listen",
                f"127.0.0.1:{SOCKSD_PORT}",
                "--access-log",
                "off",
            ],
            SOCKSD_PORT,
            env,
        ),
    }
    servers["socksd-w2"] = Server(
        "socksd-w2",
        [*(servers["socksd"].argv or []), "--workers", "2"],
        SOCKSD_PORT,
        env,
    )
    if danted:
        servers["dante"] = Server(
            "dante",
            [danted, "-f", str(dante_conf), "-p", str(work / "danted.pid")],
            DANTE_PORT,
            env,
        )
    names = [n for n in args.only.split(",") if n in servers]
    sizes = [int(s) for s in args.sizes.split(",")]
    assocs = [int(a) for a in args.assoc.split(",")]

    echo = subprocess.Popen([str(udpload), "echo", str(ECHO_PORT)], start_new_session=True)
    rows: list[dict[str, object]] = []
    try:
        time.sleep(0.3)
        for rep in range(args.reps):
            for size in sizes:
                for nassoc in assocs:
                    for name in names:
                        server = servers[name]
                        server.start(work / f"{name}.log")
                        try:
                            cpu0 = server.cpu()
                            cmd = [
                                str(udpload),
                                "run",
                                "--target",
                                f"127.0.0.1:{ECHO_PORT}",
                                "--size",
                                str(size),
                                "--assoc",
                                str(nassoc),
                                "--window",
                                str(args.window),
                                "--duration",
                                str(args.duration),
                            ]
                            cmd += (
                                ["--direct"]
                                if name == "direct"
                                else ["--proxy", f"127.0.0.1:{server.port}"]
                            )
                            out = subprocess.run(
                                cmd,
                                capture_output=True,
                                text=True,
                                timeout=args.duration + 60,
                                check=True,
                            )
                            cpu = server.cpu() - cpu0
                        finally:
                            server.stop()
                        row = json.loads(out.stdout)
                        row.update(server=name, rep=rep, server_cpu_s=round(cpu, 3))
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    finally:
        for server in servers.values():
            server.stop()
        os.killpg(echo.pid, signal.SIGTERM)
        echo.wait(5)

    lines = [
        "# UDP ASSOCIATE through socksd and Dante (one run, medians of "
        f"{args.reps} repetitions, {args.duration:g} s each, window {args.window})",
        "",
        "Command: `" + " ".join(shlex.quote(a) for a in ["python3", *sys.argv]) + "`",
        "",
        *summary(rows, names, sizes, assocs),
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
        args.out.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
