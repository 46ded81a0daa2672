"""Comparison grids with labelled axes (AUTOMATIC1111's X/Y/Z plot), drawn from a run folder's
manifest, so they work on finished, half-finished, resumed and merged-shard runs alike.

A grid lays one axis across, optionally one down and one as a row or column of sub-grids, and
is made once per combination of the run's other swept axes. It is written to
`grids/<name>[-<fixed values>].png` atomically and only when the cells it shows changed: its
`batchgen-grid` text chunk records which jobs it shows, where, and a hash of its content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, get_args

import yaml
from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo
from pydantic import ValidationError

from batchgen import __version__
from batchgen.recipe.schema import AxisName, GridSpec
from batchgen.store.files import (
    LOCK_FILE_NAME,
    MANIFEST_NAME,
    SHARD_LEDGER_DIR,
    write_png_atomically,
)
from batchgen.store.manifest import Manifest, ManifestRow

GRIDS_DIR = "grids"
TEXT_CHUNK = "batchgen-grid"  # PNG tEXt key of the JSON record of what a grid shows
# Who asked for a grid, as its record says: the run folder itself (its recipe's `grids:` or
# the default grid), or a spec given to `batchgen grid`.
RUN_VIEW, OWN_VIEW = "run", "own"

# A grid never exceeds these; a larger one is drawn with smaller cells and says so in its
# title. 64 Mi pixels stays under Pillow's decompression-bomb warning (Image.MAX_IMAGE_PIXELS,
# 89,478,485 by default), so Pillow-based tools open every grid; 16,383 px a side is WebP's
# limit and within what browsers and image viewers display.
MAX_GRID_PIXELS = 64 * 1024 * 1024
MAX_GRID_SIDE = 16_383
MIN_CELL_SIDE = 16  # a grid that would need smaller cells to fit is refused: filter it
DEFAULT_CELL_SIDE = 256  # the longest side of a cell unless the spec says: images are capped

# DejaVu Sans (Latin, Greek, Cyrillic, punctuation, arrows, maths; licence in fonts/LICENSE).
FONT_FILE = Path(__file__).parent / "fonts" / "DejaVuSans.ttf"
MIN_FONT_SIZE = 11  # labels shrink to fit down to this size, then are cut with "…"
MAX_FONT_SIZE = 28

AXES: tuple[str, ...] = get_args(AxisName)
AXIS_TITLES = {
    "model": "model",  # its identity: the manifest's model column
    "init_image": "init image",
    "prompt": "prompt",
    "strength": "strength",
    "steps": "steps",
    "cfg": "CFG",
    "seed": "seed",
    "scheduler": "scheduler",
    "variation_seed": "variation seed",
    "variation_strength": "variation strength",
    "iteration": "iteration",
}

# What the variation axes hold in jobs without variations or iterations: not worth a title.
UNUSED_VALUES: dict[str, Any] = {"variation_seed": -1, "variation_strength": 0.0, "iteration": 0}

Colour = tuple[int, int, int]
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PLACEHOLDER_FILL = (234, 234, 234)
PLACEHOLDER_EDGE = (190, 190, 190)
PLACEHOLDER_INK = (90, 90, 90)
FAILED_INK = (165, 20, 20)
NOTE_INK = (170, 85, 0)


class GridError(ValueError):
    """A grid cannot be made as asked; the message says what to change."""


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
    if not (run_dir / MANIFEST_NAME).exists() and not any(
        (run_dir / SHARD_LEDGER_DIR).glob("*.csv")
    ):
        raise GridError(f"{run_dir} has no {MANIFEST_NAME}: is it a run folder?")
    rows = _with_model_names(run_dir, list(Manifest(run_dir).latest().values()))
    if not rows:
        return []
    planned: dict[Path, tuple[int, _Grid]] = {}
    for number, spec in enumerate(specs):
        for grid in _plan(rows, spec):
            path = run_dir / GRIDS_DIR / f"{grid.stem}.png"
            other, _ = planned.setdefault(path, (number, grid))
            if other != number:
                raise GridError(
                    f"grids {other + 1} and {number + 1} would both write {path}: "
                    "give one of them a `name`"
                )
    inits = _InitImages(run_dir, rows)
    return [_write(run_dir, grid, path, inits, view) for path, (_, grid) in planned.items()]


def default_specs(rows: Iterable[ManifestRow]) -> list[GridSpec]:
    """The grid for a run without `grids:`: the axis with the most values across, the next
    down (prompts down rather than across: their labels need the room), init images shown.
    None when nothing is swept."""
    values = _axis_values(list(rows))
    swept = sorted((axis for axis in AXES if len(values[axis]) > 1), key=lambda a: -len(values[a]))
    if not swept:
        return []
    x, y = swept[0], (swept[1] if len(swept) > 1 else None)
    if x == "prompt" and y is not None:
        x, y = y, x
    return [GridSpec.model_validate({"x": x, "y": y, "show_init": True})]


def _with_model_names(run_dir: Path, rows: list[ManifestRow]) -> list[ManifestRow]:
    """Rows whose model reads as the recipe names it (`builtin:tiny`, a path) rather than as
    its content-hash identity, when recipe.lock.yaml maps one to the other unambiguously."""
    try:
        lock = yaml.safe_load((run_dir / LOCK_FILE_NAME).read_text(encoding="utf-8"))
        models = lock["model"] if isinstance(lock["model"], list) else [lock["model"]]
        names = {model["identity"]: model["reference"] for model in models}
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return rows
    if len(set(names.values())) != len(names):
        return rows
    return [dataclasses.replace(row, model=names.get(row.model, row.model)) for row in rows]


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
# Planning: which jobs go where


@dataclass(frozen=True)
class _Grid:
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


def _laid_out(spec: GridSpec) -> list[str]:
    return [axis for axis in (spec.x, spec.y, spec.z) if axis is not None]


def _axis_values(rows: list[ManifestRow]) -> dict[str, list[Any]]:
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


def _plan(rows: list[ManifestRow], spec: GridSpec) -> list[_Grid]:
    """One grid per combination of the values of the run's swept axes that `spec` does not
    lay out; each grid's axes take every value the filtered jobs have, so sibling grids line
    up and a job not made (yet) is an empty cell."""
    chosen = [row for row in rows if _matches(row, spec.where)]
    if not chosen:
        for axis, wanted in spec.where.items():
            if not any(_matches(row, {axis: wanted}) for row in rows):
                there = ", ".join(_format(v) for v in _axis_values(rows)[axis])
                raise GridError(f"no job in the run has {axis} {wanted} (it has: {there})")
        raise GridError(f"no job in the run matches all of {spec.where}")
    laid_out = _laid_out(spec)
    run_values = _axis_values(rows)
    split = [axis for axis in AXES if len(run_values[axis]) > 1 and axis not in laid_out]
    values = _axis_values(chosen)
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
            _Grid(
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


def _unique_stems(grids: list[_Grid]) -> list[_Grid]:
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


def _label(axis: str, value: Any) -> str:
    if axis == "variation_seed" and value == -1:
        return "no variation"
    return f"{AXIS_TITLES[axis]}: {_format(value)}"


# ---------------------------------------------------------------------------------------------
# What each cell shows


@dataclass(frozen=True)
class _Content:
    """One cell: an image file, or a placeholder saying why there is none."""

    image: Path | None
    text: str = ""
    failed: bool = False
    is_job_cell: bool = True  # False for the init image row/column
    state: str = ""  # the job and image bytes it shows, for the content hash


def _job_content(run_dir: Path, row: ManifestRow | None) -> _Content:
    if row is None:
        return _Content(None, "no image", state="none")
    if row.status == "failed":
        return _Content(None, f"failed\n{row.error}", failed=True, state=f"failed {row.id}")
    image = run_dir / row.path
    if not image.is_file():
        return _Content(None, "image file missing", state=f"missing {row.id}")
    return _Content(image, state=f"{row.id} {row.sha256}")


class _InitImages:
    """Init images by label, found beside the recipe that recipe.lock.yaml names, and shown
    only while their bytes are still those the jobs were made from."""

    def __init__(self, run_dir: Path, rows: list[ManifestRow]) -> None:
        self.recipe_folder = _recipe_folder(run_dir / LOCK_FILE_NAME)
        self.sha256 = {row.init_image: row.init_image_sha256 for row in rows}
        self.contents: dict[str, _Content] = {}

    def content(self, label: str) -> _Content:
        if label not in self.contents:
            self.contents[label] = self._read(label)
        return self.contents[label]

    def _read(self, label: str) -> _Content:
        expected = self.sha256.get(label, "")
        if self.recipe_folder is None:
            return _Content(None, f"init image unknown: no {LOCK_FILE_NAME}", is_job_cell=False)
        path = self.recipe_folder / label
        try:
            data = path.read_bytes()
        except OSError:
            return _Content(None, f"init image not found: {label}", is_job_cell=False)
        if hashlib.sha256(data).hexdigest() != expected:
            return _Content(None, "init image changed since the run", is_job_cell=False)
        return _Content(path, is_job_cell=False, state=expected)


def _recipe_folder(lock_file: Path) -> Path | None:
    try:
        lock = yaml.safe_load(lock_file.read_text(encoding="utf-8"))
        return Path(lock["recipe"]).parent
    except (OSError, yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class _Table:
    """One sub-grid: column labels, row labels, and rows of cells."""

    title: str  # the z label; "" without z
    column_labels: list[str]
    row_labels: list[str]
    rows: list[list[_Content]]


def _tables(run_dir: Path, grid: _Grid, inits: _InitImages) -> list[_Table]:
    spec = grid.spec
    tables = []
    for z in grid.z_values:
        column_labels = [_label(spec.x, x) for x in grid.x_values]
        row_labels = [_label(spec.y, y) if spec.y else "" for y in grid.y_values]
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
        tables.append(_Table(_label(spec.z, z) if spec.z else "", column_labels, row_labels, rows))
    return tables


def _init_label(grid: _Grid, y: Any, z: Any) -> str:
    """The init image of the cells of row `y` of sub-grid `z` (x is not init_image)."""
    if grid.spec.y == "init_image":
        return str(y)
    if grid.spec.z == "init_image":
        return str(z)
    return str(grid.fixed["init_image"])


# ---------------------------------------------------------------------------------------------
# Writing, or keeping what is there


def _write(run_dir: Path, grid: _Grid, path: Path, inits: _InitImages, view: str) -> GridResult:
    tables = _tables(run_dir, grid, inits)
    content = _content_hash(grid, tables)
    jobs = grid.jobs()
    recorded = _recorded(path)
    if recorded is not None and (recorded.get("content"), recorded.get("view")) == (content, view):
        return GridResult(path, jobs, False, str(recorded.get("note", "")), grid.fixed)
    layout, note = _fitting_layout(grid, tables)
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
    write_png_atomically(_draw(layout), path, info)
    return GridResult(path, jobs, True, note, grid.fixed)


def _content_hash(grid: _Grid, tables: list[_Table]) -> str:
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


# ---------------------------------------------------------------------------------------------
# Layout: sizes and positions, shrunk until the grid fits the limits


@dataclass(frozen=True)
class _Style:
    cell: tuple[int, int]  # width, height
    margin: int
    font_size: int

    @property
    def padding(self) -> int:
        return max(2, self.font_size // 3)

    def scaled(self, factor: float) -> _Style:
        width, height = self.cell
        return _Style(
            (max(1, int(width * factor)), max(1, int(height * factor))),
            int(self.margin * factor),
            max(MIN_FONT_SIZE, int(self.font_size * factor)),
        )


def _style(grid: _Grid) -> _Style:
    width, height = grid.image_size
    longest = grid.spec.cell or min(max(width, height), DEFAULT_CELL_SIDE)
    scale = longest / max(width, height)
    font_size = min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, round(longest / 11)))
    return _Style((round(width * scale), round(height * scale)), grid.spec.margin, font_size)


@dataclass(frozen=True)
class _Text:
    lines: tuple[str, ...]
    size: int

    @property
    def height(self) -> int:
        return len(self.lines) * _line_height(self.size)


@dataclass(frozen=True)
class _TextItem:
    left: int
    top: int
    width: int  # lines are centred in it, or start at `left` when not `centred`
    text: _Text
    ink: Colour = INK
    centred: bool = True


@dataclass(frozen=True)
class _CellItem:
    box: tuple[int, int, int, int]  # left, top, width, height
    content: _Content
    text: _Text  # the placeholder's, fitted to the box


@dataclass
class _Layout:
    size: tuple[int, int]
    cells: list[_CellItem]
    texts: list[_TextItem]
    job_boxes: list[tuple[int, int, int, int]]


def _fitting_layout(grid: _Grid, tables: list[_Table]) -> tuple[_Layout, str]:
    natural = style = _style(grid)
    note = ""
    layout = _layout(grid, tables, style, note)
    while _over_limits(layout.size):
        width, height = layout.size
        factor = min(
            (MAX_GRID_PIXELS / (width * height)) ** 0.5, MAX_GRID_SIDE / max(width, height)
        )
        style = style.scaled(min(factor, 0.97))
        if min(style.cell) < MIN_CELL_SIDE:
            raise GridError(
                f"{grid.stem}: {len(grid.coordinates())} cells do not fit in {MAX_GRID_PIXELS:,} "
                f"pixels ({MAX_GRID_SIDE:,} px a side) even at {MIN_CELL_SIDE} px each; show "
                "fewer with `where`"
            )
        note = (
            f"downscaled: {style.cell[0]}×{style.cell[1]} px cells instead of "
            f"{natural.cell[0]}×{natural.cell[1]} to stay under {MAX_GRID_PIXELS:,} pixels "
            f"and {MAX_GRID_SIDE:,} px a side"
        )
        layout = _layout(grid, tables, style, note)
    return layout, note


def _over_limits(size: tuple[int, int]) -> bool:
    return size[0] * size[1] > MAX_GRID_PIXELS or max(size) > MAX_GRID_SIDE


def _layout(grid: _Grid, tables: list[_Table], style: _Style, note: str) -> _Layout:
    """Title on top; under it the sub-grids side by side or stacked, whichever is closer to a
    screen's shape.
    Each sub-grid: its z label, column labels, then rows of [row label, cells]; `margin`
    around and between cells."""
    cell_width, cell_height = style.cell
    margin, pad, size = style.margin, style.padding, style.font_size
    line = _line_height(size)
    first = tables[0]
    column_texts = _fit_alike(first.column_labels, cell_width + margin - 2, 3 * line, size)
    column_strip = max(text.height for text in column_texts) + 2 * pad
    row_strip = 0
    if any(first.row_labels):
        widest = max(_font(size).getlength(label) for label in first.row_labels)
        row_strip = min(math.ceil(widest) + 2 * pad, max(cell_width, 10 * size))
    row_texts = _fit_alike(first.row_labels, row_strip - 2 * pad, cell_height, size)
    cells_left = margin + (row_strip + margin if row_strip else 0)
    columns, rows = len(first.column_labels), len(first.row_labels)
    table_width = cells_left + columns * (cell_width + margin)
    z_texts = _fit_alike(
        [table.title for table in tables], table_width - cells_left, 2 * line, size
    )
    z_strip = max(text.height for text in z_texts) + 2 * pad if first.title else 0
    cells_top = z_strip + column_strip + margin
    table_height = cells_top + rows * (cell_height + margin)

    gap = size
    count = len(tables)
    beside = (count * table_width + (count - 1) * gap, table_height)
    stacked = (table_width, count * table_height + (count - 1) * gap)
    side_by_side = _off_screen_shape(beside) <= _off_screen_shape(stacked)
    body_width, body_height = beside if side_by_side else stacked

    title_width = body_width - 2 * pad
    title = _title(grid, note, title_width, size)
    title_height = sum(text.height for text, _ in title) + 2 * pad

    layout = _Layout((body_width, title_height + body_height), [], [], [])
    top = pad
    for text, ink in title:
        layout.texts.append(_TextItem(pad, top, title_width, text, ink, centred=False))
        top += text.height
    for number, (table, z_text) in enumerate(zip(tables, z_texts, strict=True)):
        left = number * (table_width + gap) if side_by_side else 0
        top = title_height + (0 if side_by_side else number * (table_height + gap))
        if table.title:  # centred over the cells
            cells_width = table_width - cells_left
            layout.texts.append(_TextItem(left + cells_left, top + pad, cells_width, z_text))
        for column, text in enumerate(column_texts):
            column_left = left + cells_left + column * (cell_width + margin)
            text_top = top + z_strip + (column_strip - text.height) // 2
            layout.texts.append(
                _TextItem(column_left - margin // 2, text_top, cell_width + margin, text)
            )
        for row, (text, contents) in enumerate(zip(row_texts, table.rows, strict=True)):
            row_top = top + cells_top + row * (cell_height + margin)
            if row_strip:
                text_top = row_top + (cell_height - text.height) // 2
                layout.texts.append(
                    _TextItem(left + margin + pad, text_top, row_strip - 2 * pad, text)
                )
            for column, content in enumerate(contents):
                box = (
                    left + cells_left + column * (cell_width + margin),
                    row_top,
                    cell_width,
                    cell_height,
                )
                placeholder = _fit(content.text, cell_width - 2 * pad, cell_height - 2 * pad, size)
                layout.cells.append(_CellItem(box, content, placeholder))
                if content.is_job_cell:
                    layout.job_boxes.append(box)
    return layout


def _title(grid: _Grid, note: str, width: int, size: int) -> list[tuple[_Text, Colour]]:
    """The axes laid out, what every cell shares, and why the grid was downscaled."""
    line = _line_height(size)
    heading = " × ".join(AXIS_TITLES[axis] for axis in _laid_out(grid.spec))
    fixed = [_label(axis, value) for axis, value in grid.fixed.items()]
    title = [(_fit(heading, width, 2 * line, size), INK), (_pack(fixed, width, size), INK)]
    if note:
        title.append((_fit(note, width, 4 * line, size), NOTE_INK))
    return title


def _off_screen_shape(size: tuple[int, int]) -> float:
    """How far a picture's shape is from a 16:9 screen's (0 when it is 16:9)."""
    return abs(math.log(size[0] / max(1, size[1]) / (16 / 9)))


# ---------------------------------------------------------------------------------------------
# Drawing


def _draw(layout: _Layout) -> Image.Image:
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for item in layout.cells:
        left, top, width, height = item.box
        picture = _picture(item.content.image, (width, height)) if item.content.image else None
        if picture is not None:
            offset = (left + (width - picture.width) // 2, top + (height - picture.height) // 2)
            canvas.paste(picture, offset)
            continue
        corner = (left + width - 1, top + height - 1)
        draw.rectangle((left, top, *corner), PLACEHOLDER_FILL, PLACEHOLDER_EDGE)
        text = item.text
        if item.content.image is not None:  # a file there but not an image Pillow can read
            text = _fit("cannot read the image", width - 4, height - 4, item.text.size)
        ink = FAILED_INK if item.content.failed else PLACEHOLDER_INK
        text_top = top + (height - text.height) // 2
        _draw_text(draw, _TextItem(left, text_top, width, text, ink))
    for text_item in layout.texts:
        _draw_text(draw, text_item)
    return canvas


def _picture(path: Path, box: tuple[int, int]) -> Image.Image | None:
    """The image at `path` scaled to fit `box`, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return ImageOps.contain(upright, box, Image.Resampling.LANCZOS)


def _draw_text(draw: ImageDraw.ImageDraw, item: _TextItem) -> None:
    font = _font(item.text.size)
    for number, line in enumerate(item.text.lines):
        indent = (item.width - font.getlength(line)) / 2 if item.centred else 0
        top = item.top + number * _line_height(item.text.size)
        draw.text((item.left + max(0, indent), top), line, font=font, fill=item.ink)


# ---------------------------------------------------------------------------------------------
# Text: the font, wrapping, shrinking to fit


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(FONT_FILE, size)
    except OSError:  # installed without its font file: Pillow's own (Latin letters only)
        font = ImageFont.load_default(size)
        assert isinstance(font, ImageFont.FreeTypeFont)
        return font


def _line_height(size: int) -> int:
    ascent, descent = _font(size).getmetrics()
    return ascent + descent


def _fit(text: str, width: int, height: int, size: int) -> _Text:
    """`text` wrapped to `width` at the largest size from `size` down to MIN_FONT_SIZE whose
    lines fit in `height` without breaking a word; at the smallest, cut short with "…"."""
    if not text:
        return _Text((), size)
    for candidate in range(size, MIN_FONT_SIZE - 1, -1):
        lines, broke_a_word = _wrap(text, _font(candidate), width)
        if not broke_a_word and len(lines) * _line_height(candidate) <= height:
            return _Text(tuple(lines), candidate)
    smallest = min(size, MIN_FONT_SIZE)
    font = _font(smallest)
    lines, _ = _wrap(text, font, width)
    room = height // _line_height(smallest)
    if len(lines) > room:
        lines = lines[:room]
        if lines:
            lines[-1] = _cut(lines[-1] + "…", font, width)
    return _Text(tuple(lines), smallest)


def _fit_alike(texts: list[str], width: int, height: int, size: int) -> list[_Text]:
    """Each of `texts` fitted, all at the size the longest needs: a strip of labels reads
    evenly."""
    size = min((_fit(text, width, height, size).size for text in texts), default=size)
    return [_fit(text, width, height, size) for text in texts]


def _pack(items: list[str], width: int, size: int) -> _Text:
    """`items` joined by " · ", with line breaks between items (inside one only if it is
    wider than a line)."""
    font = _font(size)
    lines: list[str] = []
    for item in items:
        if lines and font.getlength(f"{lines[-1]} · {item}") <= width:
            lines[-1] = f"{lines[-1]} · {item}"
        else:
            lines += _wrap(item, font, width)[0]
    return _Text(tuple(lines), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> tuple[list[str], bool]:
    """Greedy wrap at spaces and after "/" (paths); a word wider than `width` is broken.
    Also says whether one was."""
    lines: list[str] = []
    broke_a_word = False
    for paragraph in _shown(text).splitlines() or [""]:
        line = ""
        for piece in re.findall(r"\s+|[^\s/]*/|[^\s/]+", paragraph):
            if piece.isspace():
                line += " " if line else ""
            elif not line or font.getlength(line + piece) <= width:
                line += piece
            else:
                lines.append(line.rstrip())
                line = piece
            while len(line) > 1 and font.getlength(line) > width:  # one piece, too wide
                broke_a_word = True
                cut = max(1, len(_cut(line, font, width)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line.rstrip())
    return lines, broke_a_word


def _shown(text: str) -> str:
    """`text` with "□" for each character the font has no glyph for (it would draw nothing)."""
    return "".join(c if c.isspace() or _has_glyph(c) else "□" for c in text)


@lru_cache(maxsize=4096)
def _has_glyph(character: str) -> bool:
    font = _font(20)
    missing = font.getmask("\uffff")  # a non-character: the font's "no glyph" glyph
    drawn = font.getmask(character)
    return (drawn.size, bytes(drawn)) != (missing.size, bytes(missing))


def _cut(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The longest start of `text` that fits `width`, keeping a final "…" if it had one."""
    ending = "…" if text.endswith("…") else ""
    body = text.removesuffix(ending)
    while body and font.getlength(body + ending) > width:
        body = body[:-1]
    return body.rstrip() + ending
