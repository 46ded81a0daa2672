"""Comparison grids with labelled axes (AUTOMATIC1111's X/Y/Z plot), drawn from a run folder's
manifest, so they work on finished, half-finished, resumed and merged-shard runs alike.

A grid lays one axis across, optionally one down and one as a row or column of sub-grids, and
is made once per combination of the run's other swept axes. It is written to
`grids/<name>[-<fixed values>].png` atomically and only when the cells it shows changed: its
`batchgen-grid` text chunk records which jobs it shows, where, and a hash of its content.

This module holds the public calls and the writing; grid_plan.py decides what each grid
shows, grid_layout.py draws it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pydantic import ValidationError

from batchgen import __version__
from batchgen.recipe.schema import GridSpec
from batchgen.store.files import (
    LOCK_FILE_NAME,
    write_png_atomically,
)
from batchgen.store.manifest import Manifest, ManifestRow, require_run_folder
from batchgen.views.grid_layout import BACKGROUND, PLACEHOLDER_FILL, draw_grid, fitting_layout
from batchgen.views.grid_plan import (
    AXES,
    Grid,
    GridError,
    InitImages,
    Table,
    axis_values,
    make_tables,
    plan_grids,
)

# What callers import from here. GridError, BACKGROUND and PLACEHOLDER_FILL are defined where
# they are raised or drawn, and named here so that callers need not know the split.
__all__ = [
    "BACKGROUND",
    "GRIDS_DIR",
    "OWN_VIEW",
    "PLACEHOLDER_FILL",
    "RUN_VIEW",
    "TEXT_CHUNK",
    "GridError",
    "GridResult",
    "default_specs",
    "make_grids",
    "make_run_grids",
    "parse_where",
    "run_specs",
    "spec_from_options",
]

GRIDS_DIR = "grids"
TEXT_CHUNK = "batchgen-grid"  # PNG tEXt key of the JSON record of what a grid shows
# Who asked for a grid, as its record says: the run folder itself (its recipe's `grids:` or
# the default grid), or a spec given to `batchgen grid`.
RUN_VIEW, OWN_VIEW = "run", "own"


@dataclass(frozen=True)
class GridResult:
    path: Path
    jobs: tuple[str | None, ...]  # job ids in cell order (sub-grid, row, column); None: no job
    written: bool  # False: the grid on disk already showed exactly these cells
    note: str  # why the grid was downscaled; "" when it was not
    fixed: dict[str, Any]  # axis → the value every cell of the grid shares


# ---------------------------------------------------------------------------------------------
# The public calls


def make_run_grids(run_dir: Path) -> tuple[list[GridResult], list[Path]]:
    """The run folder's own grids (`run_specs`), drawn as `make_grids` draws them, and the
    files of its own grids drawn earlier that these no longer include removed (a default grid
    drawn while the run was half done lays out other axes): the grids and what was removed.
    Grids drawn with a spec of their own (`batchgen grid --x …`) are never removed."""
    results = make_grids(run_dir, run_specs(run_dir), view=RUN_VIEW)
    drawn = {result.path for result in results}
    removed = []
    for path in sorted((run_dir / GRIDS_DIR).glob("*.png")):
        if path not in drawn and (_recorded(path) or {}).get("view") == RUN_VIEW:
            path.unlink(missing_ok=True)
            removed.append(path)
    return results, removed


def make_grids(run_dir: Path, specs: Sequence[GridSpec], view: str = OWN_VIEW) -> list[GridResult]:
    """Draw every grid of `specs` from `run_dir`'s manifest into `run_dir/grids/`; a grid whose
    cells did not change since it was last drawn is left as it is. `view` is recorded in each
    grid: RUN_VIEW for the run's own grids (see make_run_grids)."""
    require_run_folder(run_dir, ledger=True)
    rows = _with_model_names(run_dir, list(Manifest(run_dir).latest().values()))
    if not rows:
        return []
    planned: dict[Path, tuple[int, Grid]] = {}
    for number, spec in enumerate(specs):
        for grid in plan_grids(rows, spec):
            path = run_dir / GRIDS_DIR / f"{grid.stem}.png"
            other, _ = planned.setdefault(path, (number, grid))
            if other != number:
                raise GridError(
                    f"grids {other + 1} and {number + 1} would both write {path}: "
                    "give one of them a `name`"
                )
    inits = InitImages(run_dir, rows)
    return [_write(run_dir, grid, path, inits, view) for path, (_, grid) in planned.items()]


def default_specs(rows: Iterable[ManifestRow]) -> list[GridSpec]:
    """The grid for a run without `grids:`: the axis with the most values across, the next
    down (prompts down rather than across: their labels need the room), init images shown.
    None when nothing is swept."""
    values = axis_values(list(rows))
    swept = sorted((axis for axis in AXES if len(values[axis]) > 1), key=lambda a: -len(values[a]))
    if not swept:
        return []
    x, y = swept[0], (swept[1] if len(swept) > 1 else None)
    if x == "prompt" and y is not None:
        x, y = y, x
    return [GridSpec.model_validate({"x": x, "y": y, "show_init": True})]


def _with_model_names(run_dir: Path, rows: list[ManifestRow]) -> list[ManifestRow]:
    """Rows whose model and refiner read as the recipe names them (`builtin:tiny`, a path)
    rather than as their content-hash identities, where recipe.lock.yaml maps one to the
    other unambiguously."""
    try:
        lock = yaml.safe_load((run_dir / LOCK_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return rows
    for column in ("model", "refiner"):
        names = _locked_names(lock, column)
        if names and len(set(names.values())) == len(names):
            rows = [_renamed(row, column, names) for row in rows]
    return rows


def _renamed(row: ManifestRow, column: str, names: dict[str, str]) -> ManifestRow:
    value = getattr(row, column)
    return dataclasses.replace(row, **{column: names.get(value, value)})


def _locked_names(lock: object, column: str) -> dict[str, str]:
    """identity → reference of the lock's models (or refiners); {} where it has none."""
    try:
        models = lock[column]  # type: ignore[index]
        listed = models if isinstance(models, list) else [models]
        return {model["identity"]: model["reference"] for model in listed}
    except (KeyError, TypeError):
        return {}


def run_specs(run_dir: Path) -> list[GridSpec]:
    """The grids a run folder asks for: its recipe's `grids:` as recipe.lock.yaml records
    them, else `default_specs` of its manifest."""
    try:
        lock = yaml.safe_load((run_dir / LOCK_FILE_NAME).read_text(encoding="utf-8"))
        listed = [GridSpec.model_validate(spec) for spec in lock.get("grids") or []]
    except (OSError, yaml.YAMLError, AttributeError, ValidationError):
        listed = []
    return listed or default_specs(Manifest(run_dir).latest().values())


def parse_where(options: Sequence[str]) -> dict[str, list[str]]:
    """`--where` options, `axis=value` each, as GridSpec's `where`: `seed=7 --where seed=8`
    gives {"seed": ["7", "8"]} (values are split on nothing else: prompts hold commas)."""
    where: dict[str, list[str]] = {}
    for option in options:
        axis, equals, value = option.partition("=")
        if not equals or not axis.strip():
            raise GridError(f"--where {option!r}: write it as axis=value, e.g. seed=1592514025")
        where.setdefault(axis.strip(), []).append(value)
    return where


def spec_from_options(**options: Any) -> GridSpec:
    """A GridSpec from command-line options named like its fields (`where` as `--where`
    strings); GridError with one line per bad option."""
    options = {key: value for key, value in options.items() if value is not None}
    options["where"] = parse_where(options.get("where", ()))
    try:
        return GridSpec.model_validate(options)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            option, *inside = [str(part) for part in item["loc"]] or ["spec"]
            detail = f"{inside[0]}: " if inside else ""  # the axis of a bad --where
            lines.append(f"--{option.replace('_', '-')}: {detail}{item['msg']}")
        raise GridError("\n".join(lines)) from None


# ---------------------------------------------------------------------------------------------
# Writing, or keeping what is there


def _write(run_dir: Path, grid: Grid, path: Path, inits: InitImages, view: str) -> GridResult:
    tables = make_tables(run_dir, grid, inits)
    content = _content_hash(grid, tables)
    jobs = grid.jobs()
    recorded = _recorded(path)
    if recorded is not None and (recorded.get("content"), recorded.get("view")) == (content, view):
        return GridResult(path, jobs, False, str(recorded.get("note", "")), grid.fixed)
    layout, note = fitting_layout(grid, tables)
    record = {
        "content": content,
        "spec": grid.spec.model_dump(mode="json"),
        "fixed": grid.fixed,
        "axes": {
            axis: list(values)
            for axis, values in (("x", grid.x_values), ("y", grid.y_values), ("z", grid.z_values))
            if values != (None,)
        },
        "jobs": list(jobs),
        "boxes": layout.job_boxes,  # [left, top, width, height] of each job's cell
        "note": note,
        "view": view,
        "batchgen_version": __version__,
    }
    info = PngInfo()
    info.add_text(TEXT_CHUNK, json.dumps(record))
    write_png_atomically(draw_grid(layout), path, info)
    return GridResult(path, jobs, True, note, grid.fixed)


def _content_hash(grid: Grid, tables: list[Table]) -> str:
    """Everything the picture depends on: the spec, the labels, each cell's job and bytes."""
    what = {
        "version": __version__,
        "spec": grid.spec.model_dump(mode="json"),
        "fixed": grid.fixed,
        "tables": [
            [table.title, table.column_labels, table.row_labels]
            + [[(cell.state, cell.text) for cell in row] for row in table.rows]
            for table in tables
        ],
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()


def _recorded(path: Path) -> dict[str, Any] | None:
    """The `batchgen-grid` record of the grid at `path`, if there is a readable one."""
    try:
        with Image.open(path) as image:
            record = json.loads(image.info.get(TEXT_CHUNK, "null"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return record if isinstance(record, dict) else None
