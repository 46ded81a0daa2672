"""What a comparison grid shows: which jobs go in which cell, one grid per combination of the
run's swept axes that it does not lay out; the grid's file name; the axis labels; and what each
cell holds (a job's image, an init image, or a placeholder saying why there is none).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import yaml

from batchgen.errors import BatchgenError
from batchgen.jobs.parameters import PARAMETER
from batchgen.recipe.schema import AxisName, GridSpec
from batchgen.store.files import LOCK_FILE_NAME
from batchgen.store.manifest import ManifestRow

AXES: tuple[str, ...] = get_args(AxisName)
AXIS_TITLES = {axis: PARAMETER[axis].title for axis in AXES}
# What the axes hold in jobs that do not use them (no variations, no iterations): not worth a
# title.
UNUSED_VALUES: dict[str, Any] = {
    axis: PARAMETER[axis].unused for axis in AXES if PARAMETER[axis].unused is not None
}


class GridError(BatchgenError):
    """A grid cannot be made as asked; the message says what to change."""


# ---------------------------------------------------------------------------------------------
# Planning: which jobs go where


@dataclass(frozen=True)
class Grid:
    """One grid file to draw: its spec, the values along each axis and the job in each cell."""

    spec: GridSpec
    stem: str  # the file name without .png
    fixed: dict[str, Any]
    x_values: tuple[Any, ...]
    y_values: tuple[Any, ...]  # (None,) for a single row
    z_values: tuple[Any, ...]  # (None,) for a single sub-grid
    cells: dict[tuple[Any, Any, Any], ManifestRow]  # (x, y, z) → the latest job there
    image_size: tuple[int, int]  # the largest width and height among its jobs

    def coordinates(self) -> list[tuple[Any, Any, Any]]:
        """Every cell's (x, y, z), in cell order: sub-grid, then row, then column."""
        return [(x, y, z) for z in self.z_values for y in self.y_values for x in self.x_values]

    def jobs(self) -> tuple[str | None, ...]:
        cells = (self.cells.get(coordinate) for coordinate in self.coordinates())
        return tuple(row.id if row else None for row in cells)


def laid_out_axes(spec: GridSpec) -> list[str]:
    return [axis for axis in (spec.x, spec.y, spec.z) if axis is not None]


def axis_values(rows: list[ManifestRow]) -> dict[str, list[Any]]:
    """Each axis's distinct values in the order of the jobs' indexes: the recipe's order."""
    ordered = sorted(rows, key=lambda row: row.index)
    return {axis: list(dict.fromkeys(getattr(row, axis) for row in ordered)) for axis in AXES}


def _matches(row: ManifestRow, where: Mapping[AxisName, Any]) -> bool:
    for axis, values in where.items():
        wanted = values if isinstance(values, list) else [values]
        value = getattr(row, axis)
        if axis == "init_image":  # as include/exclude do: the label, file name or stem
            path = PurePosixPath(value)
            if not {value, path.name, path.stem} & set(wanted):
                return False
        elif value not in wanted:
            return False
    return True


def plan_grids(rows: list[ManifestRow], spec: GridSpec) -> list[Grid]:
    """One grid per combination of the values of the run's swept axes that `spec` does not
    lay out; each grid's axes take every value the filtered jobs have, so sibling grids line
    up and a job not made (yet) is an empty cell."""
    chosen = [row for row in rows if _matches(row, spec.where)]
    if not chosen:
        for axis, wanted in spec.where.items():
            if not any(_matches(row, {axis: wanted}) for row in rows):
                there = ", ".join(_format(v) for v in axis_values(rows)[axis])
                raise GridError(f"no job in the run has {axis} {wanted} (it has: {there})")
        raise GridError(f"no job in the run matches all of {spec.where}")
    laid_out = laid_out_axes(spec)
    run_values = axis_values(rows)
    split = [axis for axis in AXES if len(run_values[axis]) > 1 and axis not in laid_out]
    values = axis_values(chosen)
    groups: dict[tuple[Any, ...], list[ManifestRow]] = {}
    for row in chosen:
        groups.setdefault(tuple(getattr(row, axis) for axis in split), []).append(row)
    name = spec.name or _default_name(spec)
    grids = []
    for key, members in groups.items():
        cells: dict[tuple[Any, Any, Any], ManifestRow] = {}
        for row in sorted(members, key=lambda row: row.finished_at):  # the latest wins
            coordinate = (
                getattr(row, spec.x),
                getattr(row, spec.y) if spec.y else None,
                getattr(row, spec.z) if spec.z else None,
            )
            cells[coordinate] = row
        suffix = "".join(
            f"-{_file_word(axis, value)}" for axis, value in zip(split, key, strict=True)
        )
        grids.append(
            Grid(
                spec=spec,
                stem=(name + suffix)[:180],
                fixed={
                    axis: getattr(members[0], axis)
                    for axis in AXES
                    if axis not in laid_out
                    and getattr(members[0], axis) != UNUSED_VALUES.get(axis, "unused")
                },
                x_values=tuple(values[spec.x]),
                y_values=tuple(values[spec.y]) if spec.y else (None,),
                z_values=tuple(values[spec.z]) if spec.z else (None,),
                cells=cells,
                image_size=(max(row.width for row in members), max(row.height for row in members)),
            )
        )
    return _unique_stems(grids)


def _default_name(spec: GridSpec) -> str:
    """`strength`, `strength-x-prompt`, `strength-x-prompt-by-seed`."""
    words = {axis: "init" if axis == "init_image" else axis for axis in AXES}
    name = words[spec.x]
    name += f"-x-{words[spec.y]}" if spec.y else ""
    return name + (f"-by-{words[spec.z]}" if spec.z else "")


def _unique_stems(grids: list[Grid]) -> list[Grid]:
    """Values whose file words coincide ("Fire!" and "fire") get a short hash each."""
    counts: dict[str, int] = {}
    for grid in grids:
        counts[grid.stem] = counts.get(grid.stem, 0) + 1
    unique = []
    for grid in grids:
        if counts[grid.stem] > 1:
            digest = hashlib.sha256(json.dumps(grid.fixed, sort_keys=True).encode()).hexdigest()
            grid = dataclasses.replace(grid, stem=f"{grid.stem}-{digest[:6]}")
        unique.append(grid)
    return unique


def _file_word(axis: str, value: Any) -> str:
    """`seed-1592514025`, `prompt-cheery-open-fire-photograph`, `init-fire-drawing`."""
    if axis == "init_image":
        return f"init-{_slug(PurePosixPath(value).stem) or 'image'}"
    if isinstance(value, str):
        return f"{axis}-{_slug(value) or 'empty'}"
    return f"{axis}-{value}"


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "-".join(re.findall(r"[a-z0-9]+", ascii_text.lower()))[:48].strip("-")


def _format(value: Any) -> str:
    """A value as a label shows it: on one line (a prompt pasted with line breaks or tabs
    reads as it would in a prompt box, and text layout measures single lines), control
    characters as "□"."""
    if value == "":
        return "(empty)"
    text = " ".join(str(value).split())
    return "".join("□" if unicodedata.category(c) == "Cc" else c for c in text)


def axis_label(axis: str, value: Any) -> str:
    if axis == "variation_seed" and value == -1:
        return "no variation"
    return f"{AXIS_TITLES[axis]}: {_format(value)}"


# ---------------------------------------------------------------------------------------------
# What each cell shows


@dataclass(frozen=True)
class Content:
    """One cell: an image file, or a placeholder saying why there is none."""

    image: Path | None
    text: str = ""
    failed: bool = False
    is_job_cell: bool = True  # False for the init image row/column
    state: str = ""  # the job and image bytes it shows, for the content hash


def _job_content(run_dir: Path, row: ManifestRow | None) -> Content:
    if row is None:
        return Content(None, "no image", state="none")
    if row.status == "failed":
        return Content(None, f"failed\n{row.error}", failed=True, state=f"failed {row.id}")
    image = run_dir / row.path
    if not image.is_file():
        return Content(None, "image file missing", state=f"missing {row.id}")
    return Content(image, state=f"{row.id} {row.sha256}")


class InitImages:
    """Init images by label, found beside the recipe that recipe.lock.yaml names, and shown
    only while their bytes are still those the jobs were made from."""

    def __init__(self, run_dir: Path, rows: list[ManifestRow]) -> None:
        self.recipe_folder = _recipe_folder(run_dir / LOCK_FILE_NAME)
        self.sha256 = {row.init_image: row.init_image_sha256 for row in rows}
        self.contents: dict[str, Content] = {}

    def content(self, label: str) -> Content:
        if label not in self.contents:
            self.contents[label] = self._read(label)
        return self.contents[label]

    def _read(self, label: str) -> Content:
        expected = self.sha256.get(label, "")
        if self.recipe_folder is None:
            return Content(None, f"init image unknown: no {LOCK_FILE_NAME}", is_job_cell=False)
        path = self.recipe_folder / label
        try:
            data = path.read_bytes()
        except OSError:
            return Content(None, f"init image not found: {label}", is_job_cell=False)
        if hashlib.sha256(data).hexdigest() != expected:
            return Content(None, "init image changed since the run", is_job_cell=False)
        return Content(path, is_job_cell=False, state=expected)


def _recipe_folder(lock_file: Path) -> Path | None:
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8"))
        return Path(lock["recipe"]).parent
    except (OSError, yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class Table:
    """One sub-grid: column labels, row labels, and rows of cells."""

    title: str  # the z label; "" without z
    column_labels: list[str]
    row_labels: list[str]
    rows: list[list[Content]]


def make_tables(run_dir: Path, grid: Grid, inits: InitImages) -> list[Table]:
    """`grid`'s sub-grids, one per z value, with the init images as an extra row or column
    when its spec shows them."""
    spec = grid.spec
    tables = []
    for z in grid.z_values:
        column_labels = [axis_label(spec.x, x) for x in grid.x_values]
        row_labels = [axis_label(spec.y, y) if spec.y else "" for y in grid.y_values]
        rows = [
            [_job_content(run_dir, grid.cells.get((x, y, z))) for x in grid.x_values]
            for y in grid.y_values
        ]
        if spec.show_init and spec.x == "init_image":
            row_labels.insert(0, AXIS_TITLES["init_image"])
            rows.insert(0, [inits.content(x) for x in grid.x_values])
        elif spec.show_init:
            column_labels.insert(0, AXIS_TITLES["init_image"])
            for row, y in zip(rows, grid.y_values, strict=True):
                row.insert(0, inits.content(_init_label(grid, y, z)))
        tables.append(
            Table(axis_label(spec.z, z) if spec.z else "", column_labels, row_labels, rows)
        )
    return tables


def _init_label(grid: Grid, y: Any, z: Any) -> str:
    """The init image of the cells of row `y` of sub-grid `z` (x is not init_image)."""
    if grid.spec.y == "init_image":
        return str(y)
    if grid.spec.z == "init_image":
        return str(z)
    return str(grid.fixed["init_image"])
