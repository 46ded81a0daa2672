"""Which jobs a run still has to do: the recipe's jobs set against the run folder's manifest.

A job is done when the manifest's latest row for its id says `done` and its image is on disk;
everything else is to do. Torch-free, so `batchgen plan` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from batchgen.job import Job
from batchgen.matrix import expand
from batchgen.recipe import Recipe
from batchgen.shard import Shard, assign
from batchgen.store import Manifest, ManifestRow

JobStatus = Literal["done", "failed", "todo"]


@dataclass(frozen=True)
class PlannedJob:
    job: Job
    status: JobStatus
    row: ManifestRow | None  # the manifest's latest row for this job, if any
    mine: bool = True  # in this process's shard (always, when not sharded)


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    dtype: str
    jobs: tuple[PlannedJob, ...]
    shard: Shard | None = None

    def count(self, status: JobStatus) -> int:
        return sum(1 for planned in self.jobs if planned.status == status)

    @property
    def done_here(self) -> int:
        """Jobs of this shard (of the whole matrix, when not sharded) already done."""
        return sum(1 for p in self.jobs if p.status == "done" and p.mine)

    @property
    def to_run(self) -> list[Job]:
        """This shard's jobs that are not done, in job order."""
        return [p.job for p in self.jobs if p.status != "done" and p.mine]

    @property
    def steps_to_run(self) -> int:
        return sum(job.steps_taken for job in self.to_run)

    @property
    def megapixel_steps_to_run(self) -> float:
        """Cost estimate: denoising steps × megapixels, what UNet time grows with."""
        return sum(job.steps_taken * job.width * job.height / 1e6 for job in self.to_run)


def _is_done(run_dir: Path, row: ManifestRow | None) -> bool:
    return row is not None and row.status == "done" and (run_dir / row.path).is_file()


def make_plan(recipe: Recipe, dtype: str, shard: Shard | None = None) -> Plan:
    latest = Manifest(recipe.output).latest()
    jobs = list(expand(recipe, dtype))
    owners = assign(jobs, shard.count) if shard else [0] * len(jobs)
    planned = []
    for job, owner in zip(jobs, owners, strict=True):
        row = latest.get(job.id)
        if _is_done(recipe.output, row):
            status: JobStatus = "done"
        elif row is not None and row.status == "failed":
            status = "failed"
        else:
            status = "todo"
        planned.append(PlannedJob(job, status, row, shard is None or owner == shard.index))
    return Plan(recipe, dtype, tuple(planned), shard)
