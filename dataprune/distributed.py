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


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
