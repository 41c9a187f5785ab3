"""What the metrics add to one CONNECT session, in microseconds: the hooks a session calls
(admitted, handshake done, connected, finished), run in a loop, in one process and in a worker's
multiprocess mode (values in memory-mapped files). No sockets: only the metrics' own cost.

    PYTHONPATH=src python3 bench/metrics_cost.py [--sessions 200000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from socksd.accesslog import SessionRecord


def measure(mode: str, sessions: int) -> float:
    if mode == "single":
        from socksd.metrics import single_process

        metrics, _ = single_process(())
    else:
        from socksd.metrics import enable_multiprocess, worker_metrics

        path = enable_multiprocess()
        metrics = worker_metrics(())
    record = SessionRecord("192.0.2.1:5", time.time(), command="CONNECT", reply=0)
    record.bytes_up, record.bytes_down = 32, 32
    start = time.perf_counter()
    for _ in range(sessions):
        metrics.opened()
        metrics.handshake_done(0.0003)
        metrics.connected(0.0001, True)
        metrics.finished(record)
    elapsed = time.perf_counter() - start
    if mode != "single":
        shutil.rmtree(path)
    return elapsed / sessions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--mode", choices=("single", "multiprocess"))
    args = parser.parse_args()
    if args.mode:
        print(f"{measure(args.mode, args.sessions):.2f}")
        return
    for mode in ("single", "multiprocess"):  # each in a fresh process: the mode is per process
        out = subprocess.run(
            [sys.executable, __file__, "--mode", mode, "--sessions", str(args.sessions)],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        ).stdout.strip()
        print(f"{mode}: {out} us per session")


if __name__ == "__main__":
    main()
