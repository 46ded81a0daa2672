"""`batchgen run` as a library call: check the recipe, load the model once, make every image
the run folder does not have yet, a manifest row as each one finishes.

Bad input is found before the model loads. A job that fails is recorded and the run goes on
(unless `fail_fast`). SIGINT/SIGTERM stop the run after the current batch; running the same
command again finishes the rest.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

from PIL import Image

from batchgen.engine.devices import (
    NO_FAST_PATHS,
    FastPathFailedError,
    FastPaths,
    check_device,
    guess_device,
    resolve_device,
    resolve_dtype,
    slurm_cpu_threads,
    use_cpu_threads,
)
from batchgen.engine.images import SMALL_IMAGE_SIDE, PreparedImage
from batchgen.engine.init_images import InitImagePrefetcher, prepared
from batchgen.errors import BatchgenError
from batchgen.jobs.batching import MAX_BATCH_SIZE, auto_batch_size, make_batches
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import DEFAULT_MAX_JOBS, check
from batchgen.jobs.plan import Plan, PlannedJob, Redo, make_plan
from batchgen.jobs.shard import Shard, shard_from_environment
from batchgen.models.source import ModelSource
from batchgen.recipe.load import Recipe, load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.running.progress import Reporter, make_reporter
from batchgen.running.recipe_changes import lock_changes
from batchgen.running.resume import orphans, remove_temp_files
from batchgen.running.writer import FinishedJob, ImageWriter, StorageError, strip_path
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
from batchgen.views.intermediates import IntermediatesRecorder
from batchgen.views.report import write_report

if TYPE_CHECKING:
    from batchgen.engine.img2img import Engine

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class BadInputError(BatchgenError):
    """Input that is not the recipe's fault but still the user's to fix (e.g. `--device`)."""


BatchSize = int | Literal["auto"]


@dataclass(frozen=True)
class RunOptions:
    fail_fast: bool
    batch_size: BatchSize  # jobs per denoising loop, or "auto": see batching.auto_batch_size
    fast_paths: FastPaths
    png_compression: int  # the images' zlib level: see store.PNG_COMPRESS_LEVEL
    on_engine: EngineHook | None = None


# Called with each engine as it loads, before it renders (a benchmark instruments its models).
EngineHook = Callable[["Engine"], None]


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
            f"{signal.Signals(signum).name}: stopping after the current batch "
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


def _warn_small_images(jobs: list[Job], reporter: Reporter) -> None:
    """The seed doc's warning, once per init image rendered below 512 px rather than once
    per job."""
    small = {job.init_image: job for job in jobs if min(job.width, job.height) < SMALL_IMAGE_SIDE}
    for image, job in small.items():
        reporter.message(
            f"warning: {image.label} renders at {job.width}x{job.height}; img2img does not work "
            "properly below 512x512 — for a real model, scale it up or set `upscale_small: true`"
        )


class _BatchRenderer:
    """Renders a batch in one denoising loop. A failure fails each of its jobs: the error is
    recorded in their rows and the run goes on.

    A batch that runs out of GPU memory (the auto probe's trial can fit where a real batch,
    with other prompts or after fragmentation, does not) is split in halves and rendered
    again, and the size that ran out is remembered for its shape (size and guidance): later
    batches of that shape are split before they are tried. The manifest records the size each
    job was rendered at.

    Feedback iterations start from their parent job's image: this run's, kept in memory until
    used, or a done one's file (a resumed chain goes on from its last finished image). A job
    whose parent failed fails too; a re-run retries both."""

    def __init__(self, plan: Plan, reporter: Reporter) -> None:
        self.plan = plan
        self.intermediates = plan.recipe.intermediates
        self.reporter = reporter
        self.limits: dict[tuple[int, int, bool], int] = {}  # shape → largest size to try
        self.by_id = {planned.job.id: planned for planned in plan.jobs}
        self.parents = {planned.job.parent_id for planned in plan.jobs if planned.job.parent_id}
        self.parent_images: dict[str, Image.Image] = {}

    def render(
        self, engine: Engine, model: ModelSource, batch: list[PlannedJob]
    ) -> list[FinishedJob]:
        inits = {planned.job.id: self._init(planned.job) for planned in batch}
        finished = self._render(engine, model, batch, inits)
        for job in finished:
            if job.image is not None and job.planned.job.id in self.parents:
                self.parent_images[job.planned.job.id] = job.image
        for planned in batch:  # each parent has one child: its image is used
            self.parent_images.pop(planned.job.parent_id, None)
        return finished

    def _render(
        self,
        engine: Engine,
        model: ModelSource,
        batch: list[PlannedJob],
        inits: dict[str, PreparedImage | str],
    ) -> list[FinishedJob]:
        first = batch[0].job
        shape = (first.width, first.height, first.cfg > 1)
        limit = self.limits.get(shape, len(batch))
        if len(batch) > limit:
            return [
                finished
                for start in range(0, len(batch), limit)
                for finished in self._render(engine, model, batch[start : start + limit], inits)
            ]
        started = time.perf_counter()
        jobs = [planned.job for planned in batch]
        recorder = None
        images: list[Image.Image | None] = [None] * len(jobs)
        try:
            prepared = [inits[job.id] for job in jobs]
            if missing := next((init for init in prepared if isinstance(init, str)), None):
                raise InitImageUnavailableError(f"a job of this batch cannot start: {missing}")
            if self.intermediates and jobs[0].steps_taken:  # batches of one: Engine.render_batch
                recorder = IntermediatesRecorder(
                    engine, mode=self.intermediates.mode, x0=self.intermediates.x0
                )
            images = list(engine.render_batch(jobs, prepared, recorder))  # type: ignore[arg-type]
            error = ""
        except FastPathFailedError:
            raise  # not this batch's fault: every batch would fail alike
        except Exception as failure:  # noqa: BLE001 — any failure of a job is recorded, not fatal
            error = f"{type(failure).__name__}: {failure}"
            out_of_memory = len(batch) > 1 and _out_of_memory(failure)
        else:
            out_of_memory = False
        if out_of_memory:  # retried here, not in `except`: its traceback holds the failed
            # attempt's frames, and with them its tensors on the GPU
            self.limits[shape] = len(batch) // 2
            self.reporter.message(
                f"a batch of {len(batch)} at {first.width}x{first.height} ran out of GPU "
                f"memory: batches of {len(batch) // 2} from now on"
            )
            return self._render(engine, model, batch, inits)
        seconds = (time.perf_counter() - started) / len(jobs)
        frames = (tuple(recorder.frames), recorder.note) if recorder and not error else ((), "")
        return [
            FinishedJob(
                planned,
                model,
                self.plan.recipe.vae,
                image,
                error,
                seconds,
                engine.device_label,
                len(batch),
                str(engine.fast_paths),
                *frames,
            )
            for planned, image in zip(batch, images, strict=True)
        ]

    def _init(self, job: Job) -> PreparedImage | str:
        """The job's init image as prepared pixels; for a feedback iteration its parent's
        image (with the original's transparency, so the chain redraws the same region). Or
        why there is none: the job then fails, and the run goes on."""
        try:
            init = prepared(job.init_image, (job.width, job.height))
            if not job.parent_id:
                return init
            image = self.parent_images.get(job.parent_id)
            if image is None:
                parent = self.by_id[job.parent_id]
                if parent.status != "done":
                    return f"its parent job {job.parent_id[:8]} ({parent.job.index}) has no image"
                with Image.open(self.plan.recipe.output / parent.path) as opened:
                    image = opened.convert("RGB")
        except Exception as failure:  # noqa: BLE001 — a file gone since the plan, unreadable…
            return f"{type(failure).__name__}: {failure}"
        if image.size != init.rgb.size:  # kept at its size by keep_size
            image = image.resize(init.rgb.size, Image.Resampling.LANCZOS)
        return PreparedImage(image, init.alpha)


class InitImageUnavailableError(RuntimeError):
    """A job's init image cannot be had: unreadable, or a feedback parent without an image."""


def _out_of_memory(failure: Exception) -> bool:
    import torch  # loaded with the engine by now

    return isinstance(failure, torch.OutOfMemoryError)


class _EngineLoader:
    """One model in memory at a time: jobs come model by model (the model is the outermost
    axis), so each model is loaded once. torch and diffusers are imported with the first."""

    def __init__(
        self, recipe: Recipe, device: str, dtype: str, options: RunOptions, reporter: Reporter
    ) -> None:
        self.vae = recipe.vae
        self.variant = recipe.variant
        self.device = device
        self.dtype = dtype
        self.fast_paths = options.fast_paths
        self.on_engine = options.on_engine
        self.reporter = reporter
        self.model: ModelSource | None = None
        self.engine: Engine | None = None

    def load(self, model: ModelSource) -> Engine:
        if self.engine is not None and model == self.model:
            return self.engine
        self.engine = None  # let the previous model go before the next one loads
        from batchgen.engine.img2img import Engine

        try:
            engine = Engine(
                model,
                self.device,
                self.dtype,
                vae=self.vae,
                variant=self.variant,
                fast_paths=self.fast_paths,
            )
        except Exception as error:  # noqa: BLE001 — reported as what it is: a model to fix
            raise BadInputError(
                f"cannot load model `{model.reference}` from {model.path}: "
                f"{type(error).__name__}: {error}"
            ) from error
        self.model, self.engine = model, engine
        if self.on_engine is not None:
            self.on_engine(engine)
        settings = ", ".join(filter(None, (self.dtype, str(self.fast_paths))))
        self.reporter.message(
            f"model {model.name} loaded in {engine.load_seconds:.1f}s on "
            f"{engine.device_label} ({settings})"
        )
        return engine


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
    if to_make:
        reporter.message(
            f"{recipe.name}{f' shard {shard}' if shard else ''}: {len(to_make)} to do, "
            f"{done_before} already done"
        )
        engines = _EngineLoader(recipe, device, plan.dtype, options, reporter)
        try:
            made, failed, stopped_by = _make_images(
                plan, to_make, manifest, engines, reporter, options
            )
        except _Stopped as stop:
            made, failed, storage_error = stop.made, stop.failed, str(stop.error)
            reporter.warning(storage_error)
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
    engines: _EngineLoader,
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
    renderer = _BatchRenderer(plan, reporter)
    prefetcher = InitImagePrefetcher()
    with _stop_on_signals(reporter) as stop:
        try:
            try:
                for batch, following in _batches(plan, engines, options.batch_size, wanted):
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


def _batches(
    plan: Plan, engines: _EngineLoader, batch_size: BatchSize, wanted: set[str]
) -> Iterator[tuple[list[PlannedJob], list[PlannedJob] | None]]:
    """This process's batches with a job in `wanted`, model by model (the outermost axis),
    each with the batch after it of the same model (None for the model's last: the next model
    is not loaded yet). Formed from the whole matrix as a single run forms them (shards own
    whole batches: shard.assign). With intermediates every batch holds one job: the recorder
    follows a single sample."""
    by_id = {planned.job.id: planned for planned in plan.jobs}
    for model, group in itertools.groupby(plan.jobs, key=lambda p: plan.recipe.model_of(p.job)):
        jobs = [planned.job for planned in group]
        if not any(by_id[job.id].mine for job in jobs):
            continue
        if plan.recipe.intermediates:
            size: int | Callable[[Job], int] = 1
        elif batch_size == "auto":
            size = _auto_size(engines, model)
        else:
            size = batch_size
        batches = [
            [by_id[job.id] for job in batch]
            for batch in make_batches(jobs, size)
            if by_id[batch[0].id].mine and any(job.id in wanted for job in batch)
        ]
        yield from zip(batches, [*batches[1:], None], strict=True)


def _auto_size(engines: _EngineLoader, model: ModelSource) -> Callable[[Job], int]:
    """`--batch-size auto`: by rule on the CPU; on a GPU, measured once per image size with
    the model loaded (the largest batch that fits its memory)."""
    if not engines.device.startswith("cuda"):
        return lambda job: auto_batch_size(engines.device, job.width, job.height)

    sizes: dict[tuple[int, int, bool], int] = {}

    def measured(job: Job) -> int:
        # Once per image size and guidance (which doubles the UNet's batch), not per group.
        key = (job.width, job.height, job.cfg > 1)
        if key not in sizes:
            from batchgen.engine.img2img import probe_cuda_batch_size

            try:
                init = prepared(job.init_image, (job.width, job.height))
                sizes[key] = probe_cuda_batch_size(engines.load(model), job, init)
            except (BadInputError, FastPathFailedError):
                raise  # the model cannot load or compile: the run stops with what to fix
            except Exception as error:  # noqa: BLE001 — the jobs themselves meet it and fail
                engines.reporter.message(
                    f"cannot measure the batch size for {job.width}x{job.height} "
                    f"({type(error).__name__}: {error}): batches of 1"
                )
                sizes[key] = 1
        return sizes[key]

    return measured


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
