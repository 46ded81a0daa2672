"""What report.html shows, gathered from a run folder: each job's latest manifest row with its
image file's size and parameters, the grid PNGs with what their batchgen-grid chunks say, every
axis's values in the recipe's order, and the jobs grouped into tables of thumbnails.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from PIL import Image

from batchgen.recipe.load import AXES
from batchgen.store.manifest import MANIFEST_COLUMNS, ManifestRow

GRIDS_DIR = "grids"
GRID_CHUNK = "batchgen-grid"  # the PNG text chunk grid.py writes: JSON with spec, jobs, fixed

# Axes whose values are numbers: keyed by their exact value, shown in their shortest form.
_FLOAT_AXES = frozenset({"strength", "cfg"})
_INT_AXES = frozenset({"steps", "seed"})


@dataclass(frozen=True)
class ReportedJob:
    """A job's latest manifest row and what its image file holds."""

    row: ManifestRow
    image: str  # the image's URL relative to report.html; "" when failed or the file is gone
    width: int  # of the image file; 0 without one
    height: int
    parameters: str  # the A1111 `parameters` text of the PNG; "" without one

    @property
    def missing(self) -> bool:
        """Done according to the manifest, but the image file is not there (or unreadable)."""
        return self.row.status == "done" and not self.image


@dataclass(frozen=True)
class GridImage:
    href: str
    name: str
    width: int
    height: int
    description: str  # its spec and fixed values, from its batchgen-grid chunk
    job_ids: frozenset[str]


@dataclass(frozen=True)
class Axis:
    name: str
    labels: dict[str, str]  # every value, as _axis_key gives it → as shown; in recipe order

    @property
    def swept(self) -> bool:
        return len(self.labels) > 1


@dataclass(frozen=True)
class ThumbnailGroup:
    """One grid's worth of thumbnails: x values across, y values down."""

    fixed: tuple[tuple[str, str], ...]  # (axis, label) of the swept axes but x and y
    cells: dict[tuple[str, str], list[ReportedJob]]  # (x key, y key) → its jobs, usually one


# ---------------------------------------------------------------------------------------------
# Reading the run folder


def _relative_file(run_dir: Path, relative_path: str) -> Path | None:
    """The file a manifest path names, only if it is a file inside the run folder."""
    if not relative_path:
        return None
    pure = PurePosixPath(relative_path)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    file = run_dir / pure
    return file if file.is_file() else None


def reported_job(run_dir: Path, row: ManifestRow) -> ReportedJob:
    """`row` with its image file's URL, size and A1111 parameters, when the file can be read."""
    file = _relative_file(run_dir, row.path) if row.status == "done" else None
    if file is None:
        return ReportedJob(row, "", 0, 0, "")
    try:
        with Image.open(file) as image:
            # Text chunks before the pixel data are read by open(); batchgen writes them there.
            parameters = image.info.get("parameters", "")
            width, height = image.size
    except OSError:  # Pillow's UnidentifiedImageError included
        return ReportedJob(row, "", 0, 0, "")
    return ReportedJob(row, quote(row.path), width, height, str(parameters))


def grid_images(run_dir: Path) -> list[GridImage]:
    """The run's grids/*.png that Pillow can open, with what their batchgen-grid chunks say."""
    grids = []
    for file in sorted((run_dir / GRIDS_DIR).glob("*.png")):
        try:
            with Image.open(file) as image:
                width, height = image.size
                chunk = image.info.get(GRID_CHUNK, "")
        except OSError:
            continue
        try:
            about = json.loads(chunk) if chunk else {}
        except json.JSONDecodeError:
            about = {}
        if not isinstance(about, dict):
            about = {}
        description = " · ".join(
            text for text in (_describe(about.get("spec")), _describe(about.get("fixed"))) if text
        )
        job_ids = frozenset(str(job_id) for job_id in about.get("jobs") or () if job_id)
        href = quote(f"{GRIDS_DIR}/{file.name}")
        grids.append(GridImage(href, file.name, width, height, description, job_ids))
    return grids


def _describe(value: object) -> str:
    """A grid chunk's `spec` or `fixed`, for people: `x strength · y prompt`."""
    if isinstance(value, dict):
        return " · ".join(f"{key} {item}" for key, item in value.items() if item is not None)
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# Axes and the thumbnail layout


def _axis_key(axis: str, value: object) -> str:
    """A value of `axis` as text that compares exactly (0.1 + 0.2 is not 0.3)."""
    if axis in _FLOAT_AXES:
        return repr(float(value))  # type: ignore[arg-type]
    if axis in _INT_AXES:
        return str(int(value))  # type: ignore[call-overload]
    return str(value)


def _axis_label(axis: str, key: str, model_names: dict[str, str]) -> str:
    if axis in _FLOAT_AXES:
        return f"{float(key):g}"
    if axis == "prompt" and not key:
        return '""'
    if axis == "model":
        return model_names.get(key, key)  # the recipe's reference, not the long identity
    return key


def _locked_models(lock: dict[str, Any]) -> list[dict[str, Any]]:
    """The lock's models, {reference, identity} each: a list, or one mapping in older locks."""
    models = lock.get("model")
    listed = [models] if isinstance(models, dict) else models
    return [model for model in listed or () if isinstance(model, dict)]


def _locked_values(lock: dict[str, Any], axis: str) -> list[Any]:
    if axis == "init_image":
        images = lock.get("init_images") or ()
        return [image.get("path") for image in images if isinstance(image, dict)]
    if axis == "model":
        return [model.get("identity") for model in _locked_models(lock)]
    values = lock.get(axis)
    return values if isinstance(values, list) else []


def run_axes(lock: dict[str, Any], rows: Sequence[ManifestRow]) -> dict[str, Axis]:
    """Every axis with its values, in the order the recipe writes them. The values are the
    lock's, then any other the manifest holds (rows of an earlier recipe in this folder)."""
    model_names = {
        str(model.get("identity")): str(model.get("reference")) for model in _locked_models(lock)
    }
    written = ["init_image" if key == "init_images" else key for key in lock]
    in_rows = [axis for axis in AXES if axis in MANIFEST_COLUMNS]
    axes = {}
    for axis in dict.fromkeys([name for name in written if name in in_rows] + in_rows):
        values = [value for value in _locked_values(lock, axis) if value is not None]
        values += [getattr(row, axis) for row in rows]
        keys = dict.fromkeys(_axis_key(axis, value) for value in values)
        axes[axis] = Axis(axis, {key: _axis_label(axis, key, model_names) for key in keys})
    return axes


def thumbnail_axes(lock: dict[str, Any], axes: dict[str, Axis]) -> tuple[str | None, str | None]:
    """The thumbnails' x and y axes: the recipe's first grid, else the last two swept axes
    (the last written varies fastest, as in the job order and A1111's X/Y plot)."""
    for grid in lock.get("grids") or ():
        if isinstance(grid, dict) and grid.get("x") in axes:
            y = grid.get("y")
            return grid["x"], y if y in axes and y != grid["x"] else None
    swept = [name for name, axis in axes.items() if axis.swept]
    return (swept[-1] if swept else None), (swept[-2] if len(swept) > 1 else None)


def thumbnail_groups(
    jobs: Sequence[ReportedJob], axes: dict[str, Axis], x: str | None, y: str | None
) -> list[ThumbnailGroup]:
    """One group per combination of the swept axes other than x and y, in job order."""
    others = [name for name, axis in axes.items() if axis.swept and name not in (x, y)]
    groups: dict[tuple[str, ...], ThumbnailGroup] = {}
    for job in jobs:
        keys = tuple(_axis_key(axis, getattr(job.row, axis)) for axis in others)
        if keys not in groups:
            fixed = tuple(
                (axis, axes[axis].labels[key]) for axis, key in zip(others, keys, strict=True)
            )
            groups[keys] = ThumbnailGroup(fixed, {})
        group = groups[keys]
        cell = (
            _axis_key(x, getattr(job.row, x)) if x else "",
            _axis_key(y, getattr(job.row, y)) if y else "",
        )
        group.cells.setdefault(cell, []).append(job)
    return list(groups.values())
