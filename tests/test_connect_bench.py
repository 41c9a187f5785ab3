"""The CONNECT benchmark's driver (bench/connect_bench.py): its figures and its argument checks.

Only the pure parts: nothing here starts a server or times anything.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

PATH = Path(__file__).resolve().parents[1] / "bench" / "connect_bench.py"


@pytest.fixture(scope="module")
def cb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("connect_bench", PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["connect_bench"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_median_and_spread(cb: ModuleType) -> None:
    assert cb.median_spread([3.0, 1.0, 2.0]) == (2.0, 100.0)
    assert cb.median_spread([4.0, None, 6.0]) == (5.0, 40.0)
    assert cb.median_spread([7.0]) == (7.0, None)
    assert cb.median_spread([None]) == (None, None)


def test_ratio(cb: ModuleType) -> None:
    assert cb.ratio(3.0, 2.0) == 1.5
    assert cb.ratio(None, 2.0) is None
    assert cb.ratio(3.0, 0.0) is None


def test_fmt(cb: ModuleType) -> None:
    assert [cb.fmt(v) for v in (None, 31297.4, 42.42, 4.712, 0.3971)] == [
        "-",
        "31297",
        "42.4",
        "4.71",
        "0.397",
    ]


@pytest.mark.parametrize("port", [21000, 21500, 21999])
def test_ports_in_range(cb: ModuleType, port: int) -> None:
    assert cb.check_port(port) == port


@pytest.mark.parametrize("port", [80, 20999, 22000])
def test_ports_out_of_range(cb: ModuleType, port: int) -> None:
    with pytest.raises(ValueError, match="outside 21000-21999"):
        cb.check_port(port)


def test_extra(cb: ModuleType) -> None:
    assert cb.parse_extra("mine=./srv --port {port}", "21400") == (
        "mine",
        "./srv --port {port}",
        21400,
    )
    for spec, port in (("no-command", "21400"), ("=cmd", "21400"), ("x=y", "1080")):
        with pytest.raises(ValueError):
            cb.parse_extra(spec, port)


def test_workloads(cb: ModuleType) -> None:
    assert cb.pick_workloads("idle-1000,connrate-128") == ["connrate-128", "idle-1000"]
    assert cb.pick_workloads("") == list(cb.WORKLOADS)
    with pytest.raises(ValueError, match="unknown"):
        cb.pick_workloads("connrate-7")
    # the run order holds every workload once: bulk, then idle, then connrate
    assert sorted(cb.RUN_ORDER) == sorted(cb.WORKLOADS)
    assert cb.RUN_ORDER[0].startswith("bulk")
    assert cb.RUN_ORDER[-1].startswith("connrate")


@pytest.mark.parametrize(
    "argv",
    [
        ["--extra", "x=y", "80"],
        ["--extra", "x=y", "21101"],  # the target's echo port
        ["--workloads", "nope"],
        ["--reps", "0"],
        ["--port-base", "21990"],  # its anchors would pass 21999
        ["--src-ips", "300"],
    ],
)
def test_bad_arguments_stop_before_anything_starts(
    cb: ModuleType, argv: list[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as e:
        cb.main([*argv, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert not (tmp_path / "out").exists()


def rows() -> list[dict[str, Any]]:
    """Two repetitions of connrate-128 and bulk-up-1 for socksd and an anchor, one failure."""
    out: list[dict[str, Any]] = []
    for rate, cpu, mb in ((5000.0, 4.0, 2000.0), (6000.0, 5.0, 3000.0)):
        out.append({"server": "socksd", "workload": "connrate-128", "rate": rate,
                    "ok_total": rate * 4, "server_cpu_s": cpu, "errors": 0,
                    "p50_us": 100.0, "p99_us": 900.0})  # fmt: skip
        out.append({"server": "socksd", "workload": "bulk-up-1", "MBps": mb,
                    "bytes_total": mb * 1e6 * 4, "server_cpu_s": 2.0})  # fmt: skip
    out.append({"server": "anchor", "workload": "connrate-128", "rate": 4400.0,
                "ok_total": 17600.0, "server_cpu_s": 4.0, "errors": 0})  # fmt: skip
    out.append({"server": "anchor", "workload": "connrate-128", "error": "it died"})
    out.append({"server": "direct", "workload": "bulk-up-1", "MBps": 5000.0,
                "bytes_total": 2e10, "server_cpu_s": None})  # fmt: skip
    return out


def test_medians_skip_failed_runs(cb: ModuleType) -> None:
    med = cb.medians(rows())
    assert med[("connrate-128", "sessions/s", "socksd")] == (5500.0, pytest.approx(1000 / 55))
    assert med[("connrate-128", "sessions/s", "anchor")] == (4400.0, None)
    # sessions per server CPU-second: 20000/4 and 24000/5
    assert med[("connrate-128", "sessions per server CPU-s", "socksd")][0] == 4900.0
    # CPU-s per GB: 2 s over 8 GB and over 12 GB
    assert med[("bulk-up-1", "server CPU-s per GB", "socksd")][0] == pytest.approx(
        (0.25 + 2 / 12) / 2
    )
    assert med[("bulk-up-1", "server CPU-s per GB", "direct")] == (None, None)


def test_tables(cb: ModuleType) -> None:
    lines = cb.tables(rows(), ["direct", "socksd", "anchor"], ["socksd"])
    assert lines[0] == "| workload | metric | direct | socksd | anchor |"
    assert "| connrate-128 | sessions/s | - | 5500 [18%] | 4400 (a run failed) |" in lines
    assert "| bulk-up-1 | MB/s | 5000 | 2500 [40%] | - |" in lines
    head = "| workload | metric | socksd / direct | socksd / anchor |"
    assert head in lines
    ratios = lines[lines.index(head) :]
    assert "| connrate-128 | sessions/s | - | 1.25 |" in ratios
    assert "| bulk-up-1 | MB/s | 0.500 | - |" in ratios
    assert not any("errors" in line for line in ratios)  # no ratio of error counts
    assert cb.noise_line(rows()).startswith("Noise: spread over")
