"""Grouping jobs into batches that one denoising loop runs together, and choosing their size.

Torch-free, so that `plan` can show batches without loading a model. Batches are formed from
the whole job list in job order, never from what is left to do: a resumed run then forms the
same batches as an uninterrupted one, and on the CPU its images are bit-identical to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from batchgen.engine.schedulers import scheduler_spec
from batchgen.jobs.job import Job

MAX_BATCH_SIZE = 16  # a power of two: see shard_unit
# On the CPU a batch pays off only while its latents are small: the larger the images, the less
# a bigger batch adds to images per second. This budget gives 16 at 64 and 128 px, 4 at 256 px
# and 1 from 512 px.
CPU_BATCH_PIXELS = 512 * 512
# The VAE decoder's cost per image grows with the batch on the CPU once its activations leave
# the caches, so the engine decodes at most this many pixels in one call there.
CPU_DECODE_PIXELS = 256 * 256


class BatchKey(NamedTuple):
    """What jobs must share to run in one denoising loop: the engine (model, VAE, dtype), the
    timesteps (scheduler, nominal steps, steps taken), the latents' shape (size) and the UNet
    batch layout (guided or not). Prompts, seeds, init images, cfg and clip skip may differ."""

    model: str
    vae: str
    dtype: str
    scheduler: str  # canonical: `k_lms` and `LMSDiscreteScheduler` batch together
    steps_nominal: int
    steps_taken: int  # with steps_nominal, fixes the timesteps whatever the strength
    width: int
    height: int
    guided: bool  # cfg > 1: the UNet sees unconditional and conditional halves
    # Feedback: a job starts from its parent's image, so each iteration is a batch of its own
    # (made after the one before: its group comes later in job order).
    iteration: int
    # A refiner takes the steps after its switch: the same refiner and switch, the same split.
    refiner: str
    refiner_switch: float


def batch_key(job: Job) -> BatchKey:
    return BatchKey(
        model=job.model,
        vae=job.vae,
        dtype=job.dtype,
        scheduler=scheduler_spec(job.scheduler).canonical,
        steps_nominal=job.steps_nominal,
        steps_taken=job.steps_taken,
        width=job.width,
        height=job.height,
        guided=job.cfg > 1,
        iteration=job.iteration,
        refiner=job.refiner,
        refiner_switch=job.refiner_switch,
    )


@dataclass(frozen=True)
class Batch:
    """Jobs that one denoising loop runs together: the same `batch_key`, in job order."""

    jobs: tuple[Job, ...]

    def __iter__(self) -> Iterator[Job]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def first(self) -> Job:
        return self.jobs[0]


def make_batches(jobs: Sequence[Job], batch_size: int | Callable[[Job], int]) -> list[Batch]:
    """The jobs grouped by `batch_key`, groups in order of first appearance, jobs in job order
    within a group, each group cut into batches of `batch_size` (the last may be shorter);
    a function gives each group's size from its first job (`auto` sizes vary with size).

    Pass the full job list (a shard's full list when sharded), done jobs included: the batches
    then depend on the recipe alone. A runner re-renders a batch that is partly done rather
    than packing the leftovers into new batches, whose images could differ in the last bits.
    """
    size_of = batch_size if callable(batch_size) else lambda job: batch_size
    groups: dict[BatchKey, list[Job]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job), []).append(job)
    batches: list[Batch] = []
    for group in groups.values():
        size = size_of(group[0])
        if size < 1:
            raise ValueError(f"batch size must be at least 1, not {size}")
        batches += [
            Batch(tuple(group[start : start + size])) for start in range(0, len(group), size)
        ]
    return batches


def auto_batch_size(
    device: str, width: int, height: int, fits: Callable[[int], bool] | None = None
) -> int:
    """The batch size for images of width × height on `device`.

    The CPU: the pixel budget above, a deterministic rule, so that resumed runs batch alike.
    CUDA: the largest size up to MAX_BATCH_SIZE, halving, for which `fits(size)` is true (the
    engine's `probe_cuda_batch_size` tries a render and catches running out of memory); a GPU
    is faster with every sample it can hold. Anything else (MPS): 1, as no other size is known to
    pay off there.
    """
    if device == "cpu":
        fitting = max(1, min(CPU_BATCH_PIXELS // (width * height), MAX_BATCH_SIZE))
        return 1 << (fitting.bit_length() - 1)  # a power of two: see shard_unit
    if not device.startswith("cuda"):
        return 1
    if fits is None:
        raise ValueError("a CUDA batch size needs a trial render: use probe_cuda_batch_size")
    size = MAX_BATCH_SIZE
    while size > 1 and not fits(size):
        size //= 2
    return size


def cpu_decode_size(width: int, height: int) -> int:
    """How many images of width × height the engine decodes in one VAE call on the CPU."""
    return max(1, CPU_DECODE_PIXELS // (width * height))


def shard_unit(batch_size: int | Literal["auto"]) -> int:
    """The batches in which jobs are handed to shards: the batch size itself, or for `auto`
    MAX_BATCH_SIZE, which every size `auto` picks (a power of two) divides — so a shard's
    batches are the batches a single run forms."""
    return MAX_BATCH_SIZE if batch_size == "auto" else batch_size
