"""The options several `batchgen` commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import click

from batchgen.engine.devices import DTYPES
from batchgen.jobs.matrix import DEFAULT_MAX_JOBS
from batchgen.jobs.shard import Shard, ShardError, parse_shard

recipe_argument = click.argument(
    "recipe", type=click.Path(dir_okay=False, path_type=Path), metavar="RECIPE.yaml"
)
output_option = click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder; overrides the recipe's `output` (default: outputs/<name>).",
)
max_jobs_option = click.option(
    "--max-jobs",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_JOBS,
    show_default=True,
    help="Refuse recipes whose matrix is larger than this.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    metavar="auto|cpu|cuda[:N]|mps",
    help="Where to run; auto picks CUDA, then MPS, then the CPU.",
)
dtype_option = click.option(
    "--dtype",
    type=click.Choice(["auto", *DTYPES]),
    default=None,
    help="Overrides the recipe's `dtype` (default auto: float16 on CUDA, float32 elsewhere). "
    "Part of each job's id.",
)


def _shard(context: click.Context, parameter: click.Parameter, value: str | None) -> Shard | None:
    try:
        return parse_shard(value) if value else None
    except ShardError as error:
        raise click.BadParameter(str(error)) from None


shard_option = click.option(
    "--shard",
    callback=_shard,
    metavar="K/N",
    help="Do only the K-th of N deterministic, cost-balanced slices of the jobs. Default: "
    "from accelerate/torchrun (RANK, WORLD_SIZE) or a Slurm array (SLURM_ARRAY_TASK_*).",
)


def _batch_size(
    context: click.Context, parameter: click.Parameter, value: str
) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise click.BadParameter(f"{value!r} is neither a whole number ≥ 1 nor auto")


batch_size_option = click.option(
    "--batch-size",
    callback=_batch_size,
    default="auto",
    show_default=True,
    metavar="N|auto",
    help="Jobs per denoising loop (same scheduler, steps, strength and size). auto: by image "
    "size on the CPU, the most that fit on a GPU. Pixels stay within one 8-bit level of "
    "batch 1; job ids do not depend on it.",
)


def recipe_with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """RECIPE and the options that decide what a run of it would do (`run` and `plan`)."""
    options = (
        batch_size_option,
        shard_option,
        max_jobs_option,
        output_option,
        dtype_option,
        device_option,
    )
    for decorate in options:
        command = decorate(command)
    return recipe_argument(command)


def comparison_options(command: Callable[..., None]) -> Callable[..., None]:
    """How `verify` and `run --verify-against` compare images."""
    options = (
        click.option(
            "--max-diff",
            type=click.IntRange(0, 255),
            default=None,
            metavar="N",
            help="Largest absolute difference allowed in any channel of any pixel, in 8-bit "
            "levels (0-255). Default: 0, identical pixels, unless only --min-psnr is given.",
        ),
        click.option(
            "--min-psnr",
            type=click.FloatRange(min=0),
            default=None,
            metavar="DB",
            help="Lowest PSNR allowed, in dB over all channels (identical images: inf). With "
            "--max-diff too, an image must clear both.",
        ),
        click.option(
            "--diff",
            "diff_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            metavar="DIR",
            help="Write DIR/<index>-<id>.png for each mismatch: reference | run | difference, "
            "the difference stretched so that one level shows.",
        ),
    )
    for decorate in reversed(options):
        command = decorate(command)
    return command


redo_option = click.option(
    "--redo",
    type=click.Choice(["failed", "all"]),
    default=None,
    help="failed: make only the jobs whose last attempt failed; all: make every job again, "
    "done or not (images are replaced, the manifest gains rows). Default: every job not done.",
)


run_dir_argument = click.argument(
    "run_dir", type=click.Path(file_okay=False, path_type=Path), metavar="RUN_DIR"
)
