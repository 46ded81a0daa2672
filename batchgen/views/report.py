"""report.html: a run folder as one static page — thumbnails laid out like the grids, the
manifest as a sortable, filterable table, each image's parameters on click, the run's summary.

Made from the manifest (the latest row of each job, done or failed), recipe.lock.yaml and
grids/*.png, so it works on a finished, half-finished or resumed run. The page needs no server
and no network: its links are relative, its CSS and JS are inline (report_template.html).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote

from PIL import Image

from batchgen import __version__
from batchgen.recipe.load import AXES
from batchgen.store.files import (
    LOCK_FILE_NAME,
    MANIFEST_NAME,
    SHARD_LEDGER_DIR,
    read_lock_file,
    write_file_atomically,
)
from batchgen.store.manifest import MANIFEST_COLUMNS, Manifest, ManifestRow

REPORT_NAME = "report.html"
GRIDS_DIR = "grids"
GRID_CHUNK = "batchgen-grid"  # the PNG text chunk grid.py writes: JSON with spec, jobs, fixed
TEMPLATE_NAME = "report_template.html"
# What `batchgen run` writes first (the lock) or as jobs finish (the ledgers).
RUN_FOLDER_MARKS = (LOCK_FILE_NAME, MANIFEST_NAME, SHARD_LEDGER_DIR)

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


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` atomically from the run folder as it is now; return its path.

    Raises FileNotFoundError when `run_dir` is not a run folder, store.ManifestError when its
    manifest.csv is not batchgen's.
    """
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in RUN_FOLDER_MARKS):
        raise FileNotFoundError(
            f"{run_dir} is not a batchgen run folder: it has no {' or '.join(RUN_FOLDER_MARKS)}. "
            "Give the folder `batchgen run` wrote (the recipe's `output`, or its --output)."
        )
    lock = read_lock_file(run_dir)
    rows = sorted(Manifest(run_dir).latest().values(), key=lambda row: row.index)
    jobs = [_reported_job(run_dir, row) for row in rows]
    grids = _grid_images(run_dir)
    path = run_dir / REPORT_NAME
    write_file_atomically(path, _render_page(run_dir.name, lock, jobs, grids).encode("utf-8"))
    return path


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


def _reported_job(run_dir: Path, row: ManifestRow) -> ReportedJob:
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


def _grid_images(run_dir: Path) -> list[GridImage]:
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


def _axes(lock: dict[str, Any], rows: Sequence[ManifestRow]) -> dict[str, Axis]:
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


def _layout(lock: dict[str, Any], axes: dict[str, Axis]) -> tuple[str | None, str | None]:
    """The thumbnails' x and y axes: the recipe's first grid, else the last two swept axes
    (the last written varies fastest, as in the job order and A1111's X/Y plot)."""
    for grid in lock.get("grids") or ():
        if isinstance(grid, dict) and grid.get("x") in axes:
            y = grid.get("y")
            return grid["x"], y if y in axes and y != grid["x"] else None
    swept = [name for name, axis in axes.items() if axis.swept]
    return (swept[-1] if swept else None), (swept[-2] if len(swept) > 1 else None)


def _groups(
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


# ---------------------------------------------------------------------------------------------
# HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _render_page(
    folder_name: str,
    lock: dict[str, Any],
    jobs: Sequence[ReportedJob],
    grids: Sequence[GridImage],
) -> str:
    """The whole page; everything from the run folder is escaped here."""
    name = str(lock.get("name") or folder_name)
    axes = _axes(lock, [job.row for job in jobs])
    x, y = _layout(lock, axes)
    parts = {
        "version": _e(__version__),
        "title": _e(f"{name} — batchgen report"),
        "name": _e(name),
        "summary": _summary_html(lock, jobs, axes),
        "thumbnails": _thumbnails_html(_groups(jobs, axes, x, y), axes, x, y, grids),
        "grids_nav": '<a href="#grids">Grids</a>' if grids else "",
        "grids": _grids_html(grids),
        "table": _table_html(jobs),
        "jobs_json": _script_json(
            {
                job.row.id: {**asdict(job.row), "parameters": job.parameters, "image": job.image}
                for job in jobs
            }
        ),
    }
    template = resources.files("batchgen.views").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    # One pass, so text put in (a prompt holding "{{table}}") is never substituted again.
    return re.sub(r"\{\{(\w+)\}\}", lambda match: parts[match[1]], template)


def _script_json(data: object) -> str:
    """JSON that cannot end its <script> element or open an HTML comment inside it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _distinct(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in dict.fromkeys(values) if value != "")


def _seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _time_text(iso: str) -> str:
    """`2026-11-25T06:19:09+00:00` → `2026-11-25 06:19:09 UTC` (manifest times are UTC)."""
    return iso.replace("T", " ").replace("+00:00", " UTC")


def _summary_html(lock: dict[str, Any], jobs: Sequence[ReportedJob], axes: dict[str, Axis]) -> str:
    """The counts and speed as tiles, then what was swept and what was fixed."""
    rows = [job.row for job in jobs]
    done = sum(row.status == "done" for row in rows)
    failed = len(rows) - done
    missing = sum(job.missing for job in jobs)
    seconds = sum(row.seconds for row in rows)
    model_names = ", ".join(axes["model"].labels.values()) if "model" in axes else ""
    model_hashes = _distinct(row.model_hash for row in rows)
    versions = [*(row.batchgen_version for row in rows), lock.get("batchgen_version", "")]
    tiles = [  # (term, value, whether it is bad news)
        ("jobs", str(len(rows)), False),
        ("done", str(done), False),
        ("failed", str(failed), failed > 0),
        *([("image files missing", str(missing), True)] if missing else []),
        ("image time", _seconds_text(seconds), False),
        ("images/s", f"{done / seconds:.3g}" if seconds > 0 else "—", False),
        ("model", f"{model_names or '?'}" + (f" [{model_hashes}]" if model_hashes else ""), False),
        ("device", _distinct(row.device for row in rows) or "—", False),
        ("dtype", _distinct(row.dtype for row in rows) or "—", False),
        ("batchgen", _distinct(versions) or __version__, False),
    ]
    items = "".join(
        f"<div{' class=bad' if bad else ''}><dt>{_e(term)}</dt><dd>{_e(value)}</dd></div>"
        for term, value, bad in tiles
    )
    facts = "".join(f'<p class="facts">{fact}</p>' for fact in _facts(lock, rows, axes))
    return f'<dl class="stats">{items}</dl>\n{facts}'


def _facts(lock: dict[str, Any], rows: Sequence[ManifestRow], axes: dict[str, Axis]) -> list[str]:
    """Lines of HTML: when the jobs finished, the swept axes, the fixed parameters, the recipe."""
    facts = []
    if rows:
        finished = sorted(row.finished_at for row in rows)
        facts.append(
            f"finished <b>{_e(_time_text(finished[0]))}</b> to "
            f"<b>{_e(_time_text(finished[-1]))}</b> · image time is the sum of the jobs' "
            "seconds (model loading not included)"
        )
    else:
        facts.append("no job has finished yet")
    swept = [axis for axis in axes.values() if axis.swept]
    if swept:
        facts.append(
            "swept: " + " × ".join(f"<b>{_e(axis.name)}</b> ({len(axis.labels)})" for axis in swept)
        )
    fixed = [
        (axis.name, label)
        for axis in axes.values()
        if axis.name != "model"  # a tile of its own
        for label in axis.labels.values()
        if not axis.swept
    ]
    sizes = {f"{row.width}x{row.height}" for row in rows}
    if len(sizes) == 1:
        fixed.append(("size", sizes.pop()))
    negative_prompts = {row.negative_prompt for row in rows} or {
        str(lock.get("negative_prompt") or "")
    }
    negative = negative_prompts.pop() if len(negative_prompts) == 1 else ""
    if negative:
        fixed.append(("negative prompt", negative))
    if fixed:
        facts.append(
            "fixed: " + " · ".join(f"{_e(name)} <b>{_e(value)}</b>" for name, value in fixed)
        )
    if lock.get("recipe"):
        facts.append(f"recipe <code>{_e(lock['recipe'])}</code>")
    return facts


def _thumbnails_html(
    groups: Sequence[ThumbnailGroup],
    axes: dict[str, Axis],
    x: str | None,
    y: str | None,
    grids: Sequence[GridImage],
) -> str:
    if not groups:
        return '<p class="muted">No images yet: no job of this run has finished.</p>'
    x_labels = axes[x].labels if x else {"": ""}
    y_labels = axes[y].labels if y else {"": ""}
    corner = " ↓ / ".join(_e(name) for name in (y, x) if name) + (" →" if x else "")
    x_headings = "".join(
        f'<th scope="col" class="x">{_e(label)}</th>' for label in x_labels.values() if x
    )
    rows = [
        (f'<th scope="row" class="y">{_e(label)}</th>' if y else "<th></th>", key)
        for key, label in y_labels.items()
    ]
    head = f'<tr><th class="corner">{corner}</th>{x_headings}</tr>'
    return "\n".join(_group_html(group, head, list(x_labels), rows, grids) for group in groups)


def _group_html(
    group: ThumbnailGroup,
    head: str,
    x_keys: Sequence[str],
    rows: Sequence[tuple[str, str]],  # (row heading HTML, y key)
    grids: Sequence[GridImage],
) -> str:
    """One table of thumbnails, titled with the values its jobs share and its grid PNGs."""
    heading = " · ".join(f"{_e(axis)} <b>{_e(label)}</b>" for axis, label in group.fixed)
    ids = {job.row.id for jobs in group.cells.values() for job in jobs}
    links = "".join(
        f' <a class="grid-link" href="{_e(grid.href)}">grid {_e(grid.name)}</a>'
        for grid in grids
        if grid.job_ids & ids
    )
    title = f'<h3 class="group-title">{heading}{links}</h3>' if heading or links else ""
    body = "".join(
        f"<tr>{row_heading}"
        + "".join(_cell_html(group.cells.get((x_key, y_key), [])) for x_key in x_keys)
        + "</tr>"
        for row_heading, y_key in rows
    )
    return (
        f'<div class="group">{title}<table class="layout"><thead>{head}</thead>'
        f"<tbody>{body}</tbody></table></div>"
    )


def _cell_html(jobs: Sequence[ReportedJob]) -> str:
    if not jobs:
        return (
            '<td><div class="placeholder" title="no job with these values in the manifest">'
            "not made</div></td>"
        )
    return f'<td><div class="cell">{"".join(_thumbnail_html(job) for job in jobs)}</div></td>'


def _thumbnail_html(job: ReportedJob) -> str:
    row = job.row
    what = f"#{row.index} {row.prompt or '(empty prompt)'}"
    if job.image:
        return (
            f'<button type="button" class="thumb" data-id="{_e(row.id)}" title="{_e(what)}">'
            f'<img src="{_e(job.image)}" width="{job.width}" height="{job.height}" '
            f'loading="lazy" alt="{_e(what)}"></button>'
        )
    if row.status == "failed":
        return (
            f'<button type="button" class="placeholder failed" data-id="{_e(row.id)}" '
            f'title="{_e(what)}"><b>#{row.index} failed</b>'
            f'<span class="error">{_e(row.error)}</span></button>'
        )
    return (
        f'<button type="button" class="placeholder failed" data-id="{_e(row.id)}" '
        f'title="{_e(what)}"><b>#{row.index} image missing</b>'
        f'<span class="error">{_e(row.path)}</span></button>'
    )


def _grids_html(grids: Sequence[GridImage]) -> str:
    if not grids:
        return ""
    figures = "".join(
        f'<figure><a href="{grid.href}"><img src="{grid.href}" width="{grid.width}" '
        f'height="{grid.height}" loading="lazy" alt="grid {_e(grid.name)}"></a>'
        f"<figcaption><b>{_e(grid.name)}</b>"
        f"{' · ' + _e(grid.description) if grid.description else ''}</figcaption></figure>"
        for grid in grids
    )
    return f'<section id="grids"><h2>Grids</h2><div class="grids">{figures}</div></section>'


@dataclass(frozen=True)
class _Column:
    """A column of the jobs table."""

    heading: str
    cell: Callable[[ReportedJob], str]  # the cell's HTML, escaped
    numeric: bool = False  # sorts as numbers
    css: str = ""
    shown: Literal["always", "varying", "non-empty"] = "varying"  # constants are in the summary
    sort_key: Callable[[ReportedJob], str] | None = None  # when the text does not sort right


def _image_cell(job: ReportedJob) -> str:
    name = PurePosixPath(job.row.path).name
    if job.image:
        return (
            f'<a href="{_e(job.image)}" title="{_e(name)}"><img class="mini" src="{_e(job.image)}" '
            f'width="{job.width}" height="{job.height}" loading="lazy" alt="{_e(name)}"></a>'
        )
    return '<span class="status-failed">missing</span>' if job.missing else ""


_TABLE_COLUMNS: tuple[_Column, ...] = (
    _Column("#", lambda job: _e(job.row.index), numeric=True, css="number", shown="always"),
    _Column("image", _image_cell, shown="always"),
    _Column(
        "status",
        lambda job: f'<span class="status-{_e(job.row.status)}">{_e(job.row.status)}</span>',
        shown="always",
    ),
    _Column("init", lambda job: _e(job.row.init_image)),
    _Column("prompt", lambda job: _e(job.row.prompt), css="prompt", shown="always"),
    _Column("negative", lambda job: _e(job.row.negative_prompt), css="prompt"),
    _Column("strength", lambda job: _e(f"{job.row.strength:g}"), numeric=True, css="number"),
    _Column("steps", lambda job: _e(job.row.steps), numeric=True, css="number"),
    _Column("taken", lambda job: _e(job.row.steps_taken), numeric=True, css="number"),
    _Column("cfg", lambda job: _e(f"{job.row.cfg:g}"), numeric=True, css="number"),
    _Column("seed", lambda job: _e(job.row.seed), numeric=True, css="number"),
    _Column("scheduler", lambda job: _e(job.row.scheduler)),
    _Column(
        "variation",
        lambda job: (
            _e(f"{job.row.variation_seed} @{job.row.variation_strength:g}")
            if job.row.variation_seed >= 0
            else ""
        ),
    ),
    _Column("iteration", lambda job: _e(job.row.iteration), numeric=True, css="number"),
    _Column("mask", lambda job: _e(job.row.mask), shown="non-empty"),
    _Column(
        "size",
        lambda job: _e(f"{job.row.width}x{job.row.height}"),
        numeric=True,
        css="number",
        sort_key=lambda job: str(job.row.width * job.row.height),
    ),
    _Column("model", lambda job: _e(job.row.model_hash)),
    _Column("dtype", lambda job: _e(job.row.dtype)),
    _Column("device", lambda job: _e(job.row.device)),
    _Column(
        "seconds",
        lambda job: _e(f"{job.row.seconds:.2f}"),
        numeric=True,
        css="number",
        shown="always",
    ),
    _Column(
        "finished (UTC)",
        lambda job: _e(job.row.finished_at.replace("T", " ").removesuffix("+00:00")),
        css="time",
        shown="always",
    ),
    _Column("error", lambda job: _e(job.row.error), css="error", shown="non-empty"),
)


def _table_html(jobs: Sequence[ReportedJob]) -> str:
    """Every job, a row each; the parameters all jobs share are left to the summary."""
    cells = {column: [column.cell(job) for job in jobs] for column in _TABLE_COLUMNS}
    columns = [
        column
        for column, texts in cells.items()
        if column.shown == "always"
        or (column.shown == "varying" and len(set(texts)) > 1)
        or (column.shown == "non-empty" and any(texts))
    ]
    headings = "".join(
        f'<th scope="col"{" data-type=number" if column.numeric else ""}'
        f"{' aria-sort=ascending' if column is columns[0] else ''}>"
        f'<button type="button">{_e(column.heading)}</button></th>'
        for column in columns
    )
    rows = []
    for number, job in enumerate(jobs):
        tds = "".join(
            f"<td{f' class={column.css}' if column.css else ''}"
            f"{f' data-sort={column.sort_key(job)}' if column.sort_key else ''}>"
            f"{cells[column][number]}</td>"
            for column in columns
        )
        row = job.row
        rows.append(
            f'<tr data-id="{_e(row.id)}" data-index="{row.index}" data-status="{_e(row.status)}" '
            f'data-path="{_e(row.path)}"{" class=failed" if row.status == "failed" else ""}>'
            f"{tds}</tr>"
        )
    body = "\n".join(rows)
    return f'<table id="jobs"><thead><tr>{headings}</tr></thead>\n<tbody>\n{body}\n</tbody></table>'
