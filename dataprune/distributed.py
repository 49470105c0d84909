"""Where this process stands in a torchrun job, and what it owns: rank / world size from the
environment, the shard split every stage uses, and the cores it may use."""

from __future__ import annotations

import os


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE): they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def rank_shards(shards: list, rank: int, world: int) -> list:
    """The shards a torchrun rank trains on, embeds and scores: the same split everywhere, so a
    rank's training statistics and embeddings cover exactly the parts it writes."""
    return shards[rank::world]


CGROUP_ROOT = "/sys/fs/cgroup"  # where a container sees its own cgroup (its namespace's root)


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (what taskset or a cpuset leaves it), and no
    more than its cgroup's CPU quota (``docker --cpus``, a Kubernetes CPU limit), rounded up."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpus(CGROUP_ROOT)
    return max(1, min(n, -int(-quota // 1))) if quota is not None else n


def cgroup_cpus(root: str) -> float | None:
    """The CPU quota under ``root`` in CPUs: cgroup v2's ``cpu.max`` ("200000 100000": 2), or v1's
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None when unlimited, absent or unreadable."""
    def read(*parts: str) -> str | None:
        try:
            with open(os.path.join(root, *parts)) as f:
                return f.read().strip()
        except OSError:
            return None

    try:
        v2 = read("cpu.max")
        if v2 is not None:
            quota, period = (v2.split() + ["100000"])[:2]
            return None if quota == "max" else _positive(int(quota) / int(period))
        for d in ("cpu", "cpu,cpuacct"):
            quota, period = read(d, "cpu.cfs_quota_us"), read(d, "cpu.cfs_period_us")
            if quota is not None and period is not None:
                return None if int(quota) < 0 else _positive(int(quota) / int(period))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _positive(x: float) -> float | None:
    return x if x > 0 else None
