"""Batching and caches: jobs rendered together look as they do alone, caches change no pixel,
and batches are formed from the whole job list so that a resumed run batches alike.

The speed measurements behind the CPU batch size are in batchgen/batching.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchgen.engine.devices import FastPathFailedError
from batchgen.engine.images import PreparedImage, prepare, read_header
from batchgen.engine.img2img import (
    POSTERIOR_CACHE_ENTRIES,
    PROMPT_CACHE_ENTRIES,
    BoundedCache,
    Engine,
    probe_cuda_batch_size,
)
from batchgen.jobs.batching import (
    MAX_BATCH_SIZE,
    auto_batch_size,
    batch_key,
    cpu_decode_size,
    make_batches,
)
from batchgen.jobs.job import InitImage, Job
from batchgen.models.source import ModelSource
from tests.helpers import (
    BATCH_TOLERANCE_LEVELS,
    DRAWING_HEIGHT,
    DRAWING_WIDTH,
    max_level_difference,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def drawings(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three more init images, each with its own stripes."""
    folder = tmp_path_factory.mktemp("drawings")
    y, x = np.mgrid[0:DRAWING_HEIGHT, 0:DRAWING_WIDTH]
    paths = []
    for k in range(1, 4):
        pixels = np.stack([x * (4 + k) % 256, y * (2 + 3 * k) % 256, (x - y) * k % 256], axis=-1)
        paths.append(folder / f"drawing-{k}.png")
        Image.fromarray(pixels.astype(np.uint8)).save(paths[-1])
    return paths


def with_init(job: Job, path: Path) -> tuple[Job, PreparedImage]:
    header = read_header(path)
    image = InitImage(path, path.name, header.sha256, header.width, header.height)
    return replace(job, init_image=image), prepare(path, (job.width, job.height))


@pytest.fixture(scope="module")
def varied(
    job: Job, init: PreparedImage, drawings: list[Path]
) -> tuple[list[Job], list[PreparedImage]]:
    """Four jobs that share a batch key and nothing else: prompt, negative prompt, seed,
    init image and cfg all differ."""
    jobs, inits = [job], [init]
    for k, path in enumerate(drawings, start=1):
        other, other_init = with_init(job, path)
        jobs.append(
            replace(
                other,
                prompt=["smoke", "a red house by a lake", "fire"][k - 1],
                negative_prompt=["blurry", "", "ugly, smoke"][k - 1],
                seed=job.seed + 1000 * k,
                cfg=[3.0, 12.3, 5.5][k - 1],
            )
        )
        inits.append(other_init)
    return jobs, inits


def test_a_batch_of_four_equals_each_job_rendered_alone(
    engine: Engine, varied: tuple[list[Job], list[PreparedImage]]
) -> None:
    jobs, inits = varied

    batched = engine.render_batch(jobs, inits)
    alone = [engine.render(job, init) for job, init in zip(jobs, inits, strict=True)]

    assert len({image.tobytes() for image in batched}) == 4
    for together, by_itself in zip(batched, alone, strict=True):
        assert max_level_difference(together, by_itself) <= BATCH_TOLERANCE_LEVELS


@pytest.mark.parametrize("scheduler", ["k_euler_a", "k_dpm_2_a", "DDPMScheduler"])
# DPM2's sigma interpolation goes through numpy the 1.x way, thousands of times; harmless.
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
def test_an_ancestral_batch_draws_each_samples_step_noise_from_its_own_seed(
    engine: Engine, job: Job, init: PreparedImage, scheduler: str
) -> None:
    """These schedulers draw noise at every step: a shared generator would give every sample
    other noise than it gets alone, far beyond the tolerance."""
    jobs = [replace(job, scheduler=scheduler, seed=job.seed + k) for k in range(3)]

    batched = engine.render_batch(jobs, [init] * 3)

    for together, alone_job in zip(batched, jobs, strict=True):
        alone = engine.render(alone_job, init)
        assert max_level_difference(together, alone) <= BATCH_TOLERANCE_LEVELS


def test_a_batch_of_one_is_exactly_render(engine: Engine, job: Job, init: PreparedImage) -> None:
    """test_engine.py pins `render` to diffusers' pipeline bit for bit."""
    assert engine.render_batch([job], [init])[0].tobytes() == engine.render(job, init).tobytes()


def test_strength_zero_jobs_come_back_as_their_init_and_skip_the_batch(
    engine: Engine, varied: tuple[list[Job], list[PreparedImage]]
) -> None:
    (first, second, kept, *_), (first_init, second_init, kept_init, *_) = varied
    kept = replace(kept, strength=0.0)

    mixed = engine.render_batch([first, kept, second], [first_init, kept_init, second_init])
    without = engine.render_batch([first, second], [first_init, second_init])

    assert mixed[1].tobytes() == kept_init.rgb.tobytes()
    assert [mixed[0].tobytes(), mixed[2].tobytes()] == [image.tobytes() for image in without]


def test_jobs_that_cannot_share_a_loop_are_refused(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    with pytest.raises(ValueError, match="cannot share a batch .*: they differ in scheduler"):
        engine.render_batch([job, replace(job, scheduler="ddim")], [init, init])


def test_repeated_prompts_and_init_images_hit_the_caches(
    engine: Engine, job: Job, init: PreparedImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "prompt_cache", BoundedCache(PROMPT_CACHE_ENTRIES))
    monkeypatch.setattr(engine, "posterior_cache", BoundedCache(POSTERIOR_CACHE_ENTRIES))
    job = replace(job, negative_prompt="blurry, smoke")

    engine.render(job, init)
    engine.render_batch([replace(job, seed=1), replace(job, seed=2)], [init, init])

    # Prompt and negative prompt once each, then four more uses of each.
    assert (engine.prompt_cache.misses, engine.prompt_cache.hits) == (2, 4)
    assert (engine.posterior_cache.misses, engine.posterior_cache.hits) == (1, 2)


def test_cached_renders_are_bit_identical_to_uncached_ones(
    engine: Engine, job: Job, init: PreparedImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The posterior is cached, not a sample of it: the seed still draws the same sample."""
    job = replace(job, scheduler="k_euler_a")
    engine.render(job, init)  # the caches now hold this job's prompts and posterior
    cached = engine.render(job, init)

    monkeypatch.setattr(engine, "prompt_cache", BoundedCache(0))
    monkeypatch.setattr(engine, "posterior_cache", BoundedCache(0))
    uncached = engine.render(job, init)

    assert engine.posterior_cache.misses == 1
    assert cached.tobytes() == uncached.tobytes()


def test_a_bounded_cache_forgets_the_least_recently_used() -> None:
    cache: BoundedCache[str] = BoundedCache(2)
    for key in ["a", "b", "a", "c", "b"]:
        cache.get(key, key.upper)

    assert (cache.hits, cache.misses) == (1, 4)  # "b" was dropped when "c" came in


def test_batch_key_separates_what_changes_the_denoising_loop(job: Job) -> None:
    key = batch_key(job)

    for shares_the_loop in [
        replace(job, prompt="smoke", negative_prompt="blurry", seed=3, cfg=12.0, clip_skip=2),
        replace(job, scheduler="LMSDiscreteScheduler"),  # k_lms by its class name
        replace(job, strength=0.75),  # int(10 × 0.75) = 7 steps, as at 0.7
    ]:
        assert batch_key(shares_the_loop) == key
    for needs_its_own in [
        replace(job, scheduler="k_euler_a"),
        replace(job, scheduler="k_lms:karras"),
        replace(job, width=128),
        replace(job, height=64),
        replace(job, strength=0.4),
        replace(job, steps=20),
        replace(job, cfg=1.0),  # unguided: half the UNet batch
    ]:
        assert batch_key(needs_its_own) != key


def sweep(job: Job) -> list[Job]:
    """A recipe's matrix in job order: strength × scheduler × seed, 12 jobs."""
    return [
        replace(job, index=index, strength=strength, scheduler=scheduler, seed=seed)
        for index, (strength, scheduler, seed) in enumerate(
            (strength, scheduler, seed)
            for strength in (0.4, 0.7)
            for scheduler in ("k_lms", "ddim")
            for seed in (1, 2, 3)
        )
    ]


def test_batches_group_by_key_in_first_appearance_and_job_order(job: Job) -> None:
    batches = make_batches(sweep(job), batch_size=2)

    assert [[job.index for job in batch] for batch in batches] == [
        [0, 1],
        [2],
        [3, 4],
        [5],
        [6, 7],
        [8],
        [9, 10],
        [11],
    ]


def test_a_resumed_run_forms_the_same_batches_as_an_uninterrupted_one(job: Job) -> None:
    jobs = sweep(job)
    uninterrupted = make_batches(jobs, batch_size=2)
    done = {jobs[0].id, jobs[4].id, jobs[5].id}

    # The runner forms batches from the full matrix again and re-renders any batch that
    # holds a job not done yet; the ids (and so the file names) do not change.
    resumed = [
        batch
        for batch in make_batches(list(jobs), batch_size=2)
        if any(job.id not in done for job in batch)
    ]

    # Only [5] is left out; [0, 1] and [3, 4] are re-rendered whole.
    assert resumed == [batch for batch in uninterrupted if list(batch) != [jobs[5]]]
    # Batches of the leftovers alone would pair other jobs: other last bits on the CPU.
    leftovers = make_batches([job for job in jobs if job.id not in done], batch_size=2)
    assert leftovers != resumed


def test_a_batch_size_below_one_is_refused(job: Job) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make_batches([job], batch_size=0)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    # 300×300: the budget holds 2.9, rounded down to a power of two so that shards (given
    # whole batches of MAX_BATCH_SIZE) hold whole batches.
    [(64, 64, 16), (64, 96, 16), (128, 128, 16), (256, 256, 4), (300, 300, 2), (512, 512, 1)],
)
def test_cpu_batch_size_follows_the_pixel_budget(width: int, height: int, expected: int) -> None:
    assert auto_batch_size("cpu", width, height) == expected


@pytest.mark.parametrize(
    ("width", "height", "expected"), [(64, 64, 16), (128, 128, 4), (256, 256, 1), (512, 512, 1)]
)
def test_cpu_decodes_a_pixel_budget_at_a_time(width: int, height: int, expected: int) -> None:
    assert cpu_decode_size(width, height) == expected


@torch.no_grad()
def test_a_batch_decoded_in_parts_on_the_cpu_equals_each_image_decoded_alone(
    engine: Engine,
) -> None:
    # 256 px: one image per VAE call, so a batch's images are bit for bit the lone ones.
    latents = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    together = engine.decode_batch(latents)

    alone = np.stack([engine.decode_batch(latents[k : k + 1])[0] for k in range(3)])
    np.testing.assert_array_equal(together, alone)


def test_cuda_batch_size_halves_until_a_batch_fits() -> None:
    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= 5

    assert auto_batch_size("cuda:0", 512, 512, fits) == 4
    assert tried == [MAX_BATCH_SIZE, 8, 4]
    assert auto_batch_size("cuda", 512, 512, lambda size: False) == 1
    assert auto_batch_size("mps", 64, 64) == 1
    with pytest.raises(ValueError, match="probe_cuda_batch_size"):
        auto_batch_size("cuda", 64, 64)


def test_a_batch_size_probe_that_fails_gives_batches_of_one(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU, `auto` measures the batch size with a trial render. Anything but a model
    that cannot load (an init image gone bad since the plan, say) is the jobs' to meet: the
    run goes on with batches of one instead of stopping."""
    from types import SimpleNamespace

    from batchgen.engine import img2img as engine_module
    from batchgen.running.render import auto_size as _auto_size

    def broken(*args: object) -> int:
        raise RuntimeError("trial render failed (simulated)")

    monkeypatch.setattr(engine_module, "probe_cuda_batch_size", broken)
    said: list[str] = []
    engines = SimpleNamespace(
        device="cuda", load=lambda model: None, reporter=SimpleNamespace(message=said.append)
    )

    size = _auto_size(engines, model=None)  # type: ignore[arg-type]

    assert size(job) == 1 and size(job) == 1  # asked again: remembered, not probed again
    assert said == [
        f"cannot measure the batch size for {job.width}x{job.height} "
        "(RuntimeError: trial render failed (simulated)): batches of 1"
    ]


def test_a_compile_failure_in_the_batch_size_probe_stops_the_run(
    job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's trial render is the first compiled call: every batch would fail alike."""
    from types import SimpleNamespace

    from batchgen.engine import img2img as engine_module
    from batchgen.running.render import auto_size as _auto_size

    def cannot_compile(*args: object) -> int:
        raise FastPathFailedError("--fast compile cannot compile the UNet here (simulated)")

    monkeypatch.setattr(engine_module, "probe_cuda_batch_size", cannot_compile)
    engines = SimpleNamespace(device="cuda", load=lambda model: None)

    size = _auto_size(engines, model=None)  # type: ignore[arg-type]

    with pytest.raises(FastPathFailedError, match="simulated"):
        size(job)


def test_probing_needs_a_cuda_engine(engine: Engine, job: Job, init: PreparedImage) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        probe_cuda_batch_size(engine, job, init)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_tiny_model_fits_the_largest_batch_on_a_gpu(
    tiny: ModelSource, job: Job, init: PreparedImage
) -> None:
    gpu_engine = Engine(tiny, device="cuda")

    assert probe_cuda_batch_size(gpu_engine, job, init) == MAX_BATCH_SIZE
