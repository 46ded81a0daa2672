"""Picking up after a run that was killed: its temp files removed, and the images it wrote but
did not get to record adopted, once they prove to be whole and to be the job's.

A kill can land between an image's rename into place and its manifest row; that image is
then on disk under the job's name with no row. Its `batchgen` text chunk names the job it
was made for, so it is adopted when that id matches and the file decodes completely;
otherwise the job is made again over it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from batchgen.jobs.plan import PlannedJob, file_sha256

# write_file_atomically's temp names: `.<final name>.<8 hex digits>.tmp`.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.[0-9a-f]{8}\.tmp$")
_RUN_SUBFOLDERS = (".", "images", "intermediates", "grids", "manifests", ".locks")


def remove_temp_files(run_dir: Path, is_mine: Callable[[Path], bool] = lambda _: True) -> int:
    """Delete the temp files a killed run left in the run folder, for the final paths that
    `is_mine` accepts (a shard leaves other shards' files alone); return how many."""
    removed = 0
    for folder in _RUN_SUBFOLDERS:
        for path in (run_dir / folder).glob(".*.tmp"):
            match = _TEMP_NAME.match(path.name)
            if match and is_mine(path.with_name(match["target"])):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def embedded_record(path: Path) -> dict[str, Any] | None:
    """The `batchgen` chunk of a batchgen PNG (the job, the device, the batch size), if the
    file decodes completely."""
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here
            record = json.loads(image.info.get("batchgen", "null"))
    except (OSError, ValueError, SyntaxError):  # Pillow raises SyntaxError for a broken PNG
        return None
    return record if isinstance(record, dict) else None


@dataclass(frozen=True)
class Orphan:
    """An image on disk that its job's killed run did not record."""

    sha256: str
    device: str
    batch_size: int
    fast_paths: str


def orphans(
    run_dir: Path, planned: Iterable[PlannedJob], strip_of: Callable[[str], Path] | None = None
) -> dict[str, Orphan]:
    """Job id → each job to make whose image is already on disk without a done row, whole
    and made for that job — and, when the run records intermediates (`strip_of` gives the
    strip's path for an image path), with its strip too."""
    adopted = {}
    for job in planned:
        image = run_dir / job.path
        if job.status == "done" or job.note or not image.is_file():
            continue  # a noted job's image changed on disk: it is made again
        if strip_of is not None and not strip_of(job.path).is_file():
            continue
        record = embedded_record(image)
        if record and record.get("id") == job.job.id and (sha256 := file_sha256(image)):
            adopted[job.job.id] = Orphan(
                sha256,
                str(record.get("device", "")),
                int(record.get("batch_size", 0)),
                str(record.get("fast_paths", "")),
            )
    return adopted
