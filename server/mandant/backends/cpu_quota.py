"""torch's CPU threads within the container's CPU quota.

PyTorch sizes its intra-op thread pool by the cores it sees (every core of the node),
not by a CFS quota (Kubernetes' ``limits.cpu``): on a 64-core node a pod limited to 4
CPUs ran each forward pass on 64 threads and was throttled for most of each period.
At the first torch model's load the pool is cut to the quota, rounded up, unless the
operator chose (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS`` set) or the quota is none.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: cgroup v2's quota ("max 100000" or "400000 100000"), and v1's two files.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
CFS_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
CFS_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
#: Variables by which the operator sets the threads himself.
CHOSEN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_quota(
    cpu_max: Path = CPU_MAX, cfs_quota: Path = CFS_QUOTA, cfs_period: Path = CFS_PERIOD
) -> float | None:
    """The CPUs this process's cgroup may use per period, or None (no quota, or no
    cgroup file to say)."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota, period = cfs_quota.read_text().strip(), cfs_period.read_text().strip()
        except OSError:
            return None
    try:
        cpus = int(quota) / int(period)
    except ValueError:  # "max"
        return None
    return cpus if cpus > 0 else None  # v1 says -1 for none


@functools.cache
def fit_threads_to_quota() -> int:
    """Cut torch's intra-op threads to the CPU quota (module doc), once per process;
    the threads it uses."""
    threads = torch.get_num_threads()
    quota = cpu_quota()
    if quota is None or any(os.environ.get(name) for name in CHOSEN):
        return threads
    fitted = max(1, math.ceil(quota))
    if fitted < threads:
        torch.set_num_threads(fitted)
        logger.info(
            "torch runs on %d threads, the container's CPU quota (%.2f CPUs), not on the "
            "%d cores it sees (set OMP_NUM_THREADS to choose)",
            fitted,
            quota,
            threads,
        )
        return fitted
    return threads
