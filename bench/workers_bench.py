#!/usr/bin/env python3
"""socksd --workers: scaling from 1 to 2 workers, and how sessions spread over the workers.

    python3 bench/workers_bench.py scale ROUNDS DURATION
        connrate-128 and bulk-down-8 through socksd with 1 and 2 workers, alternating, the server
        pinned to CPU 1 (taskset -c 1), connload and its target to CPU 0: rates, server CPU-s.
    python3 bench/workers_bench.py even DURATION
        with 2 workers: each worker's CPU-seconds during connrate-128 from 16 source addresses
        and from 1, and how 8 and 1000 idle sessions spread over the workers (socksd sessions
        --json), for SO_REUSEPORT (what socksd does) and for one accept queue shared by the
        workers (an experiment: SOCKSD_SHARED_ACCEPT=1 with the patch in
        bench/results/2026-12-03-workers.md; without it both rows are SO_REUSEPORT).
    python3 bench/workers_bench.py even2 REPS
        the idle spread again (1000 sessions, 1 and 16 source addresses), REPS times.

Uses socksd from this checkout (src/), connload built by connect_bench.py's rule, ports
21420-21433. Loopback only, every run bounded; run one benchmark at a time on a machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from connect_bench import build  # noqa: E402

SRC = str(HERE.parent / "src")
CL = str(build(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "socksd-bench"))
PORT = 21420
T_ECHO, T_SINK, T_SOURCE = 21431, 21432, 21433
CTL = f"/tmp/socksd-workers-bench-{os.getpid()}.sock"
TICKS = os.sysconf("SC_CLK_TCK")


def port_open(p: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", p), timeout=0.2).close()
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                t = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(t[t.rindex(")") + 2 :].split()[1]) == pid:
                out.append(int(d))
    return sorted(out)


def cpu(pid: int) -> float:
    t = Path(f"/proc/{pid}/stat").read_text()
    f = t[t.rindex(")") + 2 :].split()
    return sum(int(x) for x in f[11:15]) / TICKS


def timewait() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            p = line.split()
            return int(p[p.index("tw") + 1])
    return 0


def wait_tw(limit: int = 30000, most: float = 40) -> None:
    t0 = time.monotonic()
    while timewait() > limit and time.monotonic() - t0 < most:
        time.sleep(1)


def start(
    workers: int, pin: str | None, shared: bool, control: bool = False
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "socksd",
        "serve",
        "--listen",
        f"127.0.0.1:{PORT}",
        "--access-log",
        "off",
        "--workers",
        str(workers),
    ]
    if control:
        cmd += ["--control-socket", CTL]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    env = dict(os.environ, PYTHONPATH=SRC)
    env.pop("SOCKSD_SHARED_ACCEPT", None)
    if shared:
        env["SOCKSD_SHARED_ACCEPT"] = "1"
    p = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    t0 = time.monotonic()
    while not port_open(PORT):
        if p.poll() is not None or time.monotonic() - t0 > 15:
            raise SystemExit("socksd did not start")
        time.sleep(0.05)
    time.sleep(0.5)
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def load(args: list[str], pin: str | None) -> dict[str, Any]:
    cmd = [CL, *args]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def procs(p: subprocess.Popen[bytes]) -> list[int]:
    kids = children(p.pid)
    return kids or [p.pid]


def scale(rounds: int, dur: float) -> None:
    for r in range(rounds):
        for w in (1, 2) if r % 2 == 0 else (2, 1):
            for kind in ("connrate", "bulk"):
                if kind == "connrate":
                    wait_tw()
                p = start(w, "1", False)
                try:
                    c0 = sum(cpu(x) for x in [p.pid, *children(p.pid)])
                    if kind == "connrate":
                        res = load(
                            [
                                "connrate",
                                "-p",
                                f"127.0.0.1:{PORT}",
                                "-T",
                                f"127.0.0.1:{T_ECHO}",
                                "-c",
                                "128",
                                "-d",
                                str(dur),
                                "--src-ips",
                                "16",
                            ],
                            "0",
                        )
                        fig = res["rate"]
                    else:
                        res = load(
                            [
                                "bulk",
                                "-p",
                                f"127.0.0.1:{PORT}",
                                "-T",
                                f"127.0.0.1:{T_SOURCE}",
                                "-c",
                                "8",
                                "--dir",
                                "down",
                                "-d",
                                str(dur),
                            ],
                            "0",
                        )
                        fig = res["MBps"]
                    c1 = sum(cpu(x) for x in [p.pid, *children(p.pid)])
                finally:
                    stop(p)
                print(
                    json.dumps(
                        {
                            "mode": "scale",
                            "round": r,
                            "workers": w,
                            "kind": kind,
                            "figure": fig,
                            "server_cpu_s": round(c1 - c0, 2),
                            "errors": res["errors"],
                        }
                    ),
                    flush=True,
                )


def sessions_per_worker() -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run(
        [sys.executable, "-m", "socksd", "sessions", "--control-socket", CTL, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    counts: dict[str, int] = {}
    for s in json.loads(out.stdout)["sessions"]:
        counts[str(s["worker"])] = counts.get(str(s["worker"]), 0) + 1
    return counts


def even(dur: float) -> None:
    for shared in (False, True):
        for src in (16, 1):
            wait_tw()
            p = start(2, None, shared)
            try:
                ws = procs(p)
                c0 = [cpu(x) for x in ws]
                res = load(
                    [
                        "connrate",
                        "-p",
                        f"127.0.0.1:{PORT}",
                        "-T",
                        f"127.0.0.1:{T_ECHO}",
                        "-c",
                        "128",
                        "-d",
                        str(dur),
                        "--src-ips",
                        str(src),
                    ],
                    None,
                )
                c1 = [cpu(x) for x in ws]
                sup = cpu(p.pid)
            finally:
                stop(p)
            print(
                json.dumps(
                    {
                        "mode": "even-connrate",
                        "shared": shared,
                        "src_ips": src,
                        "rate": res["rate"],
                        "errors": res["errors"],
                        "worker_cpu_s": [round(b - a, 2) for a, b in zip(c0, c1, strict=True)],
                        "supervisor_cpu_s": sup,
                    }
                ),
                flush=True,
            )
        for src in (16, 1):
            for n in (8, 1000):
                p = start(2, None, shared, control=True)
                try:
                    q = subprocess.Popen(
                        [
                            CL,
                            "idle",
                            "-p",
                            f"127.0.0.1:{PORT}",
                            "-T",
                            f"127.0.0.1:{T_ECHO}",
                            "-c",
                            str(n),
                            "-d",
                            "60",
                            "--src-ips",
                            str(src),
                            "--inflight",
                            "64" if n > 8 else "1",
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                    assert q.stdout is not None
                    ready = q.stdout.readline().strip()
                    counts = sessions_per_worker()
                    q.communicate(timeout=30)
                finally:
                    stop(p)
                print(
                    json.dumps(
                        {
                            "mode": "even-idle",
                            "shared": shared,
                            "src_ips": src,
                            "sessions": n,
                            "ready": ready,
                            "per_worker": counts,
                        }
                    ),
                    flush=True,
                )


def even2(reps: int) -> None:
    for rep in range(reps):
        for shared in (False, True):
            for src in (1, 16):
                p = start(2, None, shared, control=True)
                try:
                    q = subprocess.Popen(
                        [
                            CL,
                            "idle",
                            "-p",
                            f"127.0.0.1:{PORT}",
                            "-T",
                            f"127.0.0.1:{T_ECHO}",
                            "-c",
                            "1000",
                            "-d",
                            "60",
                            "--src-ips",
                            str(src),
                        ],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        text=True,
                    )
                    assert q.stdout is not None
                    ready = q.stdout.readline().strip()
                    counts = sessions_per_worker()
                    q.communicate(timeout=30)
                finally:
                    stop(p)
                print(
                    json.dumps(
                        {
                            "mode": "even2-idle",
                            "rep": rep,
                            "shared": shared,
                            "src_ips": src,
                            "ready": ready,
                            "per_worker": counts,
                        }
                    ),
                    flush=True,
                )


def main() -> None:
    pin = ["taskset", "-c", "0"] if sys.argv[1] == "scale" else []
    target = subprocess.Popen(
        [
            *pin,
            CL,
            "serve",
            "--echo",
            str(T_ECHO),
            "--sink",
            str(T_SINK),
            "--source",
            str(T_SOURCE),
            "--max-seconds",
            "900",
        ]
    )
    try:
        time.sleep(0.3)
        if sys.argv[1] == "scale":
            scale(int(sys.argv[2]), float(sys.argv[3]))
        elif sys.argv[1] == "even2":
            even2(int(sys.argv[2]))
        else:
            even(float(sys.argv[2]))
    finally:
        target.terminate()
        target.wait(5)


if __name__ == "__main__":
    main()
