"""The table `batchgen plan` prints: the parameters that vary between jobs as columns, the
fixed ones on one line above, each job's status, and what a run would do."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.table import Table

from batchgen.jobs.job import Job
from batchgen.jobs.plan import PlanSummary
from batchgen.store.images import mask_label

# How `plan` shows each parameter: the column title and the text of a job's value.
PLAN_COLUMNS: dict[str, Callable[[Job], str]] = {
    "model": lambda job: job.model_name,
    "init": lambda job: job.init_image.label,
    "prompt": lambda job: job.prompt or '""',
    "strength": lambda job: f"{job.strength:g}",
    "steps": lambda job: str(job.steps),
    "cfg": lambda job: f"{job.cfg:g}",
    "seed": lambda job: str(job.seed),
    "scheduler": lambda job: job.scheduler,
    "size": lambda job: (
        f"{job.width}x{job.height}"
        + (f"→{job.final_size[0]}x{job.final_size[1]}" if job.final_size else "")
    ),
    "variation": lambda job: (
        f"{job.variation_seed} @{job.variation_amount:g}" if job.variation_seed is not None else "—"
    ),
    "iteration": lambda job: str(job.iteration),
    "mask": lambda job: (
        f"{mask_label(job)} (blur {job.mask_blur}{', inverted' if job.invert_mask else ''})"
        if job.inpaints
        else "—"
    ),
}
# Columns not worth the fixed line when no job uses them.
_UNUSED_TEXT = {"variation": "—", "iteration": "0", "mask": "—"}


def print_plan(the_plan: PlanSummary) -> None:
    """A table of the parameters that vary between jobs; the fixed ones in one line above."""
    console = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
    recipe = the_plan.recipe
    varying = [name for name in PLAN_COLUMNS if name in the_plan.varying]
    first = the_plan.head[0].job if the_plan.head else None
    fixed = [
        f"{name} {show(first)}"
        for name, show in PLAN_COLUMNS.items()
        if name not in varying and first and show(first) != _UNUSED_TEXT.get(name)
    ]
    console.print(f"[bold]{recipe.name}[/] → {recipe.output}")
    console.print("fixed: " + " · ".join(fixed) + f" · dtype {the_plan.dtype}", markup=False)
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    for name in varying:
        table.add_column(
            name,
            overflow="fold",
            no_wrap=name != "prompt",
            justify="left" if name in ("model", "init", "prompt", "scheduler") else "right",
        )
    table.add_column("taken", justify="right", no_wrap=True)
    table.add_column("status", no_wrap=True)
    if the_plan.shard:
        table.add_column("shard", no_wrap=True)
    styles = {"done": "green", "failed": "red", "todo": ""}
    for planned in the_plan.head:
        job = planned.job
        shard_cell = ("this" if planned.mine else "other",) if the_plan.shard else ()
        table.add_row(
            str(job.index),
            job.id[:8],
            *(PLAN_COLUMNS[name](job) for name in varying),
            str(job.steps_taken),
            f"{planned.status} ({planned.note})" if planned.note else planned.status,
            *shard_cell,
            style=styles[planned.status] if planned.mine else "dim",
        )
    console.print(table)
    if len(the_plan.head) < the_plan.total:
        console.print(f"… {the_plan.total - len(the_plan.head)} more (--all lists them)")
    summary = (
        f"{the_plan.total} jobs: {the_plan.count('done')} done, "
        f"{the_plan.count('failed')} failed, {the_plan.count('todo')} to do"
    )
    if the_plan.shard:
        summary += f"; shard {the_plan.shard} runs {the_plan.to_run} of them"
    elif the_plan.redo:
        summary += f"; --redo {the_plan.redo} makes {the_plan.to_run}"
    console.print(
        f"{summary}; {the_plan.steps_to_run} denoising steps to run "
        f"({the_plan.megapixel_steps_to_run:.2f} megapixel-steps)"
    )
    if the_plan.outside:
        kept = sum(1 for row in the_plan.outside if row.status == "done")
        console.print(
            f"{len(the_plan.outside)} job(s) in the manifest are not in the current recipe "
            f"({kept} with images, kept on disk and in the manifest)",
            markup=False,
        )
