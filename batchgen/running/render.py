"""Rendering a run's batches: the model loaded once, each batch in one denoising loop, a failure
recorded for its jobs, a batch that runs out of GPU memory split in halves, and the batch size
chosen (`--batch-size auto`: by rule on the CPU, measured on a GPU)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from PIL import Image

from batchgen.engine.devices import FastPathFailedError, FastPaths
from batchgen.engine.images import PreparedImage
from batchgen.engine.init_images import prepared
from batchgen.errors import BadInputError
from batchgen.jobs.batching import auto_batch_size, make_batches
from batchgen.jobs.job import Job
from batchgen.jobs.plan import Plan, PlannedJob
from batchgen.models.source import ModelSource
from batchgen.recipe.load import Recipe
from batchgen.running.progress import Reporter
from batchgen.running.writer import FinishedJob
from batchgen.views.intermediates import IntermediatesRecorder

if TYPE_CHECKING:
    from batchgen.engine.img2img import Engine

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


class BatchRenderer:
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
                engine.precision_record,
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


class EngineLoader:
    """One model in memory at a time: jobs come model by model (the model is the outermost
    axis), so each model is loaded once. torch and diffusers are imported with the first."""

    def __init__(
        self, recipe: Recipe, device: str, dtype: str, options: RunOptions, reporter: Reporter
    ) -> None:
        self.vae = recipe.vae
        self.variant = recipe.variant
        self.refiners = recipe.refiners()
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
                refiners=self.refiners,
            )
        except FastPathFailedError:
            raise  # not the model's fault: what to run without
        except Exception as error:  # noqa: BLE001 — reported as what it is: a model to fix
            raise BadInputError(
                f"cannot load model `{model.reference}` from {model.path}: "
                f"{type(error).__name__}: {error}",
                getattr(error, "hint", None),  # a BatchgenError's: what to do about it
            ) from error
        self.model, self.engine = model, engine
        if self.on_engine is not None:
            self.on_engine(engine)
        vae_dtype = "VAE in float32" if engine.vae_upcast else ""
        settings = ", ".join(filter(None, (self.dtype, str(self.fast_paths), vae_dtype)))
        refiners = "".join(f" with refiner {refiner.name}" for refiner in self.refiners.values())
        self.reporter.message(
            f"model {model.name}{refiners} loaded in {engine.load_seconds:.1f}s on "
            f"{engine.device_label} ({settings})"
        )
        return engine

    def peak_gpu_bytes(self) -> int:
        """The most GPU memory torch held at once in this process (0 off CUDA, or when no
        model loaded): what the run summary reports."""
        if self.engine is None or not self.engine.device.startswith("cuda"):
            return 0
        import torch  # loaded with the engine

        return int(torch.cuda.max_memory_allocated(self.engine.device))


def planned_batches(
    plan: Plan, engines: EngineLoader, batch_size: BatchSize, wanted: set[str]
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
            size = auto_size(engines, model)
        else:
            size = batch_size
        batches = [
            [by_id[job.id] for job in batch]
            for batch in make_batches(jobs, size)
            if by_id[batch.first.id].mine and any(job.id in wanted for job in batch)
        ]
        yield from zip(batches, [*batches[1:], None], strict=True)


def auto_size(engines: EngineLoader, model: ModelSource) -> Callable[[Job], int]:
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
