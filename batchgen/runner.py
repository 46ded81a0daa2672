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
from batchgen.lock_changes import lock_changes
from batchgen.matrix import DEFAULT_MAX_JOBS, check
from batchgen.models import ModelSource
from batchgen.plan import Plan, PlannedJob, Redo, make_plan
from batchgen.problems import RecipeError
from batchgen.progress import Reporter, make_reporter
from batchgen.recipe import Recipe, load_recipe
from batchgen.recipe_file import IntermediatesSpec
from batchgen.report import write_report
from batchgen.resume import orphans, remove_temp_files
from batchgen.runlock import LOCKS_DIR, RunLock
from batchgen.shard import Shard, launcher_device, shard_from_environment
from batchgen.store import (
    RUN_LOG_NAME,
    Manifest,
    ManifestError,
    ManifestRow,
    RunLog,
    a1111_parameters,
    read_lock_file,
    write_image,
    write_lock_file,
)

if TYPE_CHECKING:
    from batchgen.engine import Engine

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}
EXIT_LOCKED = 75  # sysexits' EX_TEMPFAIL: another run holds the folder; try again later


class BadInputError(ValueError):
    """Input that is not the recipe's fault but still the user's to fix (e.g. `--device`)."""


class StorageError(OSError):
    """The run folder cannot be written (full disk, permissions): the run stops, and what it
    made so far stays recorded."""


@dataclass(frozen=True)
class RunResult:
    output: Path
    made: int  # images made by this run
    failed: int
    already_done: int
    interrupted_by: int | None  # the signal that stopped the run, if one did
    seconds: float
    adopted: int = 0  # images a killed run wrote but did not record, recorded now
    storage_error: str = ""  # why writing stopped the run, if it did

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return EXIT_INTERRUPTED.get(signal.Signals(self.interrupted_by), 130)
        return 1 if self.failed or self.storage_error else 0


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


def _strip_path(image_path: str) -> Path:
    """The intermediates strip of an image, relative to the run folder."""
    return Path("intermediates") / f"{Path(image_path).stem}.png"


def _make_image(
    engine: Engine,
    model: ModelSource,
    run_dir: Path,
    planned: PlannedJob,
    intermediates: IntermediatesSpec | None,
) -> ManifestRow:
    """Render one job and write its files. A job that fails to render is a failed row; a
    file that cannot be written raises StorageError, which stops the run."""
    job = planned.job
    started = time.perf_counter()
    recorder = None
    try:
        init = _prepared(job.init_image.path, (job.width, job.height))
        if intermediates and job.steps_taken:
            recorder = IntermediatesRecorder(engine, mode=intermediates.mode, x0=intermediates.x0)
        image = engine.render(job, init, on_step=recorder)
    except Exception as failure:  # noqa: BLE001 — any failure of one job is recorded, not fatal
        return _row(job, model, engine, started, error=f"{type(failure).__name__}: {failure}")
    try:
        parameters = a1111_parameters(job, model.name, model.short_hash)
        sha256 = write_image(image, run_dir / planned.path, job, parameters)
        if recorder is not None:  # before the row: a done row means its strip exists too
            write_strip(
                recorder.frames,
                run_dir / _strip_path(planned.path),
                job_id=job.id,
                note=recorder.note,
            )
    except OSError as error:
        raise StorageError(
            f"cannot write {run_dir / planned.path}: {error.strerror or error}"
        ) from error
    return _row(job, model, engine, started, path=planned.path, sha256=sha256)


def _row(
    job: Job,
    model: ModelSource,
    engine: Engine | None,
    started: float | None,
    *,
    path: str = "",
    sha256: str = "",
    error: str = "",
) -> ManifestRow:
    return ManifestRow.from_job(
        job,
        status="failed" if error else "done",
        path=path,
        model_hash=model.short_hash,
        device=engine.device_label if engine else "",
        seconds=round(time.perf_counter() - started, 3) if started is not None else 0.0,
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
    redo: Redo | None = None,
) -> RunResult:
    """Run what the recipe's output folder does not have yet (with `redo`, also its failed
    jobs only, or every job). Raises RecipeError or BadInputError on bad input and
    RunLockedError when another run holds the folder, all before any model is loaded."""
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
    run_lock = _run_lock(recipe.output, shard)
    try:
        recipe.output.mkdir(parents=True, exist_ok=True)
        run_lock.acquire()
    except OSError as error:
        raise BadInputError(
            f"cannot write to the output folder {recipe.output}: {error.strerror or error}"
        ) from None
    try:
        with RunLog(recipe.output, _log_name(shard)) as log:
            reporter = make_reporter(log, quiet)
            if run_lock.took_over:
                reporter.message(
                    f"took over the lock of a run that was killed ({run_lock.took_over})"
                )
            for warning in recipe.warnings:
                reporter.warning(str(warning))
            plan = _resume(recipe, dtype, shard, redo, reporter)
            return _run_plan(plan, engine_module.Engine, device, reporter, fail_fast, started)
    finally:
        run_lock.release()


def _run_lock(run_dir: Path, shard: Shard | None) -> RunLock:
    """One lock per ledger: the shards of a run write one folder at once, each its ledger."""
    name = _ledger_stem(shard) if shard else "run"
    return RunLock(run_dir / LOCKS_DIR / f"{name}.lock")


def _ledger_stem(shard: Shard) -> str:
    return shard.ledger_name.removesuffix(".csv")


def _log_name(shard: Shard | None) -> str:
    return f"run-{_ledger_stem(shard)}.log" if shard else RUN_LOG_NAME


def _resume(
    recipe: Recipe, dtype: str, shard: Shard | None, redo: Redo | None, reporter: Reporter
) -> Plan:
    """What a killed or earlier run left, put in order under the run lock: temp files gone,
    what changed since the last run said, unrecorded images adopted. Returns the plan of
    what is left to make."""
    try:
        plan = make_plan(recipe, dtype, shard, redo)
    except ManifestError as error:
        raise BadInputError(str(error)) from None
    mine = {recipe.output / planned.path for planned in plan.jobs if planned.mine}
    mine |= {recipe.output / _strip_path(planned.path) for planned in plan.jobs if planned.mine}
    mine.add(_run_lock(recipe.output, shard).holder_path)
    removed = remove_temp_files(recipe.output, lambda path: shard is None or path in mine)
    if removed:
        reporter.message(f"removed {removed} temp file(s) a killed run left")
    changes = lock_changes(read_lock_file(recipe.output), recipe.locked())
    for alarm in changes.content_changed:
        reporter.warning(alarm)
    if changes.changed:
        reporter.message(
            "the recipe changed since the last run in this folder (only new jobs run; "
            "images of jobs no longer in it are kept): " + "; ".join(changes.changed)
        )
    write_lock_file(recipe.output, recipe.locked())
    return plan


def _run_plan(
    plan: Plan,
    engine_class: type[Engine],
    device: str,
    reporter: Reporter,
    fail_fast: bool,
    started: float,
) -> RunResult:
    recipe, shard = plan.recipe, plan.shard
    manifest = Manifest(recipe.output, shard.ledger_name if shard else None)
    to_make = plan.runs
    adopted = 0
    if plan.redo != "all":
        to_make, adopted = _adopt_orphans(recipe, to_make, manifest)
    if adopted:
        reporter.message(f"adopted {adopted} image(s) a killed run wrote but did not record")
    done_before = plan.done_here + adopted
    made = failed = 0
    stopped_by: int | None = None
    storage_error = ""
    if to_make:
        reporter.message(
            f"{recipe.name}{f' shard {shard}' if shard else ''}: {len(to_make)} to do, "
            f"{done_before} already done"
        )
        engines = _EngineLoader(engine_class, recipe, device, plan.dtype, reporter)
        try:
            made, failed, stopped_by = _make_images(
                recipe, to_make, manifest, engines, reporter, fail_fast
            )
        except _Stopped as stop:
            made, failed, storage_error = stop.made, stop.failed, str(stop.error)
            reporter.warning(storage_error)
    else:
        reporter.message(f"nothing to do: all {done_before} jobs are done")
    if not storage_error:
        _write_views(recipe.output, reporter)
    result = RunResult(
        recipe.output,
        made,
        failed,
        done_before,
        stopped_by,
        time.perf_counter() - started,
        adopted=adopted,
        storage_error=storage_error,
    )
    if to_make:
        reporter.message(_summary(result, len(to_make)))
    return result


def _adopt_orphans(
    recipe: Recipe, to_make: list[PlannedJob], manifest: Manifest
) -> tuple[list[PlannedJob], int]:
    """Record the images a killed run wrote but did not record; return the jobs still to
    make and how many were adopted."""
    strip_of = (lambda path: recipe.output / _strip_path(path)) if recipe.intermediates else None
    adopted = orphans(recipe.output, to_make, strip_of)
    for planned in to_make:
        if planned.job.id in adopted:
            model = recipe.model_of(planned.job)
            row = _row(
                planned.job, model, None, None, path=planned.path, sha256=adopted[planned.job.id]
            )
            manifest.append(row)
    return [p for p in to_make if p.job.id not in adopted], len(adopted)


class _Stopped(Exception):
    """The run folder could not be written: the loop stops, keeping its counts."""

    def __init__(self, error: StorageError, made: int, failed: int) -> None:
        super().__init__(str(error))
        self.error, self.made, self.failed = error, made, failed


def _make_images(
    recipe: Recipe,
    to_make: list[PlannedJob],
    manifest: Manifest,
    engines: _EngineLoader,
    reporter: Reporter,
    fail_fast: bool,
) -> tuple[int, int, int | None]:
    """The run loop: each job rendered, written and recorded in turn, until the jobs run
    out, a signal asks to stop, or (with fail_fast) a job fails. Returns made, failed and
    the signal that stopped it; raises _Stopped when the folder cannot be written."""
    _warn_small_images([planned.job for planned in to_make], reporter)
    made = failed = 0
    reporter.start(len(to_make))
    with _stop_on_signals(reporter) as stop:
        try:
            for planned in to_make:
                if stop.signal is not None:
                    break
                model = recipe.model_of(planned.job)
                try:
                    row = _make_image(
                        engines.load(model), model, recipe.output, planned, recipe.intermediates
                    )
                    _append(manifest, row)
                except StorageError as error:
                    raise _Stopped(error, made, failed) from error
                reporter.job_finished(_describe(planned.job, row), row.status == "done")
                made += row.status == "done"
                failed += row.status == "failed"
                if failed and fail_fast:
                    reporter.message("stopping at the first failure (--fail-fast)")
                    break
        finally:
            reporter.close()
    return made, failed, stop.signal


def _append(manifest: Manifest, row: ManifestRow) -> None:
    try:
        manifest.append(row)
    except OSError as error:  # at most a torn last row, which reading ignores
        raise StorageError(f"cannot write {manifest.path}: {error.strerror or error}") from error


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
    again = "run the same command again"
    left = planned - result.made - result.failed
    if result.storage_error:
        text += (
            f"\nstopped with {left} left: the run folder cannot be written. Free space or fix "
            f"its permissions, then {again} to finish (done images are kept)"
        )
    elif result.interrupted_by is not None:
        text += f"\ninterrupted with {left} left: {again} to finish the rest (done images are kept)"
    elif result.failed:
        text += "\nsome jobs failed: see the error column of manifest.csv; a re-run retries them"
    return text
