"""torch's threads within a container's CPU quota (``backends/cpu_quota.py``): a pod
limited to 4 CPUs on a 64-core node ran each forward pass on 64 threads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mandant.backends import cpu_quota
from mandant.backends.cpu_quota import cpu_quota as quota_of


@pytest.mark.parametrize(
    ("v2", "v1", "cpus"),
    [
        ("400000 100000\n", None, 4.0),
        ("150000 100000\n", None, 1.5),
        ("max 100000\n", None, None),
        (None, ("200000", "100000"), 2.0),  # cgroup v1
        (None, ("-1", "100000"), None),
        (None, None, None),  # no cgroup files: no quota known
    ],
)
def test_the_quota_is_read_from_cgroup_v2_or_v1(
    tmp_path: Path, v2: str | None, v1: tuple[str, str] | None, cpus: float | None
) -> None:
    cpu_max, quota, period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    if v2 is not None:
        cpu_max.write_text(v2)
    if v1 is not None:
        quota.write_text(v1[0] + "\n")
        period.write_text(v1[1] + "\n")
    assert quota_of(cpu_max, quota, period) == cpus


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    ("quota", "chosen", "threads"),
    [(1.0, None, 1), (0.5, None, 1), (1.5, None, 2), (None, None, 2), (1.0, "2", 2)],
)
def test_torch_threads_are_cut_to_the_quota_unless_the_operator_chose(
    monkeypatch: pytest.MonkeyPatch, quota: float | None, chosen: str | None, threads: int
) -> None:
    monkeypatch.setattr(cpu_quota, "cpu_quota", lambda: quota)
    for name in cpu_quota.CHOSEN:
        monkeypatch.delenv(name, raising=False)
    if chosen is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", chosen)
    assert cpu_quota.fit_threads_to_quota.__wrapped__() == threads
    assert torch.get_num_threads() == threads
