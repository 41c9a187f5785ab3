"""How many workers ``workers = auto`` starts: the CPUs this process may use, not the host's."""

from __future__ import annotations

import os

import pytest

from socksd.config import build_config
from socksd.server.process import workers
from socksd.server.process.workers import quota_cpus, usable_cpus, worker_count


@pytest.mark.parametrize(
    ("text", "cpus"),
    [
        ("max 100000\n", None),  # no quota
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up
        ("100000 100000", 1),
        ("20000 100000", 1),  # a fifth of a CPU is still one worker
        ("400000 100000", 4),
        ("", None),
        ("100000 0", None),
        ("a b", None),
    ],
)
def test_quota(text: str, cpus: int | None) -> None:
    assert quota_cpus(text) == cpus


def test_auto_counts_the_cpus_this_process_may_run_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the host's
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3}, raising=False)  # taskset -c 3
    assert usable_cpus() == 1
    assert worker_count(build_config({"workers": "auto"}, {})) == 1
    assert worker_count(build_config({"workers": 3}, {})) == 3


def test_auto_is_capped_by_the_cgroup_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    real = workers.Path.read_text

    def read_text(path: workers.Path, *args: object, **kwargs: object) -> str:
        if str(path) == "/proc/self/cgroup":
            return "0::/box\n"
        if str(path) == "/sys/fs/cgroup/box/cpu.max":
            return "250000 100000\n"
        return real(path)

    monkeypatch.setattr(workers.Path, "read_text", read_text)
    assert usable_cpus() == 3
