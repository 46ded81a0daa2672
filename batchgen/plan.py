"""Which jobs a run still has to do: the recipe's jobs set against the run folder's manifest.

A job is done when the manifest's latest row for its id says `done` and its image is on disk
with the sha256 that row recorded; everything else is to do. Rows of jobs that the recipe no
longer has are kept and shown, never deleted. Torch-free, so `batchgen plan` answers at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from batchgen.batching import shard_unit
from batchgen.job import Job
from batchgen.matrix import expand
from batchgen.recipe import Recipe
from batchgen.shard import Shard, assign
from batchgen.store import IMAGES_DIR, Manifest, ManifestRow, image_filename

JobStatus = Literal["done", "failed", "todo"]
Redo = Literal["failed", "all"]


@dataclass(frozen=True)
class PlannedJob:
    job: Job
    status: JobStatus
    row: ManifestRow | None  # the manifest's latest row for this job, if any
    path: str  # where its image is (done) or goes, relative to the run folder
    mine: bool = True  # in this process's shard (always, when not sharded)
    note: str = ""  # why a job with a done row is to do again


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    dtype: str
    jobs: tuple[PlannedJob, ...]
    shard: Shard | None = None
    redo: Redo | None = None
    # The latest rows of jobs the recipe no longer makes: kept on disk and in the manifest.
    outside: tuple[ManifestRow, ...] = ()

    def count(self, status: JobStatus) -> int:
        return sum(1 for planned in self.jobs if planned.status == status)

    @property
    def done_here(self) -> int:
        """Jobs of this shard (of the whole matrix, when not sharded) already done."""
        return sum(1 for p in self.jobs if p.status == "done" and p.mine)

    @property
    def runs(self) -> list[PlannedJob]:
        """This shard's jobs that a run makes, in job order: those not done, or with `redo`
        only the failed ones, or every one."""
        return [p for p in self.jobs if p.mine and _redone(p.status, self.redo)]

    @property
    def to_run(self) -> list[Job]:
        return [planned.job for planned in self.runs]

    @property
    def steps_to_run(self) -> int:
        return sum(job.steps_taken for job in self.to_run)

    @property
    def megapixel_steps_to_run(self) -> float:
        """Cost estimate: denoising steps × megapixels, what UNet time grows with."""
        return sum(job.steps_taken * job.width * job.height / 1e6 for job in self.to_run)


def _redone(status: JobStatus, redo: Redo | None) -> bool:
    if redo == "all":
        return True
    if redo == "failed":
        return status == "failed"
    return status != "done"


def file_sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _status(run_dir: Path, row: ManifestRow | None) -> tuple[JobStatus, str]:
    """The job's status from its latest row and its image file, and why a done row does
    not count."""
    if row is None:
        return "todo", ""
    if row.status == "failed":
        return "failed", ""
    sha256 = file_sha256(run_dir / row.path)
    if sha256 is None:
        return "todo", f"{row.path} is missing"
    if sha256 != row.sha256:
        return "todo", f"{row.path} changed on disk since it was made"
    return "done", ""


def _new_image_path(job: Job, index_width: int, claimed: dict[str, str]) -> str:
    """`images/<name>` for a job to make; when a row of another job already names that file
    (an edited recipe renumbers jobs; the name does not show every parameter), the job's
    id is added so that no done image is ever overwritten."""
    path = f"{IMAGES_DIR}/{image_filename(job, index_width)}"
    if claimed.get(path, job.id) != job.id:
        path = path.removesuffix(".png") + f"-{job.id[:8]}.png"
    return path


def make_plan(
    recipe: Recipe,
    dtype: str,
    shard: Shard | None = None,
    redo: Redo | None = None,
    batch_size: int | Literal["auto"] = "auto",
) -> Plan:
    manifest = Manifest(recipe.output)
    latest = manifest.latest()
    claimed = {row.path: row.id for row in manifest.rows() if row.path}
    jobs = list(expand(recipe, dtype))
    index_width = max(4, len(str(len(jobs))))
    owners = assign(jobs, shard.count, shard_unit(batch_size)) if shard else [0] * len(jobs)
    planned = []
    for job, owner in zip(jobs, owners, strict=True):
        row = latest.get(job.id)
        status, note = _status(recipe.output, row)
        path = row.path if row and row.path else _new_image_path(job, index_width, claimed)
        mine = shard is None or owner == shard.index
        planned.append(PlannedJob(job, status, row, path, mine, note))
    in_recipe = {job.id for job in jobs}
    outside = tuple(row for job_id, row in latest.items() if job_id not in in_recipe)
    return Plan(recipe, dtype, tuple(planned), shard, redo, outside)
