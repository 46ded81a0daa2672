"""Writing finished jobs off the render loop: PNG encoding, hashing, the atomic write, the
intermediates strip and the manifest row happen on one background thread, in job order,
while the next batch renders.

The queue is bounded, so a slow disk slows the renderer instead of filling memory. A kill
loses only what is still queued: those jobs have no row yet and are made again, and the
atomic write means no half image is ever left under a final name.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from batchgen.jobs.plan import PlannedJob
from batchgen.models.source import ModelSource
from batchgen.running.progress import Reporter
from batchgen.store.files import PNG_COMPRESS_LEVEL
from batchgen.store.images import a1111_parameters, write_image
from batchgen.store.manifest import Manifest, ManifestRow
from batchgen.views.intermediates import Frame, write_strip


class StorageError(OSError):
    """The run folder cannot be written (full disk, permissions): the run stops, and what it
    made so far stays recorded."""


def strip_path(image_path: str) -> Path:
    """The intermediates strip of an image, relative to the run folder."""
    return Path("intermediates") / f"{Path(image_path).stem}.png"


@dataclass(frozen=True)
class FinishedJob:
    """A rendered job (or one that failed to render), ready to be written and recorded."""

    planned: PlannedJob
    model: ModelSource
    vae: ModelSource | None  # the recipe's `vae:`, which replaces the model's own
    image: Image.Image | None  # None when rendering failed
    error: str  # "ExceptionType: message" when rendering failed
    seconds: float  # its share of its batch's render time
    device: str
    batch_size: int  # jobs in its denoising loop
    fast_paths: str  # the speed-ups that were on
    frames: tuple[Frame, ...] = ()  # intermediates, when the recipe asks for them
    frames_note: str = ""


def describe(row: ManifestRow) -> str:
    what = f"job {row.index} {row.path or row.id}"
    if row.status == "done":
        return f"{what} ({row.steps_taken} steps, {row.seconds:.2f}s)"
    return f"{what} FAILED: {row.error}"


def write_finished(
    run_dir: Path, finished: FinishedJob, compress_level: int = PNG_COMPRESS_LEVEL
) -> ManifestRow:
    """Write the job's files and return its manifest row; StorageError when the folder
    cannot be written. `compress_level` is the image's zlib level (strips keep the default)."""
    planned = finished.planned
    job, path = planned.job, planned.path
    sha256 = ""
    if finished.image is not None:
        try:
            vae = finished.vae
            parameters = a1111_parameters(
                job,
                finished.model.name,
                finished.model.short_hash,
                vae.name if vae else "",
                vae.short_hash if vae else "",
            )
            made_with = {
                "device": finished.device,
                "batch_size": finished.batch_size,
                "fast_paths": finished.fast_paths,
            }
            sha256 = write_image(
                finished.image, run_dir / path, job, parameters, made_with, compress_level
            )
            if finished.frames:  # before the row: a done row means its strip exists too
                write_strip(
                    finished.frames,
                    run_dir / strip_path(path),
                    job_id=job.id,
                    note=finished.frames_note,
                )
        except OSError as error:
            raise StorageError(
                f"cannot write {run_dir / path}: {error.strerror or error}"
            ) from error
    return ManifestRow.from_job(
        job,
        status="failed" if finished.error else "done",
        path="" if finished.error else path,
        model_hash=finished.model.short_hash,
        device=finished.device,
        seconds=round(finished.seconds, 3),
        sha256=sha256,
        error=finished.error,
        batch_size=finished.batch_size,
        fast_paths=finished.fast_paths,
    )


class ImageWriter:
    """The background writer: `submit` each finished job in order, `close` at the end.
    A storage error stops the writing; `submit` and `close` then raise it."""

    def __init__(
        self,
        run_dir: Path,
        manifest: Manifest,
        reporter: Reporter,
        depth: int,
        compress_level: int = PNG_COMPRESS_LEVEL,
    ) -> None:
        self.run_dir = run_dir
        self.compress_level = compress_level
        self.manifest = manifest
        self.reporter = reporter
        self.made = 0
        self.error: StorageError | None = None
        self._queue: queue.Queue[FinishedJob | None] = queue.Queue(maxsize=max(1, depth))
        self._thread = threading.Thread(target=self._work, name="batchgen-writer", daemon=True)
        self._thread.start()

    def submit(self, finished: FinishedJob) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put(finished)

    def close(self) -> None:
        """Write everything submitted, then stop; raises the storage error if one happened."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while (finished := self._queue.get()) is not None:
            if self.error is not None:
                continue  # not recorded: the next run makes it again
            try:
                row = write_finished(self.run_dir, finished, self.compress_level)
                try:
                    self.manifest.append(row)
                except OSError as error:  # at most a torn last row, which reading ignores
                    raise StorageError(
                        f"cannot write {self.manifest.path}: {error.strerror or error}"
                    ) from error
            except StorageError as error:
                self.error = error
                continue
            self.made += row.status == "done"
            self.reporter.job_finished(describe(row), row.status == "done")
