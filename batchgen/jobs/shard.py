"""Splitting one recipe's jobs over several processes, GPUs or machines.

A shard is the K-th of N disjoint, deterministic slices of the *whole* job matrix — not of what
is left to do — so every process computes the same split without talking to the others, and a
re-run with the same N gives each shard the same jobs. Shards get whole batches (jobs that
share a denoising loop), balanced by cost, denoising steps × pixels.

Where the shard comes from, first match wins: `--shard K/N`; a launcher's rank and world size
(`accelerate launch`, `torchrun`: RANK / WORLD_SIZE); a Slurm job array, whose task ids may
start anywhere and go in steps (SLURM_ARRAY_TASK_ID, _MIN, _MAX, _STEP, _COUNT).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from batchgen.errors import BatchgenError
from batchgen.jobs.batching import make_batches
from batchgen.jobs.job import Job


class ShardError(BatchgenError):
    """A shard that is not K/N, or that a launcher's variables do not name."""


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
    """The shard a launcher or scheduler gave this process, if any. Raises ShardError when
    the variables do not name one shard (a Slurm array whose ids are not evenly spaced)."""
    world_size = env.get("WORLD_SIZE")
    if world_size and int(world_size) > 1:
        return Shard(int(env.get("RANK", "0")), int(world_size))
    if env.get("SLURM_ARRAY_TASK_ID") and env.get("SLURM_ARRAY_TASK_COUNT"):
        return _slurm_array_shard(env)
    return None


def _slurm_array_shard(env: Mapping[str, str]) -> Shard | None:
    """The task's position among the array's ids: `--array=4-10:2` is 4, 6, 8, 10, so task 8
    is shard 3/4. Only an evenly spaced array tells every task its position; a list such as
    `--array=1,2,5` does not (Slurm gives its lowest and highest id and a count, not the
    ids). An array of one task is the whole sweep."""
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    if count <= 1:
        return None
    first = int(env.get("SLURM_ARRAY_TASK_MIN", task))
    step = int(env.get("SLURM_ARRAY_TASK_STEP", 1)) or 1
    last = int(env.get("SLURM_ARRAY_TASK_MAX", first + step * (count - 1)))
    position, off_step = divmod(task - first, step)
    if last == first + step * (count - 1) and not off_step and 0 <= position < count:
        return Shard(position, count)
    raise ShardError(
        f"Slurm array task {task} has no shard: the array's {count} task ids from {first} to "
        f"{last} are not evenly spaced, so its position among them is unknown. Use an evenly "
        f"spaced --array (e.g. --array=0-{count - 1}), or name the shard yourself: "
        f"`batchgen run … --shard K/N` (to re-run some tasks of an array of N, e.g. "
        f"`--shard $((SLURM_ARRAY_TASK_ID + 1))/N` with the same --array ids as before)"
    )


def cost(job: Job) -> int:
    return max(job.steps_taken, 1) * job.width * job.height


@dataclass(frozen=True)
class Split:
    owners: list[int]  # the shard index of each job
    batches: int  # how many whole batches the sweep was split in


def assign(jobs: Sequence[Job], count: int, unit: int) -> Split:
    """Which shard makes each job. Jobs go in whole batches of `unit` (`make_batches` over
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
    return Split(owner, len(chunks))
