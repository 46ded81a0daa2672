"""`batchgen run` as a library call: check the recipe, load the model once, make every image
the run folder does not have yet, a manifest row as each one finishes.

Bad input is found before the model loads. A job that fails is recorded and the run goes on
(unless `fail_fast`). SIGINT/SIGTERM stop the run after the current image; running the same
command again finishes the rest.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from batchgen.grid import make_grids, run_specs
from batchgen.images import SMALL_IMAGE_SIDE, PreparedImage, prepare
from batchgen.intermediates import IntermediatesRecorder, write_strip
from batchgen.job import Job
from batchgen.matrix import DEFAULT_MAX_JOBS, check
from batchgen.models import ModelSource
from batchgen.plan import make_plan
from batchgen.problems import RecipeError
from batchgen.progress import Reporter, make_reporter
from batchgen.recipe import Recipe, load_recipe
from batchgen.recipe_file import IntermediatesSpec
from batchgen.report import write_report
from batchgen.shard import Shard, launcher_device, shard_from_environment
from batchgen.store import (
    RUN_LOG_NAME,
    Manifest,
    ManifestError,
    ManifestRow,
    RowStatus,
    RunLog,
    a1111_parameters,
    image_filename,
    write_image,
    write_lock_file,
)

if TYPE_CHECKING:
    from batchgen.engine import Engine

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class BadInputError(ValueError):
    """Input that is not the recipe's fault but still the user's to fix (e.g. `--device`)."""


@dataclass(frozen=True)
class RunResult:
    output: Path
    made: int  # images made by this run
    failed: int
    already_done: int
    interrupted_by: int | None  # the signal that stopped the run, if one did
    seconds: float

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return EXIT_INTERRUPTED.get(signal.Signals(self.interrupted_by), 130)
        return 1 if self.failed else 0


class _StopRequest:
    """Set by SIGINT/SIGTERM; the loop checks it between images. A second Ctrl-C aborts."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.signal: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.reporter.message(
            f"{signal.Signals(signum).name}: stopping after the current image "
            "(press Ctrl-C again to abort it)"
        )


@contextmanager
def _stop_on_signals(reporter: Reporter) -> Iterator[_StopRequest]:
    request = _StopRequest(reporter)
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in EXIT_INTERRUPTED}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@lru_cache(maxsize=16)
def _prepared(path: Path, size: tuple[int, int]) -> PreparedImage:
    return prepare(path, size)


def _warn_small_images(jobs: list[Job], reporter: Reporter) -> None:
    """The seed doc's warning, once per image rather than once per job."""
    for image in dict.fromkeys(job.init_image for job in jobs):
        if min(image.width, image.height) < SMALL_IMAGE_SIDE:  # size read at validation
            reporter.message(
                f"warning: {image.label} is {image.width}x{image.height}; img2img does not work "
                "properly on init images smaller than 512x512 — scale it up for a real model"
            )


def _make_image(
    engine: Engine,
    model: ModelSource,
    run_dir: Path,
    job: Job,
    relative_path: Path,
    intermediates: IntermediatesSpec | None,
) -> ManifestRow:
    started = time.perf_counter()
    status: RowStatus
    try:
        init = _prepared(job.init_image.path, (job.width, job.height))
        recorder = None
        if intermediates and job.steps_taken:
            recorder = IntermediatesRecorder(engine, mode=intermediates.mode, x0=intermediates.x0)
        image = engine.render(job, init, on_step=recorder)
        parameters = a1111_parameters(job, model.name, model.short_hash)
        sha256 = write_image(image, run_dir / relative_path, job, parameters)
        if recorder is not None:  # before the row: a done row means its strip exists too
            strip = run_dir / "intermediates" / f"{relative_path.stem}.png"
            write_strip(recorder.frames, strip, job_id=job.id, note=recorder.note)
        status, error = "done", ""
    except Exception as failure:  # noqa: BLE001 — any failure of one job is recorded, not fatal
        sha256, status, error = "", "failed", f"{type(failure).__name__}: {failure}"
    return ManifestRow.from_job(
        job,
        status=status,
        path=relative_path.as_posix() if status == "done" else "",
        model_hash=model.short_hash,
        device=engine.device_label,
        seconds=round(time.perf_counter() - started, 3),
        sha256=sha256,
        error=error,
    )


class _EngineLoader:
    """One model in memory at a time: jobs come model by model (the model is the outermost
    axis), so each model is loaded once."""

    def __init__(
        self,
        engine_class: type[Engine],
        recipe: Recipe,
        device: str,
        dtype: str,
        reporter: Reporter,
    ) -> None:
        self.engine_class = engine_class
        self.vae = recipe.vae
        self.variant = recipe.variant
        self.device = device
        self.dtype = dtype
        self.reporter = reporter
        self.model: ModelSource | None = None
        self.engine: Engine | None = None

    def load(self, model: ModelSource) -> Engine:
        if self.engine is not None and model == self.model:
            return self.engine
        self.engine = None  # let the previous model go before the next one loads
        try:
            engine = self.engine_class(
                model, self.device, self.dtype, vae=self.vae, variant=self.variant
            )
        except Exception as error:  # noqa: BLE001 — reported as what it is: a model to fix
            raise BadInputError(
                f"cannot load model `{model.reference}` from {model.path}: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.model, self.engine = model, engine
        self.reporter.message(
            f"model {model.name} loaded in {engine.load_seconds:.1f}s on "
            f"{engine.device_label} ({self.dtype})"
        )
        return engine


def _describe(job: Job, row: ManifestRow) -> str:
    what = f"job {job.index} {row.path or job.id}"
    if row.status == "done":
        return f"{what} ({job.steps_taken} steps, {row.seconds:.2f}s)"
    return f"{what} FAILED: {row.error}"


def run(
    recipe_path: str | Path,
    *,
    device: str = "auto",
    dtype: str | None = None,
    output: Path | None = None,
    max_jobs: int = DEFAULT_MAX_JOBS,
    fail_fast: bool = False,
    quiet: bool = False,
    shard: Shard | None = None,
) -> RunResult:
    """Run what the recipe's output folder does not have yet. Raises RecipeError or
    BadInputError on bad input, before any model is loaded."""
    started = time.perf_counter()
    recipe = load_recipe(recipe_path, output)
    problems = check(recipe, max_jobs)
    if problems:
        raise RecipeError(problems)

    from batchgen import engine as engine_module  # torch loads here, after validation

    try:
        device = launcher_device(engine_module.resolve_device(device))
        dtype = engine_module.resolve_dtype(dtype or recipe.dtype, device)
        shard = shard or shard_from_environment()
    except ValueError as error:
        raise BadInputError(str(error)) from None
    try:
        plan = make_plan(recipe, dtype, shard)
    except ManifestError as error:
        raise BadInputError(str(error)) from None
    jobs = plan.to_run
    recipe.output.mkdir(parents=True, exist_ok=True)
    write_lock_file(recipe.output, recipe.locked())
    manifest = Manifest(recipe.output, shard.ledger_name if shard else None)
    log_name = f"run-{shard.ledger_name.removesuffix('.csv')}.log" if shard else RUN_LOG_NAME
    with RunLog(recipe.output, log_name) as log:
        reporter = make_reporter(log, quiet)
        for warning in recipe.warnings:
            reporter.message(f"warning: {warning}")
        made = failed = 0
        stopped_by: int | None = None
        if jobs:
            reporter.message(
                f"{recipe.name}{f' shard {shard}' if shard else ''}: {len(jobs)} to do, "
                f"{plan.done_here} already done"
            )
            engines = _EngineLoader(engine_module.Engine, recipe, device, dtype, reporter)
            made, failed, stopped_by = _make_images(
                recipe, jobs, len(plan.jobs), manifest, engines, reporter, fail_fast
            )
        else:
            reporter.message(f"nothing to do: all {plan.done_here} jobs are done")
        _write_views(recipe.output, reporter)
        result = RunResult(
            recipe.output,
            made,
            failed,
            plan.done_here,
            stopped_by,
            time.perf_counter() - started,
        )
        if jobs:
            reporter.message(_summary(result, len(jobs)))
    return result


def _make_images(
    recipe: Recipe,
    jobs: list[Job],
    matrix_size: int,
    manifest: Manifest,
    engines: _EngineLoader,
    reporter: Reporter,
    fail_fast: bool,
) -> tuple[int, int, int | None]:
    """The run loop: each job rendered, written and recorded in turn, until the jobs run
    out, a signal asks to stop, or (with fail_fast) a job fails. Returns made, failed and
    the signal that stopped it."""
    _warn_small_images(jobs, reporter)
    index_width = max(4, len(str(matrix_size)))
    made = failed = 0
    reporter.start(len(jobs))
    with _stop_on_signals(reporter) as stop:
        try:
            for job in jobs:
                if stop.signal is not None:
                    break
                relative_path = Path("images") / image_filename(job, index_width)
                model = recipe.model_of(job)
                row = _make_image(
                    engines.load(model),
                    model,
                    recipe.output,
                    job,
                    relative_path,
                    recipe.intermediates,
                )
                manifest.append(row)
                reporter.job_finished(_describe(job, row), row.status == "done")
                made += row.status == "done"
                failed += row.status == "failed"
                if failed and fail_fast:
                    reporter.message("stopping at the first failure (--fail-fast)")
                    break
        finally:
            reporter.close()
    return made, failed, stop.signal


def _write_views(run_dir: Path, reporter: Reporter) -> None:
    """Grids and report.html, re-made from the manifest after every run (a grid only when
    its cells changed). The images are safe whatever happens here, so a failure is a
    warning, not a failed run."""
    try:
        for grid in make_grids(run_dir, run_specs(run_dir)):
            if grid.written:
                reporter.message(f"grid → {grid.path}" + (f" ({grid.note})" if grid.note else ""))
    except (OSError, ValueError) as error:  # GridError is a ValueError
        reporter.message(f"warning: grids not drawn: {error}")
    try:
        reporter.message(f"report → {write_report(run_dir)}")
    except (OSError, ValueError) as error:
        reporter.message(f"warning: report.html not written: {error}")


def _summary(result: RunResult, planned: int) -> str:
    text = f"{result.made} made, {result.failed} failed"
    if result.already_done:
        text += f", {result.already_done} already done"
    text += f" in {result.seconds:.1f}s → {result.output}"
    if result.interrupted_by is not None:
        left = planned - result.made - result.failed
        text += (
            f"\ninterrupted with {left} left: run the same command again to finish "
            "the rest (done images are kept)"
        )
    elif result.failed:
        text += "\nsome jobs failed: see the error column of manifest.csv; a re-run retries them"
    return text
