"""`batchgen run` as a library call: check the recipe, load the model once, make every image
the run folder does not have yet, a manifest row as each one finishes.

Bad input is found before the model loads. A job that fails is recorded and the run goes on
(unless `fail_fast`). SIGINT/SIGTERM stop the run after the current batch; running the same
command again finishes the rest.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from batchgen.engine.devices import (
    NO_FAST_PATHS,
    FastPaths,
    check_device,
    guess_device,
    resolve_device,
    resolve_dtype,
    slurm_cpu_threads,
    use_cpu_threads,
)
from batchgen.engine.images import SMALL_IMAGE_SIDE
from batchgen.engine.init_images import InitImagePrefetcher
from batchgen.errors import BadInputError
from batchgen.jobs.batching import MAX_BATCH_SIZE
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import DEFAULT_MAX_JOBS, check
from batchgen.jobs.plan import Plan, PlannedJob, Redo, make_plan
from batchgen.jobs.shard import Shard, shard_from_environment
from batchgen.recipe.load import Recipe, load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.running.progress import Reporter, make_reporter
from batchgen.running.recipe_changes import lock_changes
from batchgen.running.render import (
    BatchRenderer,
    BatchSize,
    EngineHook,
    EngineLoader,
    RunOptions,
    planned_batches,
)
from batchgen.running.resume import orphans, remove_temp_files
from batchgen.running.signals import EXIT_INTERRUPTED, stop_on_signals
from batchgen.running.writer import ImageWriter, StorageError, strip_path
from batchgen.store.files import (
    PNG_COMPRESS_LEVEL,
    PNG_COMPRESS_LEVELS,
    RUN_LOG_NAME,
    RunLog,
    read_lock_file,
    write_lock_file,
)
from batchgen.store.manifest import Manifest, ManifestRow
from batchgen.store.runlock import LOCKS_DIR, RunLock
from batchgen.views.grid import make_run_grids
from batchgen.views.report import write_report

if TYPE_CHECKING:
    pass


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
    peak_gpu_bytes: int = 0  # the most GPU memory torch held at once; 0 off the GPU

    @property
    def exit_code(self) -> int:
        if self.interrupted_by is not None:
            return EXIT_INTERRUPTED.get(signal.Signals(self.interrupted_by), 130)
        return 1 if self.failed or self.storage_error else 0


def _warn_small_images(jobs: list[Job], reporter: Reporter) -> None:
    """IMG2IMG.md's warning, once per init image rendered below 512 px rather than once
    per job."""
    small = {job.init_image: job for job in jobs if min(job.width, job.height) < SMALL_IMAGE_SIDE}
    for image, job in small.items():
        reporter.message(
            f"warning: {image.label} renders at {job.width}x{job.height}; img2img does not work "
            "properly below 512x512 — for a real model, scale it up or set `upscale_small: true`"
        )


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
    batch_size: BatchSize = "auto",
    fast_paths: FastPaths = NO_FAST_PATHS,
    png_compression: int = PNG_COMPRESS_LEVEL,
    on_engine: EngineHook | None = None,
) -> RunResult:
    """Run what the recipe's output folder does not have yet (with `redo`, also its failed
    jobs only, or every job). Raises RecipeError or BadInputError on bad input and
    RunLockedError when another run holds the folder, all before any model is loaded;
    BadInputError too when a later model cannot load, and FastPathFailedError when a `--fast`
    path cannot work here (both stop the run, keeping the images it made). `on_engine` sees
    each engine as it loads.

    torch is imported only when there is something to render: a run with nothing to do
    answers from the run folder alone, as `plan` does."""
    started = time.perf_counter()
    recipe = load_recipe(recipe_path, output)
    problems = check(recipe, max_jobs)
    if problems:
        raise RecipeError(problems)
    if png_compression not in PNG_COMPRESS_LEVELS:
        raise BadInputError(f"PNG compression {png_compression} is not a zlib level 0–9")
    try:
        shard = shard or shard_from_environment()
        # The dtype is part of every job id: planned from the device torch-free, as `plan`
        # does, and confirmed with torch when there is work.
        planned_dtype = resolve_dtype(dtype or recipe.dtype, guess_device(check_device(device)))
    except ValueError as error:
        raise BadInputError(str(error)) from None
    if shard and recipe.variation_mode == "feedback" and any(recipe.axes["variation_count"]):
        raise BadInputError(
            "feedback chains cannot be sharded: each image is the next one's init image, "
            "made in one process. Run without --shard (or torchrun)"
        )
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
            plan = _resume(recipe, planned_dtype, shard, redo, batch_size, reporter)
            if plan.runs:
                device = _render_device(device, reporter)
                rendered_dtype = resolve_dtype(dtype or recipe.dtype, device)
                if rendered_dtype != plan.dtype:  # torch found another device than guessed
                    plan = make_plan(recipe, rendered_dtype, shard, redo, batch_size)
            options = RunOptions(fail_fast, batch_size, fast_paths, png_compression, on_engine)
            return _run_plan(plan, device, reporter, options, started)
    finally:
        run_lock.release()


def _render_device(device: str, reporter: Reporter) -> str:
    """The device the run renders on, resolved with torch (imported here); under Slurm, the
    CPU threads its allocation gives."""
    try:
        resolved = resolve_device(device)
    except ValueError as error:
        raise BadInputError(str(error)) from None
    threads = slurm_cpu_threads() if resolved == "cpu" else None
    if threads:
        use_cpu_threads(threads)
        reporter.message(f"{threads} CPU thread(s), as SLURM_CPUS_PER_TASK says")
    return resolved


def _run_lock(run_dir: Path, shard: Shard | None) -> RunLock:
    """One lock per ledger: the shards of a run write one folder at once, each its ledger."""
    name = _ledger_stem(shard) if shard else "run"
    return RunLock(run_dir / LOCKS_DIR / f"{name}.lock")


def _ledger_stem(shard: Shard) -> str:
    return shard.ledger_name.removesuffix(".csv")


def _log_name(shard: Shard | None) -> str:
    return f"run-{_ledger_stem(shard)}.log" if shard else RUN_LOG_NAME


def _resume(
    recipe: Recipe,
    dtype: str,
    shard: Shard | None,
    redo: Redo | None,
    batch_size: BatchSize,
    reporter: Reporter,
) -> Plan:
    """What a killed or earlier run left, put in order under the run lock: temp files gone,
    what changed since the last run said, unrecorded images adopted. Returns the plan of
    what is left to make."""
    plan = make_plan(recipe, dtype, shard, redo, batch_size)
    mine = {recipe.output / planned.path for planned in plan.jobs if planned.mine}
    mine |= {recipe.output / strip_path(planned.path) for planned in plan.jobs if planned.mine}
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
    device: str,
    reporter: Reporter,
    options: RunOptions,
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
    peak_gpu_bytes = 0
    if to_make:
        reporter.message(
            f"{recipe.name}{f' shard {shard}' if shard else ''}: {len(to_make)} to do, "
            f"{done_before} already done"
        )
        engines = EngineLoader(recipe, device, plan.dtype, options, reporter)
        try:
            made, failed, stopped_by = _make_images(
                plan, to_make, manifest, engines, reporter, options
            )
        except _Stopped as stop:
            made, failed, storage_error = stop.made, stop.failed, str(stop.error)
            reporter.warning(storage_error)
        peak_gpu_bytes = engines.peak_gpu_bytes()
    elif shard and not plan.has_mine:
        reporter.message(
            f"nothing to do: shard {shard} has no batches (the sweep has {plan.shard_batches})"
        )
    else:
        of_shard = f" of shard {shard}" if shard else ""
        reporter.message(f"nothing to do: all {done_before} jobs{of_shard} are done")
    if storage_error:
        pass  # the folder cannot be written: the views would fail too
    elif shard and (left := _left_to_other_shards(plan)):
        reporter.message(
            f"grids and report.html wait for the last shard to finish: {left} job(s) of the "
            "sweep have no row yet"
        )
    else:
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
        peak_gpu_bytes=peak_gpu_bytes,
    )
    if to_make:
        reporter.message(_summary(result, len(to_make)))
    return result


def _left_to_other_shards(plan: Plan) -> int:
    """Jobs of the sweep with no row in any ledger yet. Each shard writes its rows before it
    asks, so the last shard to finish finds none and draws the views of the whole sweep: a
    single run's, not one drawn from a part of it."""
    latest = Manifest(plan.recipe.output).latest()
    return sum(1 for planned in plan.jobs if planned.job.id not in latest)


def _adopt_orphans(
    recipe: Recipe, to_make: list[PlannedJob], manifest: Manifest
) -> tuple[list[PlannedJob], int]:
    """Record the images a killed run wrote but did not record; return the jobs still to
    make and how many were adopted."""
    strip_of = (lambda path: recipe.output / strip_path(path)) if recipe.intermediates else None
    adopted = orphans(recipe.output, to_make, strip_of)
    for planned in to_make:
        if planned.job.id in adopted:
            row = ManifestRow.from_job(
                planned.job,
                status="done",
                path=planned.path,
                model_hash=recipe.model_of(planned.job).short_hash,
                device=adopted[planned.job.id].device,
                batch_size=adopted[planned.job.id].batch_size,
                fast_paths=adopted[planned.job.id].fast_paths,
                seconds=0.0,  # not recorded
                sha256=adopted[planned.job.id].sha256,
                error="",
            )
            manifest.append(row)
    return [p for p in to_make if p.job.id not in adopted], len(adopted)


class _Stopped(Exception):
    """The run folder could not be written: the loop stops, keeping its counts."""

    def __init__(self, error: StorageError, made: int, failed: int) -> None:
        super().__init__(str(error))
        self.error, self.made, self.failed = error, made, failed


def _make_images(
    plan: Plan,
    to_make: list[PlannedJob],
    manifest: Manifest,
    engines: EngineLoader,
    reporter: Reporter,
    options: RunOptions,
) -> tuple[int, int, int | None]:
    """The run loop: batch by batch, rendered here and written on the writer's thread,
    until the batches run out, a signal asks to stop, or (with fail_fast) a job fails.
    Returns made, failed and the signal that stopped it; raises _Stopped when the folder
    cannot be written.

    Batches are formed from all of this process's jobs, done or not, so that a resumed run
    renders each job in the batch an uninterrupted run would have (CPU pixels then match it
    bit for bit); a batch with anything left to make is rendered whole, and only its jobs
    to make are written."""
    recipe = plan.recipe
    _warn_small_images([planned.job for planned in to_make], reporter)
    wanted = {planned.job.id for planned in to_make}
    failed = 0
    reporter.start(len(to_make))
    writer = ImageWriter(
        recipe.output, manifest, reporter, 2 * MAX_BATCH_SIZE, options.png_compression
    )
    renderer = BatchRenderer(plan, reporter)
    prefetcher = InitImagePrefetcher()
    with stop_on_signals(reporter) as stop:
        try:
            try:
                for batch, following in planned_batches(plan, engines, options.batch_size, wanted):
                    if stop.signal is not None:
                        break
                    model = recipe.model_of(batch[0].job)
                    engine = engines.load(model)
                    if following:
                        prefetcher.ahead(planned.job for planned in following)
                    for job in renderer.render(engine, model, batch):
                        if job.planned.job.id in wanted:
                            writer.submit(job)
                            failed += bool(job.error)
                    # The next batch may bring the next model, loaded (and its batch size
                    # probed) before the loop comes back here: hold no reference to this one.
                    del engine
                    if failed and options.fail_fast:
                        reporter.message("stopping at the first failure (--fail-fast)")
                        break
            finally:  # whatever stops the loop, what was rendered is written and recorded
                prefetcher.close()
                writer.close()
        except StorageError as error:
            raise _Stopped(error, writer.made, failed) from error
        finally:
            reporter.close()
    return writer.made, failed, stop.signal


def _write_views(run_dir: Path, reporter: Reporter) -> None:
    """Grids and report.html, re-made from the manifest after every run (a grid only when
    its cells changed). The images are safe whatever happens here, so a failure is a
    warning, not a failed run."""
    try:
        grids, removed = make_run_grids(run_dir)
        for path in removed:
            reporter.message(f"grid {path.name} removed: the run's grids no longer include it")
        for grid in grids:
            if grid.written:
                reporter.message(f"grid → {grid.path}" + (f" ({grid.note})" if grid.note else ""))
    except Exception as error:  # noqa: BLE001 — a view never fails the images' run
        reporter.warning(f"grids not drawn: {type(error).__name__}: {error}")
    try:
        reporter.message(f"report → {write_report(run_dir)}")
    except Exception as error:  # noqa: BLE001
        reporter.warning(f"report.html not written: {type(error).__name__}: {error}")


def _summary(result: RunResult, planned: int) -> str:
    text = f"{result.made} made, {result.failed} failed"
    if result.already_done:
        text += f", {result.already_done} already done"
    text += f" in {result.seconds:.1f}s"
    if result.peak_gpu_bytes:
        text += f", peak GPU memory {result.peak_gpu_bytes / 1e9:.1f} GB"
    text += f" → {result.output}"
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
