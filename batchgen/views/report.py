"""report.html: a run folder as one static page — thumbnails laid out like the grids, the
manifest as a sortable, filterable table, each image's parameters on click, the run's summary.

Made from the manifest (the latest row of each job, done or failed), recipe.lock.yaml and
grids/*.png, so it works on a finished, half-finished or resumed run. The page needs no server
and no network: its links are relative, its CSS and JS are inline (report_template.html).

This module writes the page and renders its HTML; report_data.py gathers what it shows.
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

from batchgen import __version__
from batchgen.store.files import (
    read_lock_file,
    write_file_atomically,
)
from batchgen.store.manifest import Manifest, ManifestRow, require_run_folder
from batchgen.views.report_data import (
    Axis,
    GridImage,
    ReportedJob,
    ThumbnailGroup,
    grid_images,
    reported_job,
    run_axes,
    thumbnail_axes,
    thumbnail_groups,
)

REPORT_NAME = "report.html"
TEMPLATE_NAME = "report_template.html"


# What `batchgen run` writes first (the lock) or as jobs finish (the ledgers).
def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.html` atomically from the run folder as it is now; return its path.

    Raises NotARunFolderError when `run_dir` is not a run folder, ManifestError when its
    manifest.csv is not batchgen's.
    """
    run_dir = Path(run_dir)
    require_run_folder(run_dir)
    lock = read_lock_file(run_dir)
    rows = sorted(Manifest(run_dir).latest().values(), key=lambda row: row.index)
    jobs = [reported_job(run_dir, row) for row in rows]
    grids = grid_images(run_dir)
    path = run_dir / REPORT_NAME
    write_file_atomically(path, _render_page(run_dir.name, lock, jobs, grids).encode("utf-8"))
    return path


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
    axes = run_axes(lock, [job.row for job in jobs])
    x, y = thumbnail_axes(lock, axes)
    parts = {
        "version": _e(__version__),
        "title": _e(f"{name} — batchgen report"),
        "name": _e(name),
        "summary": _summary_html(lock, jobs, axes),
        "thumbnails": _thumbnails_html(thumbnail_groups(jobs, axes, x, y), axes, x, y, grids),
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
