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
from batchgen.store import Manifest, ManifestRow

JobStatus = Literal["done", "failed", "todo"]


@dataclass(frozen=True)
class PlannedJob:
    job: Job
    status: JobStatus
    row: ManifestRow | None  # the manifest's latest row for this job, if any


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    dtype: str
    jobs: tuple[PlannedJob, ...]

    def count(self, status: JobStatus) -> int:
        return sum(1 for planned in self.jobs if planned.status == status)

    @property
    def to_run(self) -> list[Job]:
        return [planned.job for planned in self.jobs if planned.status != "done"]

    @property
    def steps_to_run(self) -> int:
        return sum(job.steps_taken for job in self.to_run)

    @property
    def megapixel_steps_to_run(self) -> float:
        """Cost estimate: denoising steps × megapixels, what UNet time grows with."""
        return sum(job.steps_taken * job.width * job.height / 1e6 for job in self.to_run)


def _is_done(run_dir: Path, row: ManifestRow | None) -> bool:
    return row is not None and row.status == "done" and (run_dir / row.path).is_file()


def make_plan(recipe: Recipe, dtype: str) -> Plan:
    manifest = Manifest(recipe.output)
    latest = manifest.latest() if manifest.path.exists() else {}
    planned = []
    for job in expand(recipe, dtype):
        row = latest.get(job.id)
        if _is_done(recipe.output, row):
            status: JobStatus = "done"
        elif row is not None and row.status == "failed":
            status = "failed"
        else:
            status = "todo"
        planned.append(PlannedJob(job, status, row))
    return Plan(recipe, dtype, tuple(planned))
