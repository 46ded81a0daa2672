"""Splitting one recipe's jobs over several processes, GPUs or machines.

A shard is the K-th of N disjoint, deterministic slices of the *whole* job matrix — not of what
is left to do — so every process computes the same split without talking to the others, and a
re-run with the same N gives each shard the same jobs. Shards get whole batches (jobs that
share a denoising loop), balanced by cost, denoising steps × pixels.

Where the shard comes from, first match wins: `--shard K/N`; a launcher's rank and world size
(`accelerate launch`, `torchrun`: RANK / WORLD_SIZE); a Slurm job array
(SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batchgen.batching import make_batches
from batchgen.job import Job


class ShardError(ValueError):
    pass


@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    def __str__(self) -> str:
        return f"{self.index + 1}/{self.count}"

    @property
    def ledger_name(self) -> str:
        """This shard's own manifest file, under the run folder's manifests/."""
        return f"shard-{self.index + 1}-of-{self.count}.csv"


def parse_shard(text: str) -> Shard:
    """`K/N` with 1 ≤ K ≤ N, as a person counts."""
    number, slash, count = text.partition("/")
    if not (slash and number.strip().isdigit() and count.strip().isdigit()):
        raise ShardError(f"`--shard {text}` is not K/N, e.g. `--shard 1/4` for the first of four")
    k, n = int(number), int(count)
    if not 1 <= k <= n:
        raise ShardError(f"`--shard {text}`: K must be between 1 and N ({n})")
    return Shard(k - 1, n)


def shard_from_environment(env: Mapping[str, str] = os.environ) -> Shard | None:
    """The shard a launcher or scheduler gave this process, if any."""
    world_size = env.get("WORLD_SIZE")
    if world_size and int(world_size) > 1:
        return Shard(int(env.get("RANK", "0")), int(world_size))
    task_id, task_count = env.get("SLURM_ARRAY_TASK_ID"), env.get("SLURM_ARRAY_TASK_COUNT")
    if task_id and task_count and int(task_count) > 1:
        # Arrays may start at any number (--array=1-8): count from the array's first task.
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        return Shard(int(task_id) - first, int(task_count))
    return None


def launcher_device(resolved: str, env: Mapping[str, str] = os.environ) -> str:
    """Under a multi-process launcher each process takes its own GPU: `cuda` becomes
    `cuda:LOCAL_RANK`. A device named with its index is left as it is."""
    local_rank = env.get("LOCAL_RANK")
    if resolved == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    return resolved


def cost(job: Job) -> int:
    return max(job.steps_taken, 1) * job.width * job.height


def assign(jobs: Sequence[Job], count: int, unit: int) -> list[int]:
    """The shard index of each job. Jobs go in whole batches of `unit` (`make_batches` over
    the whole matrix; `unit` is a multiple of any batch size the run may choose, so no batch
    of a run straddles two shards and a sharded run renders each job in the batch a single
    run would), the costliest first, to the shard with the least work so far (ties to the
    lowest index): deterministic and balanced."""
    position = {job.id: index for index, job in enumerate(jobs)}
    chunks = [[position[job.id] for job in batch] for batch in make_batches(jobs, unit)]
    chunks.sort(key=lambda chunk: (-sum(cost(jobs[p]) for p in chunk), chunk[0]))
    loads = [(0, shard) for shard in range(count)]
    owner = [0] * len(jobs)
    for chunk in chunks:
        load, shard = heapq.heappop(loads)
        for index in chunk:
            owner[index] = shard
        heapq.heappush(loads, (load + sum(cost(jobs[p]) for p in chunk), shard))
    return owner
