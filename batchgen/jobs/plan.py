"""Which jobs a run still has to do: the recipe's jobs set against the run folder's manifest.

A job is done when the manifest's latest row for its id says `done` and its image is on disk
with the sha256 that row recorded; everything else is to do. Rows of jobs that the recipe no
longer has are kept and shown, never deleted. Torch-free, so `batchgen plan` answers at once.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from batchgen.jobs.batching import shard_unit
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import expand
from batchgen.jobs.shard import Shard, assign
from batchgen.recipe.load import Recipe
from batchgen.store.files import IMAGES_DIR
from batchgen.store.images import image_filename
from batchgen.store.manifest import Manifest, ManifestRow

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
    shard_batches: int = 0  # how many whole batches the sweep is split in, when sharded

    @property
    def has_mine(self) -> bool:
        """Whether this shard was given any job (a shard beyond the sweep's batches is not)."""
        return any(p.mine for p in self.jobs)

    @property
    def done_here(self) -> int:
        """Jobs of this shard (of the whole matrix, when not sharded) already done."""
        return sum(1 for p in self.jobs if p.status == "done" and p.mine)

    @property
    def runs(self) -> list[PlannedJob]:
        """This shard's jobs that a run makes, in job order: those not done, or with `redo`
        only the failed ones, or every one."""
        return [p for p in self.jobs if p.mine and _redone(p.status, self.redo)]

    def summarize(self, keep: int | None = 50, columns: Columns | None = None) -> PlanSummary:
        tally = _Tally(self.recipe, self.dtype, self.shard, self.redo, keep, columns or {})
        for planned in self.jobs:
            tally.add(planned)
        return tally.summary(tuple(tally.head), self.outside)


# A view of a job as text, by name (the columns `plan` prints): a summary says which differ.
Columns = Mapping[str, Callable[[Job], str]]


@dataclass(frozen=True)
class PlanSummary:
    """What `plan` and `status` show of a plan: its figures and its first jobs, gathered in
    one pass over the jobs, so that its size does not grow with the recipe's."""

    recipe: Recipe
    dtype: str
    total: int
    counts: Mapping[JobStatus, int]
    to_run: int  # how many of this shard's jobs a run makes (Plan.runs)
    steps_to_run: int
    megapixel_steps_to_run: float
    head: tuple[PlannedJob, ...]  # the first jobs, in job order (all of them when asked)
    varying: frozenset[str]  # the columns whose text is not the same for every job
    outside: tuple[ManifestRow, ...]
    shard: Shard | None
    redo: Redo | None

    def count(self, status: JobStatus) -> int:
        return self.counts.get(status, 0)


class _Tally:
    """Adds up a plan's jobs one at a time for a PlanSummary."""

    def __init__(
        self,
        recipe: Recipe,
        dtype: str,
        shard: Shard | None,
        redo: Redo | None,
        keep: int | None,
        columns: Columns,
    ) -> None:
        self.recipe, self.dtype, self.shard, self.redo = recipe, dtype, shard, redo
        self.keep, self.columns = keep, columns
        self.total = self.to_run = self.steps_to_run = 0
        self.megapixel_steps_to_run = 0.0
        self.counts: Counter[JobStatus] = Counter()
        self.head: list[PlannedJob] = []
        self.first: dict[str, str] = {}
        self.varying: set[str] = set()

    def add(self, planned: PlannedJob) -> None:
        job = planned.job
        self.total += 1
        self.counts[planned.status] += 1
        if planned.mine and _redone(planned.status, self.redo):
            self.to_run += 1
            self.steps_to_run += job.steps_taken
            self.megapixel_steps_to_run += _megapixel_steps(job)
        if self.keep is None or len(self.head) < self.keep:
            self.head.append(planned)
        if not self.first:
            self.first = {name: show(job) for name, show in self.columns.items()}
            return
        for name, show in self.columns.items():
            if name not in self.varying and show(job) != self.first[name]:
                self.varying.add(name)

    def summary(
        self, head: tuple[PlannedJob, ...], outside: tuple[ManifestRow, ...]
    ) -> PlanSummary:
        return PlanSummary(
            self.recipe,
            self.dtype,
            self.total,
            dict(self.counts),
            self.to_run,
            self.steps_to_run,
            self.megapixel_steps_to_run,
            head,
            frozenset(self.varying),
            outside,
            self.shard,
            self.redo,
        )


def _megapixel_steps(job: Job) -> float:
    """Cost estimate: denoising steps × megapixels, what UNet time grows with."""
    return job.steps_taken * job.width * job.height / 1e6


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


def image_sha256s(run_dir: Path, paths: Iterable[str]) -> dict[str, str | None]:
    """Each image's sha256 (None: unreadable), by path, hashed on several threads: checking
    that a large folder's done images are unchanged reads gigabytes, and hashlib and file
    reads let go of the GIL."""
    paths = sorted(set(paths))
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = pool.map(lambda path: file_sha256(run_dir / path), paths)
        return dict(zip(paths, digests, strict=True))


def _status(
    row: ManifestRow | None, image_sha256: Callable[[str], str | None]
) -> tuple[JobStatus, str]:
    """The job's status from its latest row and the sha256 of the image it names, and why a
    done row does not count."""
    if row is None:
        return "todo", ""
    if row.status == "failed":
        return "failed", ""
    sha256 = image_sha256(row.path)
    if sha256 is None:
        return "todo", f"{row.path} is missing"
    if sha256 != row.sha256:
        return "todo", f"{row.path} changed on disk since it was made"
    return "done", ""


# Jobs whose images `summarize_plan` checks together: enough to keep the threads busy, few
# enough that its memory does not grow with the recipe.
CHECK_CHUNK = 256


def _index_width(job_count: int) -> int:
    """Digits of the job number in image names: 0001 … 9999, then as many as needed."""
    return max(4, len(str(job_count)))


class _Ledger:
    """What planning needs of the run folder's manifest, and which of its jobs the recipe
    has made so far."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        rows, self.latest = Manifest(run_dir).rows_and_latest()  # latest: job id → its row
        # image path → the id of the job whose row names it
        self.claimed = {row.path: row.id for row in rows if row.path}
        self._sha256s: dict[str, str | None] = {}  # image path → sha256, once checked
        self._not_planned = dict(self.latest)

    def check_images(self, jobs: Iterable[Job]) -> None:
        """Hash, together on several threads, the images that these jobs' done rows name,
        ahead of `planned` asking for them one by one. Only these: the images of rows that
        the recipe no longer has are never read."""
        rows = (self.latest.get(job.id) for job in jobs)
        paths = {row.path for row in rows if row and row.status == "done" and row.path}
        self._sha256s.update(image_sha256s(self.run_dir, paths - self._sha256s.keys()))

    def _image_sha256(self, path: str) -> str | None:
        if path not in self._sha256s:  # not checked ahead
            self._sha256s[path] = file_sha256(self.run_dir / path)
        return self._sha256s[path]

    def planned(self, job: Job, mine: bool, index_width: int | None) -> PlannedJob:
        """The job's status and image path: its row's, or a new one (left empty without
        `index_width`: see summarize_plan)."""
        self._not_planned.pop(job.id, None)
        row = self.latest.get(job.id)
        status, note = _status(row, self._image_sha256)
        if row and row.path:
            path = row.path
        else:
            path = self.new_path(job, index_width) if index_width else ""
        return PlannedJob(job, status, row, path, mine, note)

    def new_path(self, job: Job, index_width: int) -> str:
        """`images/<name>` for a job to make; when a row of another job already names that
        file (an edited recipe renumbers jobs; the name does not show every parameter), the
        job's id is added so that no done image is ever overwritten."""
        path = f"{IMAGES_DIR}/{image_filename(job, index_width)}"
        if self.claimed.get(path, job.id) != job.id:
            path = path.removesuffix(".png") + f"-{job.id[:8]}.png"
        return path

    @property
    def outside(self) -> tuple[ManifestRow, ...]:
        """The latest rows of jobs not planned, in manifest order."""
        return tuple(self._not_planned.values())


def make_plan(
    recipe: Recipe,
    dtype: str,
    shard: Shard | None = None,
    redo: Redo | None = None,
    batch_size: int | Literal["auto"] = "auto",
) -> Plan:
    ledger = _Ledger(recipe.output)
    jobs = list(expand(recipe, dtype))
    ledger.check_images(jobs)
    index_width = _index_width(len(jobs))
    split = assign(jobs, shard.count, shard_unit(batch_size)) if shard else None
    owners = split.owners if split else [0] * len(jobs)
    planned = tuple(
        ledger.planned(
            job,
            mine=shard is None or owner == shard.index,
            index_width=index_width,
        )
        for job, owner in zip(jobs, owners, strict=True)
    )
    batches = split.batches if split else 0
    return Plan(recipe, dtype, planned, shard, redo, ledger.outside, batches)


def summarize_plan(
    recipe: Recipe,
    dtype: str,
    shard: Shard | None = None,
    redo: Redo | None = None,
    batch_size: int | Literal["auto"] = "auto",
    keep: int | None = 50,
    columns: Columns | None = None,
) -> PlanSummary:
    """`make_plan(...).summarize(keep, columns)`, for a recipe of any size: jobs are made,
    tallied and dropped one at a time (a shard's plan still needs them all together: its
    split is over the whole matrix)."""
    if shard is not None:
        return make_plan(recipe, dtype, shard, redo, batch_size).summarize(keep, columns)
    ledger = _Ledger(recipe.output)
    tally = _Tally(recipe, dtype, shard, redo, keep, columns or {})
    jobs = expand(recipe, dtype)
    while chunk := list(itertools.islice(jobs, CHECK_CHUNK)):
        ledger.check_images(chunk)
        for job in chunk:
            tally.add(ledger.planned(job, mine=True, index_width=None))
    # A new image's name holds the job number padded to the job count, known only now.
    index_width = _index_width(tally.total)
    head = tuple(
        planned
        if planned.path
        else replace(planned, path=ledger.new_path(planned.job, index_width))
        for planned in tally.head
    )
    return tally.summary(head, ledger.outside)
