"""The `batchgen` command: thin click commands over the library.

Exit codes: 0 all done, 1 some jobs failed (or `verify` found a mismatch), 2 bad input,
75 another run holds the output folder, 130/143 interrupted.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_args

import click
from rich.console import Console

from batchgen import __version__
from batchgen.cli_options import (
    comparison_options,
    max_jobs_option,
    recipe_with_run_options,
    redo_option,
    run_dir_argument,
)
from batchgen.engine.devices import FastPaths, default_dtype, guess_device
from batchgen.errors import BatchgenError
from batchgen.jobs.matrix import check, upper_bound
from batchgen.jobs.plan import Redo, summarize_plan
from batchgen.jobs.shard import Shard
from batchgen.recipe.load import Recipe, load_recipe
from batchgen.recipe.problems import Problem, RecipeError
from batchgen.recipe.schema import AxisName, recipe_json_schema
from batchgen.running.recipe_changes import lock_changes
from batchgen.store.files import PNG_COMPRESS_LEVEL, read_lock_file
from batchgen.views.listings import print_models, print_schedulers
from batchgen.views.plan_table import PLAN_COLUMNS, print_plan
from batchgen.views.status import describe as describe_status
from batchgen.views.status import run_status


class _Commands(click.Group):
    """The command group, and the one place where batchgen's errors become text on stderr
    and an exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchgenError as error:
            text = error.report()
            click.echo(text if isinstance(error, RecipeError) else f"error: {text}", err=True)
            ctx.exit(error.exit_code)


def _checked_recipe(path: Path, output: Path | None, max_jobs: int) -> Recipe:
    recipe = load_recipe(path, output)
    problems = check(recipe, max_jobs)
    if problems:
        raise RecipeError(problems)
    for warning in recipe.warnings:
        click.echo(f"warning: {warning}", err=True)
    return recipe


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Example: batchgen validate recipes/example.yaml && batchgen run recipes/example.yaml",
)
@click.version_option(__version__, prog_name="batchgen")
def main() -> None:
    """Stable Diffusion img2img sweeps from YAML recipes: every image, a manifest saying how
    each was made, and the same pixels again next time."""


@main.command()
@recipe_with_run_options
@redo_option
@click.option("--dry-run", is_flag=True, help="Say what a run would do, and do nothing.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first job that fails.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors and the summary.")
@click.option(
    "--verify-against",
    "reference",
    type=click.Path(path_type=Path),
    default=None,
    metavar="REF",
    help="After the run, check its images against a reference run as `batchgen verify` does "
    "(for CI); exit 1 when they do not match.",
)
@click.option(
    "--fast",
    "fast_paths",
    multiple=True,
    type=click.Choice([field.name for field in fields(FastPaths)]),
    help="Opt-in speed-ups, repeatable; each changes pixels within a tolerance and is recorded "
    "in the manifest's fast_paths column: channels_last, compile (torch.compile of the UNet: "
    "minutes of warm-up per batch shape, then faster), vae_tiling and vae_slicing (less "
    "memory for large images and batches), tf32 (Ampere+ GPUs, float32 only), offload (model "
    "CPU offload: each model on the GPU only while it runs, for GPUs too small to hold them).",
)
@click.option(
    "--png-compression",
    type=click.IntRange(0, 9),
    default=PNG_COMPRESS_LEVEL,
    show_default=True,
    metavar="0-9",
    help="The images' zlib level. 1 writes fastest; 6 (Pillow's default) makes files about "
    "17% smaller for 3-4x the CPU time, 9 about 22% smaller for 25x. Lossless at every level: "
    "pixels and job ids do not depend on it.",
)
@comparison_options
def run(
    recipe: Path,
    device: str,
    dtype: str | None,
    output: Path | None,
    max_jobs: int,
    shard: Shard | None,
    redo: Redo | None,
    dry_run: bool,
    fail_fast: bool,
    quiet: bool,
    batch_size: int | Literal["auto"],
    fast_paths: tuple[str, ...],
    png_compression: int,
    reference: Path | None,
    max_diff: int | None,
    min_psnr: float | None,
    diff_dir: Path | None,
) -> None:
    """Make every image of RECIPE that its run folder does not have yet.

    Safe to interrupt or kill at any moment: running the same command again finishes what
    is missing and redoes nothing. Exit codes: 0 all done, 1 some jobs failed or the folder
    could not be written, 2 bad input, 75 another run holds the folder, 130/143 stopped by
    SIGINT/SIGTERM.

    \b
    Example:
      batchgen run recipes/example.yaml
      batchgen run sweep.yaml --device cuda:1 --output /data/sweeps/fire
      batchgen run sweep.yaml --redo failed        # retry only what failed
      batchgen run sweep.yaml --shard 2/4          # the second of four slices
      accelerate launch --num_processes 4 -m batchgen run sweep.yaml
    """
    if dry_run:
        _show_plan(recipe, device, dtype, output, max_jobs, shard, batch_size, redo, show_all=False)
        click.echo("dry run: nothing was made")
        return
    from batchgen.running.runner import run as run_recipe

    result = run_recipe(
        recipe,
        device=device,
        dtype=dtype,
        output=output,
        max_jobs=max_jobs,
        fail_fast=fail_fast,
        quiet=quiet,
        shard=shard,
        redo=redo,
        batch_size=batch_size,
        fast_paths=FastPaths(**dict.fromkeys(fast_paths, True)),
        png_compression=png_compression,
    )
    if reference is not None and result.exit_code == 0:
        verified = _verify(result.output, reference, max_diff, min_psnr, diff_dir)
        sys.exit(0 if verified else 1)
    sys.exit(result.exit_code)


@main.command()
@recipe_with_run_options
@redo_option
@click.option("--all", "show_all", is_flag=True, help="List every job, not the first 50.")
def plan(**options: Any) -> None:
    """Show RECIPE's jobs, what is done and what a run would do. Loads no model.

    \b
    Example:
      batchgen plan recipes/example.yaml
      batchgen plan sweep.yaml --shard 1/4    # which jobs the first of four shards runs
    """
    _show_plan(**options)  # `run --dry-run` shows the same


def _show_plan(
    recipe: Path,
    device: str,
    dtype: str | None,
    output: Path | None,
    max_jobs: int,
    shard: Shard | None,
    batch_size: int | Literal["auto"],
    redo: Redo | None,
    show_all: bool,
) -> None:
    checked = _checked_recipe(recipe, output, max_jobs)
    resolved_dtype = default_dtype(dtype or checked.dtype, guess_device(device))
    summary = summarize_plan(
        checked,
        resolved_dtype,
        shard,
        redo,
        batch_size,
        keep=None if show_all else 50,
        columns=PLAN_COLUMNS,
    )
    print_plan(summary)
    changes = lock_changes(read_lock_file(checked.output), checked.locked())
    for alarm in changes.content_changed:
        click.echo(f"warning: {alarm}", err=True)
    for change in changes.changed:
        click.echo(f"changed since the last run in this folder: {change}")


@main.command()
@click.argument(
    "recipes",
    nargs=-1,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="RECIPE.yaml...",
)
@max_jobs_option
def validate(recipes: tuple[Path, ...], max_jobs: int) -> None:
    """Check recipes without loading torch: every problem at once, with file:line, field and
    a hint. Exit 2 when any recipe has a problem.

    \b
    Example:
      batchgen validate recipes/*.yaml
    """
    problems: list[Problem] = []
    for path in recipes:
        try:
            recipe = load_recipe(path)
        except RecipeError as error:
            problems += error.problems
            continue
        found = check(recipe, max_jobs)
        problems += found
        for warning in recipe.warnings:
            click.echo(f"warning: {warning}", err=True)
        if not found:
            axes = ", ".join(f"{axis} ×{len(v)}" for axis, v in recipe.axes.items() if len(v) > 1)
            click.echo(f"{path}: ok, up to {upper_bound(recipe)} jobs ({axes or 'one job'})")
    if problems:
        raise RecipeError(problems)


@main.command()
def schema() -> None:
    """Print the recipe's JSON Schema, for editors that validate and complete YAML.

    \b
    Example:
      batchgen schema > batchgen-recipe.schema.json
    """
    click.echo(json.dumps(recipe_json_schema(), indent=2))


@main.command()
def schedulers() -> None:
    """List the scheduler (sampler) names a recipe's `scheduler:` takes.

    \b
    Example:
      batchgen schedulers
    """
    print_schedulers()


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False, exists=True, path_type=Path))
def models(folders: tuple[Path, ...]) -> None:
    """List what a recipe's `model:` can name here, with each one's family: the builtins,
    diffusers pipelines in the local Hugging Face cache, and pipelines and single-file
    checkpoints in FOLDERS (or one level below); a file or folder batchgen would not render (a
    LoRA, a VAE, FLUX) is listed with why. Nothing is loaded or downloaded, ever.

    \b
    Example:
      batchgen models ~/models
    """
    print_models(list(folders))


@main.command()
@click.argument(
    "run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), metavar="RUN_DIR"
)
@click.option("--x", metavar="AXIS", help="Axis across: " + ", ".join(get_args(AxisName)) + ".")
@click.option("--y", metavar="AXIS", help="Axis down.")
@click.option("--z", metavar="AXIS", help="One sub-grid per value.")
@click.option(
    "--where",
    multiple=True,
    metavar="AXIS=VALUE",
    help="Only these jobs; repeat, e.g. --where seed=1592514025.",
)
@click.option("--show-init", is_flag=True, default=None, help="Show the init image first.")
@click.option("--cell", type=int, help="Longest side of a cell in px (default: image, ≤ 256).")
@click.option("--margin", type=int, help="Space between cells in px.")
@click.option("--name", help="File name in RUN_DIR/grids/, without .png.")
def grid(
    run_dir: Path,
    x: str | None,
    y: str | None,
    z: str | None,
    where: tuple[str, ...],
    show_init: bool | None,
    cell: int | None,
    margin: int | None,
    name: str | None,
) -> None:
    """Draw labelled comparison grids from RUN_DIR's manifest into RUN_DIR/grids/. Without
    --x: the recipe's `grids:`, else a default one. Works on half-finished runs too.

    \b
    Example:
      batchgen grid outputs/example --x strength --y prompt --show-init
      batchgen grid outputs/sweep --x cfg --y seed --where prompt=fire
    """
    from batchgen.views.grid import make_grids, make_run_grids, spec_from_options  # slow

    if not x and (y or z or where):
        raise click.UsageError("--y, --z and --where need --x")
    removed: list[Path] = []
    if x:
        options = {"x": x, "y": y, "z": z, "where": where, "show_init": show_init}
        spec = spec_from_options(**options, cell=cell, margin=margin, name=name)
        results = make_grids(run_dir, [spec])
    else:
        results, removed = make_run_grids(run_dir)
    for path in removed:
        click.echo(f"removed {path} (the run's grids no longer include it)")
    for result in results:
        state = "wrote" if result.written else "unchanged"
        click.echo(f"{state} {result.path}" + (f" ({result.note})" if result.note else ""))


@main.command()
@run_dir_argument
def report(run_dir: Path) -> None:
    """Write RUN_DIR/report.html: thumbnails grouped like the grids, the manifest as a
    sortable, filterable table, and the run summary. Loads no model; `run` rewrites it too.

    \b
    Example:
      batchgen report outputs/example
    """
    from batchgen.views.report import write_report  # with the grid module: slow to import

    click.echo(write_report(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path), metavar="RUN_DIR")
@click.option(
    "--against",
    "reference",
    required=True,
    type=click.Path(path_type=Path),
    metavar="REF",
    help="The reference: a run folder, or one of its manifest CSV files (that ledger alone).",
)
@comparison_options
def verify(
    run_dir: Path,
    reference: Path,
    max_diff: int | None,
    min_psnr: float | None,
    diff_dir: Path | None,
) -> None:
    """Check that RUN_DIR reproduces REF: the same jobs, matched by id, with the same pixels.
    Loads no model.

    Images are compared as decoded RGB(A) pixels, so a PNG re-saved with other metadata still
    matches; a changed model hash, or a file changed since its run, is noted. On the CPU,
    pixels are identical run to run (keep the thread count: the manifest's `device` column);
    on a GPU, fp16 results move with the batch size, so give a tolerance. Job ids include
    the dtype: compare a float16 run with a float16 reference.

    Exit 0 when every finished job of REF is done in RUN_DIR and matches; 1 when some are
    missing or mismatched (listed in a table); 2 when RUN_DIR or REF is not a run. Jobs done in
    RUN_DIR but absent from REF are listed, not failed.

    \b
    Example:
      batchgen verify outputs/example --against tests/reference/example
      batchgen verify runs/gpu --against ref/manifest.csv --max-diff 2 --diff runs/gpu-diff
    """
    sys.exit(0 if _verify(run_dir, reference, max_diff, min_psnr, diff_dir) else 1)


def _verify(
    run_dir: Path,
    reference: Path,
    max_diff: int | None,
    min_psnr: float | None,
    diff_dir: Path | None,
) -> bool:
    from batchgen.views.verify import (  # numpy: slow
        Tolerance,
        print_report,
        verify_run,
    )

    verification = verify_run(
        run_dir, reference, Tolerance.from_options(max_diff, min_psnr), diff_dir
    )
    print_report(verification, Console(width=None if sys.stdout.isatty() else 160))
    return verification.ok


@main.command()
@run_dir_argument
def status(run_dir: Path) -> None:
    """Where RUN_DIR stands: done and failed jobs (with their errors), time spent, images/s,
    what is left of the recipe it was last run from, and whether a run is writing it now.
    Reads the manifest; loads no model.

    \b
    Example:
      batchgen status outputs/example
    """
    click.echo(describe_status(run_status(run_dir)))
