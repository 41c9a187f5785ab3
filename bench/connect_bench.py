#!/usr/bin/env python3
"""CONNECT benchmark: socksd beside Dante, microsocks, pproxy and the no-proxy baseline, one run.

Builds ``connload`` (bench/connload.c) with gcc into ``--bin``, starts its target server (echo,
sink, source on PORT_BASE+1..3), then for every repetition, server and workload starts the server
fresh, runs one ``connload`` load against it and stops it. Workloads: connrate-1/16/128 (clients
opening short sessions: greeting, CONNECT, 32 bytes echoed, close), bulk-up/down-1/8 (128 KiB
writes to a sink or reads from a source), idle-1000/5000 (sessions held open after one echo).
Measured: sessions/s and latency, MB/s, server CPU (utime+stime over the server's process tree,
reaped children included, from /proc) per session and per GB, RSS and Pss per idle session (the
tree's sums before and after). Before each connrate and idle run it waits until the host's
TIME_WAIT count is below ``--tw-threshold``; clients' source addresses spread over
127.0.0.1-127.0.0.N (``--src-ips``). Writes ``table.md`` (medians of the repetitions with their
spread, then one table of ratios) and ``raw.jsonl`` (every run) to ``--out``.

    PYTHONPATH=$PWD/src python3 bench/connect_bench.py --reps 3 --duration 4 --out /tmp/connect

A server is a command line and a port: socksd (``python3 -m socksd serve`` as the README starts
it, with this process's PYTHONPATH), socksd-w2 (the same with ``--workers 2``), and the anchors
dante (bench/danted.conf), microsocks, pproxy (on uvloop) when installed, skipped otherwise; add
more with ``--extra 'NAME=CMD' PORT`` ({port} in CMD is replaced). Loopback only, ports
21000-21999, every run bounded in time; only processes started here are signalled, by PID. Run
one benchmark at a time on a machine (``flock /tmp/socksd-bench.lock ...`` where that is the
custom); figures are ratios within one run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PORT_MIN, PORT_MAX = 21000, 21999
TICKS = os.sysconf("SC_CLK_TCK")
Record = dict[str, Any]

# name -> (kind, clients, direction); table order
WORKLOADS: dict[str, tuple[str, int, str]] = {
    "connrate-1": ("connrate", 1, ""),
    "connrate-16": ("connrate", 16, ""),
    "connrate-128": ("connrate", 128, ""),
    "bulk-up-1": ("bulk", 1, "up"),
    "bulk-up-8": ("bulk", 8, "up"),
    "bulk-down-1": ("bulk", 1, "down"),
    "bulk-down-8": ("bulk", 8, "down"),
    "idle-1000": ("idle", 1000, ""),
    "idle-5000": ("idle", 5000, ""),
}
# within one server's turn: bulk first (few TIME_WAIT sockets; earlier ones drain), idle, connrate
RUN_ORDER = [
    k for kind in ("bulk", "idle", "connrate") for k in WORKLOADS if WORKLOADS[k][0] == kind
]


# ---------------------------------------------------------------- pure parts (unit-tested)


def median_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """The median of the values given and their spread (max - min) / median in %."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    med = statistics.median(vals)
    if len(vals) == 1:
        return med, None
    return med, (max(vals) - min(vals)) / abs(med) * 100 if med else 0.0


def fmt(value: float | None) -> str:
    """A figure with three significant digits or so, "-" when there is none."""
    if value is None:
        return "-"
    a = abs(value)
    return (
        f"{value:.0f}"
        if a >= 100
        else f"{value:.1f}"
        if a >= 10
        else f"{value:.2f}"
        if a >= 1
        else f"{value:.3f}"
    )


def ratio(ours: float | None, other: float | None) -> float | None:
    """ours / other, None when either is missing or other is 0."""
    return None if ours is None or not other else ours / other


def _per_cpu(r: Record) -> float | None:
    cpu = r.get("server_cpu_s")
    return r["ok_total"] / cpu if cpu else None


def _cpu_per_gb(r: Record) -> float | None:
    cpu, total = r.get("server_cpu_s"), r.get("bytes_total")
    return cpu / (total / 1e9) if cpu is not None and total else None


# (label, value of a record, higher is better) for each kind of workload
METRICS: dict[str, list[tuple[str, Callable[[Record], float | None], bool]]] = {
    "connrate": [
        ("sessions/s", lambda r: r.get("rate"), True),
        ("p50 latency us", lambda r: r.get("p50_us"), False),
        ("p99 latency us", lambda r: r.get("p99_us"), False),
        ("errors", lambda r: r.get("errors"), False),
        ("sessions per server CPU-s", _per_cpu, True),
    ],
    "bulk": [
        ("MB/s", lambda r: r.get("MBps"), True),
        ("server CPU-s per GB", _cpu_per_gb, False),
    ],
    "idle": [
        ("RSS KiB per session", lambda r: r.get("rss_kb_per_conn"), False),
        ("Pss KiB per session", lambda r: r.get("pss_kb_per_conn"), False),
        ("established", lambda r: r.get("established"), True),
    ],
}
RATIO_LABELS = {"sessions/s", "sessions per server CPU-s", "MB/s", "server CPU-s per GB",
                "RSS KiB per session"}  # fmt: skip


def medians(
    rows: Sequence[Record],
) -> dict[tuple[str, str, str], tuple[float | None, float | None]]:
    """(workload, label, server) -> (median, spread %) over the repetitions that did not fail."""
    groups: dict[tuple[str, str, str], list[float | None]] = {}
    for r in rows:
        if "error" in r or "skipped" in r:
            continue
        for label, value, _ in METRICS[WORKLOADS[r["workload"]][0]]:
            groups.setdefault((r["workload"], label, r["server"]), []).append(value(r))
    return {key: median_spread(vals) for key, vals in groups.items()}


def tables(rows: Sequence[Record], servers: Sequence[str], ours: Sequence[str]) -> list[str]:
    """Markdown: medians [spread] per workload and server, then ours / each other server."""
    med = medians(rows)
    failed = {(r["workload"], r["server"]) for r in rows if "error" in r}
    done = [k for k in WORKLOADS if any(r["workload"] == k for r in rows)]
    out = [
        "| workload | metric | " + " | ".join(servers) + " |",
        "|---|---|" + "---|" * len(servers),
    ]
    for key in done:
        for label, _, _ in METRICS[WORKLOADS[key][0]]:
            cells = []
            for s in servers:
                m, spread = med.get((key, label, s), (None, None))
                cell = fmt(m) + ("" if spread is None else f" [{spread:.0f}%]")
                cells.append(cell + (" (a run failed)" if (key, s) in failed else ""))
            out.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for a in ours for b in servers if b != a]
    if not pairs:
        return out
    out += ["", "Ratios of the medians (ours / other; above 1 is more of the metric):", ""]
    out += ["| workload | metric | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |"]
    out += ["|---|---|" + "---|" * len(pairs)]
    for key in done:
        for label, _, _ in METRICS[WORKLOADS[key][0]]:
            if label not in RATIO_LABELS:
                continue
            cells = [
                fmt(
                    ratio(
                        med.get((key, label, a), (None,))[0], med.get((key, label, b), (None,))[0]
                    )
                )
                for a, b in pairs
            ]
            if any(c != "-" for c in cells):
                out.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    return out


def noise_line(rows: Sequence[Record]) -> str:
    """The spread of the headline cells: how far to trust a ratio."""
    spreads = sorted(
        s
        for (_, label, _), (_, s) in medians(rows).items()
        if s is not None and label in RATIO_LABELS
    )
    if not spreads:
        return ""
    return (
        f"Noise: spread over {len(spreads)} cells: median {statistics.median(spreads):.0f}%, "
        f"max {spreads[-1]:.0f}%."
    )


def check_port(port: int) -> int:
    """``port`` if it is in the benchmark's range (21000-21999), else ValueError."""
    if not PORT_MIN <= port <= PORT_MAX:
        raise ValueError(f"port {port} is outside {PORT_MIN}-{PORT_MAX}")
    return port


def parse_extra(spec: str, port: str) -> tuple[str, str, int]:
    """``--extra 'NAME=CMD' PORT`` as (name, command, port)."""
    name, sep, cmd = spec.partition("=")
    if not sep or not name or not cmd.strip():
        raise ValueError(f"--extra wants NAME=CMD, got {spec!r}")
    return name, cmd, check_port(int(port))


def pick_workloads(text: str) -> list[str]:
    """The workloads named (comma list; empty: all), in table order."""
    names = [w for w in text.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
    return [w for w in WORKLOADS if not names or w in names]


# ---------------------------------------------------------------- /proc


def _stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, CPU ticks with reaped children, start time) of ``pid``."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = text[text.rindex(")") + 2 :].split()
    return f[0], int(f[1]), sum(int(x) for x in f[11:15]), int(f[19])


def tree(root: int) -> dict[int, tuple[str, int, int, int]]:
    """``root`` and its descendants: pid -> (state, ppid, CPU ticks, start time)."""
    info = {int(d): s for d in os.listdir("/proc") if d.isdigit() and (s := _stat(int(d)))}
    out: dict[int, tuple[str, int, int, int]] = {}
    todo = [root] if root in info else []
    while todo:
        pid = todo.pop()
        out[pid] = info[pid]
        todo.extend(p for p, s in info.items() if s[1] == pid and p not in out)
    return out


def tree_cpu(root: int) -> float:
    return sum(s[2] for s in tree(root).values()) / TICKS


def _kib(pid: int, name: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_mem(root: int) -> dict[str, int]:
    """VmRSS and Pss summed over the live processes of ``root``'s tree, KiB."""
    live = [p for p, s in tree(root).items() if s[0] != "Z"]
    return {
        "rss_kb": sum(_kib(p, "status", "VmRSS") for p in live),
        "pss_kb": sum(_kib(p, "smaps_rollup", "Pss") for p in live),
        "procs": len(live),
    }


def timewait() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("tw") + 1])
    return 0


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- processes


class StartError(Exception):
    pass


@dataclass
class Server:
    """A server under test: a command line (None: direct) and its port."""

    name: str
    cmd: str | None
    port: int
    logdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, settle: float) -> None:
        if self.cmd is None:
            return
        if port_open(self.port):
            raise StartError(f"port {self.port} is in use before the start")
        cmd = self.cmd.replace("{port}", str(self.port))
        with (self.logdir / f"server-{self.name}.log").open("ab") as log:
            log.write(f"=== {time.strftime('%H:%M:%S')} {cmd}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                ["bash", "-c", "exec " + cmd],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, PORT=str(self.port)),
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StartError(f"{self.name} did not listen on {self.port}; see its log")
            time.sleep(0.05)
        time.sleep(settle)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM to the server, then SIGKILL to any descendant of it still alive, by PID."""
        if self.proc is None:
            return
        procs = tree(self.proc.pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                self.proc.send_signal(sig)
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 3
        for pid, (_, _, _, start) in procs.items():
            while (s := _stat(pid)) and s[0] != "Z" and s[3] == start:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)  # our descendant: same pid, same start time
                    break
                time.sleep(0.02)
        reap()
        self.proc = None


def reap() -> None:
    """Reap descendants re-parented to us (the driver is their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


@dataclass
class Bench:
    connload: Path
    target_ports: tuple[int, int, int]  # echo, sink, source
    duration: float
    warmup: float
    src_ips: int
    tw_threshold: int
    tw_max_wait: float
    idle_hold: float = 240.0

    def wait_timewait(self, rec: Record) -> None:
        start = time.monotonic()
        while (
            tw := timewait()
        ) > self.tw_threshold and time.monotonic() - start < self.tw_max_wait:
            time.sleep(1.0)
        rec["timewait_before"], rec["timewait_wait_s"] = tw, round(time.monotonic() - start, 1)

    def load(self, args: list[str]) -> Record:
        p = subprocess.run(
            [str(self.connload), *args],
            check=False,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=self.duration + self.warmup + 60,
        )
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"connload failed ({p.returncode}): {p.stderr.strip()[-300:]}")
        return dict(json.loads(lines[-1]), summary=p.stderr.strip())

    def measure(self, srv: Server, workload: str) -> Record:
        kind, clients, direction = WORKLOADS[workload]
        rec: Record = {"server": srv.name, "workload": workload}
        if kind == "idle":
            return self.measure_idle(srv, clients, rec)
        echo, sink, source = self.target_ports
        port = echo if kind == "connrate" else sink if direction == "up" else source
        args = [kind, "-T", f"127.0.0.1:{port}", "-c", str(clients)]
        args += ["--direct"] if srv.cmd is None else ["-p", f"127.0.0.1:{srv.port}"]
        args += ["-d", str(self.duration), "-w", str(self.warmup)]
        if kind == "connrate":
            self.wait_timewait(rec)
            args += ["--src-ips", str(self.src_ips)]
        else:
            args += ["--dir", direction]
        srv.start(settle=0.3)
        try:
            cpu0 = tree_cpu(srv.pid) if srv.cmd else 0.0
            rec.update(self.load(args))
            if srv.cmd:
                rec["server_cpu_s"] = round(tree_cpu(srv.pid) - cpu0, 3)
        finally:
            srv.stop()
        return rec

    def measure_idle(self, srv: Server, clients: int, rec: Record) -> Record:
        if srv.cmd is None:
            return dict(rec, skipped="no proxy process")
        self.wait_timewait(rec)
        srv.start(settle=1.0)
        proc: subprocess.Popen[str] | None = None
        try:
            mem0 = tree_mem(srv.pid)
            proc = subprocess.Popen(
                [str(self.connload), "idle", "-p", f"127.0.0.1:{srv.port}", "-c", str(clients),
                 "-T", f"127.0.0.1:{self.target_ports[0]}", "-d", str(self.idle_hold),
                 "--inflight", "64", "--timeout", "10", "--src-ips", str(self.src_ips)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert proc.stdout is not None
            ready, start = "", time.monotonic()
            while not ready and time.monotonic() - start < self.idle_hold - 30:
                if select.select([proc.stdout], [], [], 1.0)[0]:
                    line = proc.stdout.readline()
                    if not line:
                        break
                    ready = line if line.startswith("READY") else ""
            if not ready:
                raise RuntimeError("idle: the client never reported READY")
            rec["open_s"] = round(time.monotonic() - start, 2)
            time.sleep(1.0)
            mem1 = tree_mem(srv.pid)
            out, err = proc.communicate(timeout=60)  # stdin closed: the client lets go and exits
            proc = None
        finally:
            if proc is not None:
                proc.kill()
                proc.communicate(timeout=10)
            srv.stop()
        rec.update(json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1]))
        est = int(ready.split("established=")[1].split()[0])
        rec.update(summary=err.strip(), established=est, mem_before=mem0, mem_after=mem1)
        if est:
            rec["rss_kb_per_conn"] = round((mem1["rss_kb"] - mem0["rss_kb"]) / est, 2)
            rec["pss_kb_per_conn"] = round((mem1["pss_kb"] - mem0["pss_kb"]) / est, 2)
        return rec


def build(bin_dir: Path) -> Path:
    """connload compiled into ``bin_dir`` (again when the source is newer)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe, src = bin_dir / "connload", HERE / "connload.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-o", str(exe), str(src)]
        subprocess.run(cmd, check=True, timeout=120)
    return exe


PPROXY_UVLOOP = (
    "import asyncio, sys, uvloop; from pproxy.server import main; "
    "uvloop.install = lambda: asyncio.set_event_loop(uvloop.new_event_loop()); "
    "sys.argv = ['pproxy', '-l', 'socks5://127.0.0.1:{port}']; main()"
)  # pproxy calls get_event_loop() after uvloop.install(), which no longer sets one


def builtin_servers(base: int, dante_conf: Path) -> list[tuple[str, str | None, int]]:
    """(name, command or None, port) of the servers this benchmark knows, installed or not."""
    py = shlex.quote(sys.executable)
    socksd = f"{py} -m socksd serve --listen 127.0.0.1:{{port}} --access-log off"
    return [
        ("direct", None, 0),
        ("socksd", socksd, base + 20),
        ("socksd-w2", socksd + " --workers 2", base + 21),
        ("dante", f"/usr/sbin/danted -f {dante_conf} -N 2", base + 11),
        ("microsocks", "/usr/bin/microsocks -i 127.0.0.1 -p {port}", base + 12),
        ("pproxy-uvloop", f"{py} -c {shlex.quote(PPROXY_UVLOOP)}", base + 14),
    ]


def installed(name: str, cmd: str) -> bool:
    argv = shlex.split(cmd)
    if not os.path.exists(argv[0]):
        return False
    if name.startswith("pproxy"):
        probe = [sys.executable, "-c", "import pproxy, uvloop"]
        return subprocess.run(probe, capture_output=True, check=False).returncode == 0
    return True


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds of a run")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds before the window")
    ap.add_argument(
        "--workloads", default="", help="comma list (default all): " + ",".join(WORKLOADS)
    )
    ap.add_argument("--only", default="", help="comma list of servers (default: all installed)")
    ap.add_argument("--extra", nargs=2, action="append", default=[], metavar=("NAME=CMD", "PORT"))
    ap.add_argument("--ours", default="", help="servers the ratios are for (default socksd*)")
    ap.add_argument(
        "--port-base", type=int, default=21100, help="target BASE+1..3, anchors BASE+11.."
    )
    ap.add_argument("--src-ips", type=int, default=16)
    ap.add_argument("--tw-threshold", type=int, default=12000)
    ap.add_argument("--tw-max-wait", type=float, default=65.0)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "socksd-bench"
    ap.add_argument("--bin", type=Path, default=cache, help="where connload is built")
    ap.add_argument("--out", type=Path, default=Path("/tmp/socksd-connect-bench"))
    a = ap.parse_args(argv)
    try:
        if not (1 <= a.reps <= 20 and 0 < a.duration <= 120 and 0 <= a.warmup <= 10):
            raise ValueError("--reps must be 1..20, --duration 0..120, --warmup 0..10")
        if not 1 <= a.src_ips <= 250:
            raise ValueError("--src-ips must be 1..250")
        check_port(a.port_base)
        check_port(a.port_base + 30)
        keys = pick_workloads(a.workloads)
        extras = [parse_extra(spec, port) for spec, port in a.extra]
        taken = [a.port_base + i for i in (1, 2, 3)]
        if any(port in taken for _, _, port in extras):
            raise ValueError(f"--extra ports must not be the target's ({taken})")
    except ValueError as e:
        ap.error(str(e))
    only = {n for n in a.only.split(",") if n}
    a.out.mkdir(parents=True, exist_ok=True)
    dante_conf = a.out / "danted.conf"
    dante_conf.write_text(
        (HERE / "danted.conf").read_text().replace("{port}", str(a.port_base + 11))
    )
    servers: list[Server] = []
    for name, cmd, port in [*builtin_servers(a.port_base, dante_conf), *extras]:
        if only and name not in only:
            continue
        if cmd is not None and not installed(name, cmd):
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        servers.append(Server(name, cmd, port, a.out))
    if not servers:
        ap.error("no server selected")
    ours = [n for n in a.ours.split(",") if n] or [
        s.name for s in servers if s.name.startswith("socksd")
    ]
    targets = (a.port_base + 1, a.port_base + 2, a.port_base + 3)

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: Dante's orphans come to us
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    bench = Bench(
        build(a.bin), targets, a.duration, a.warmup, a.src_ips, a.tw_threshold, a.tw_max_wait
    )
    if any(port_open(p) for p in targets):
        sys.exit(f"a target port ({targets}) is in use; refusing to start")
    with (a.out / "target.log").open("ab") as log:
        target = subprocess.Popen(
            [str(bench.connload), "serve", "--echo", str(targets[0]), "--sink", str(targets[1]),
             "--source", str(targets[2]), "--max-seconds", "14400"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    rows: list[Record] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    (a.out / "raw.jsonl").write_text("")  # this run's records only
    try:
        deadline = time.monotonic() + 10
        while not all(port_open(p) for p in targets):
            if target.poll() is not None or time.monotonic() > deadline:
                sys.exit("the target server did not start")
            time.sleep(0.05)
        failed: set[str] = set()
        for rep in range(a.reps):
            turn = rep % len(servers)  # rotate the order each repetition
            for srv in servers[turn:] + servers[:turn]:
                for key in (k for k in RUN_ORDER if k in keys):
                    if srv.name in failed:
                        break
                    try:
                        rec = bench.measure(srv, key)
                    except StartError as e:
                        failed.add(srv.name)
                        rec = {"server": srv.name, "workload": key, "error": str(e)}
                    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
                        rec = {"server": srv.name, "workload": key, "error": str(e)}
                    rec["rep"] = rep + 1
                    rows.append(rec)
                    with (a.out / "raw.jsonl").open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    shown = rec.get("error") or rec.get("skipped") or rec.get("summary", "")
                    print(f"[rep {rep + 1}] {srv.name:13s} {key:13s} {shown}", file=sys.stderr)
    finally:
        for srv in servers:
            srv.stop()
        target.terminate()
        target.wait(10)
        reap()
    lines = [
        f"# CONNECT benchmark, {started}, {os.cpu_count()} CPUs: medians of {a.reps} "
        f"repetitions, {a.duration:g} s each (+{a.warmup:g} s warm-up)",
        "",
        "Command: `" + shlex.join(["python3", *sys.argv]) + "`",
        "",
        "Cells: median [spread = (max - min) / median]. MB = 1e6 bytes, GB = 1e9 bytes. Server CPU",
        "= user+sys of the server's process tree; clients, servers and the target share the CPUs.",
        "",
        *tables(
            rows, [s.name for s in servers], [n for n in ours if n in {s.name for s in servers}]
        ),
        "",
        noise_line(rows),
    ]
    (a.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
