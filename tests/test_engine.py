"""The engine: same pixels as diffusers' img2img pipeline, IMG2IMG.md's step counts,
strength 0 keeping the original, and bit-identical CPU renders."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from batchgen.engine.devices import FastPathFailedError, FastPaths, resolve_device, resolve_dtype
from batchgen.engine.families.base import place
from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine, NonFiniteImageError
from batchgen.engine.schedulers import scheduler_spec
from batchgen.jobs.job import Job, StepsMode
from batchgen.models.source import ModelSource
from tests.helpers import DRAWING_HEIGHT, DRAWING_WIDTH

SIZE = (DRAWING_WIDTH, DRAWING_HEIGHT)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tiny: ModelSource) -> Any:  # diffusers' pipelines are untyped attribute bags
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny.path, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)  # each test sets its own class
    return pipe


@pytest.fixture
def unet_calls(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts UNet forward passes (a classifier-free-guidance pair is one batched pass)."""
    calls: list[int] = []
    forward = engine.family.unet.forward

    def counting_forward(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.family.unet, "forward", counting_forward)
    return calls


def pipeline_output(pipe: Any, job: Job, init: PreparedImage, output_type: str) -> np.ndarray:
    spec = scheduler_spec(job.scheduler)
    scheduler_class = getattr(diffusers, spec.class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.model_scheduler_config, **spec.config)
    images = pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt,
        image=init.rgb,
        strength=job.strength,
        num_inference_steps=job.steps_nominal,
        guidance_scale=job.cfg,
        generator=torch.Generator("cpu").manual_seed(job.seed),
        output_type=output_type,
    ).images
    return np.asarray(images[0])


@pytest.mark.parametrize(
    ("scheduler", "cfg", "negative_prompt"),
    [
        ("k_dpmpp_2:karras", 7.5, ""),  # A1111's DPM++ 2M with "Schedule type: Karras"
        ("ddim", 7.5, "blurry, smoke"),
        ("k_euler_a", 7.5, "blurry, smoke"),  # ancestral: draws from the generator every step
        ("k_dpmpp_2", 7.5, ""),
        ("plms", 7.5, ""),  # the model's own scheduler, with PLMS's repeated first timestep
        ("k_heun", 7.5, ""),  # second order: two timesteps per step
        ("k_lms", 1.0, "blurry, smoke"),  # no guidance: the negative prompt is not used
    ],
)
def test_render_matches_the_diffusers_img2img_pipeline(
    engine: Engine,
    pipeline: Any,
    job: Job,
    init: PreparedImage,
    scheduler: str,
    cfg: float,
    negative_prompt: str,
) -> None:
    job = replace(job, scheduler=scheduler, cfg=cfg, negative_prompt=negative_prompt)

    ours = engine.render_pixels(job, init)
    theirs = pipeline_output(pipeline, job, init, output_type="np")

    assert ours.shape == theirs.shape == (job.height, job.width, 3)
    assert np.abs(ours - theirs).max() <= 1e-5
    ours_8bit = np.asarray(engine.render(job, init))
    assert np.array_equal(ours_8bit, pipeline_output(pipeline, job, init, output_type="pil"))


def test_clip_skip_2_conditions_on_the_penultimate_clip_layer(
    engine: Engine, pipeline: Any, job: Job, init: PreparedImage
) -> None:
    """A1111's "Clip skip: 2": the second-to-last layer's hidden state through CLIP's final
    layer norm. (diffusers 0.42's own `clip_skip` path reaches for `text_encoder.text_model`,
    which transformers 5 no longer has, so the pipeline is given those embeddings instead.)"""
    job = replace(job, clip_skip=2, negative_prompt="blurry, smoke")

    def penultimate(prompt: str) -> torch.Tensor:
        ids = pipeline.tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        hidden = pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        return pipeline.text_encoder.final_layer_norm(hidden)

    spec = scheduler_spec(job.scheduler)
    scheduler_class = getattr(diffusers, spec.class_name)
    pipeline.scheduler = scheduler_class.from_config(pipeline.model_scheduler_config)
    with torch.no_grad():
        theirs = pipeline(
            prompt_embeds=penultimate(job.prompt),
            negative_prompt_embeds=penultimate(job.negative_prompt),
            image=init.rgb,
            strength=job.strength,
            num_inference_steps=job.steps_nominal,
            guidance_scale=job.cfg,
            generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="np",
        ).images[0]

    ours = engine.render_pixels(job, init)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert not np.array_equal(ours, engine.render_pixels(replace(job, clip_skip=1), init))


def test_guidance_uses_the_negative_prompt(engine: Engine, job: Job, init: PreparedImage) -> None:
    plain = engine.render_pixels(job, init)
    negative = engine.render_pixels(replace(job, negative_prompt="blurry, smoke"), init)
    unguided = engine.render_pixels(replace(job, cfg=1.0), init)
    unguided_negative = engine.render_pixels(
        replace(job, cfg=1.0, negative_prompt="blurry, smoke"), init
    )

    assert not np.array_equal(plain, negative)
    assert np.array_equal(unguided, unguided_negative)


@pytest.mark.parametrize(
    ("steps", "strength", "steps_mode", "nominal", "taken"),
    [
        (10, 0.7, "nominal", 10, 7),  # IMG2IMG.md's table
        (10, 0.4, "nominal", 10, 4),
        (4, 0.4, "effective", 10, 4),  # IMG2IMG.md's 20 ÷ 0.4 = 50, scaled down
    ],
)
def test_the_denoiser_takes_int_steps_times_strength_steps(
    engine: Engine,
    job: Job,
    init: PreparedImage,
    unet_calls: list[int],
    steps: int,
    strength: float,
    steps_mode: StepsMode,
    nominal: int,
    taken: int,
) -> None:
    job = replace(job, steps=steps, strength=strength, steps_mode=steps_mode)

    engine.render(job, init)

    assert (job.steps_nominal, job.steps_taken) == (nominal, taken)
    assert len(unet_calls) == taken


def test_strength_zero_keeps_the_original_intact(
    engine: Engine, job: Job, init: PreparedImage, unet_calls: list[int]
) -> None:
    job = replace(job, strength=0.0)

    image = engine.render(job, init)

    assert job.steps_taken == 0
    assert unet_calls == []
    assert image.size == init.rgb.size
    assert np.array_equal(np.asarray(image), np.asarray(init.rgb))


def test_cpu_renders_are_bit_identical_across_calls_and_engines(
    engine: Engine, tiny: ModelSource, job: Job, init: PreparedImage
) -> None:
    job = replace(job, scheduler="k_euler_a")  # random draws inside the loop too

    first = engine.render(job, init).tobytes()
    second = engine.render(job, init).tobytes()
    from_another_engine = Engine(tiny, device="cpu").render(job, init).tobytes()

    assert first == second == from_another_engine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fast_paths_stay_close_to_the_plain_gpu_render(
    tiny: ModelSource, job: Job, init: PreparedImage
) -> None:
    """fp16 on CUDA, plain and with channels_last, TF32 (no effect in fp16) and VAE slicing:
    each GPU render is repeatable, and the fast one moves pixels only a little. Loose bounds,
    first met on an H200 (benchmarks/RESULTS.md; compile is left out: minutes of warm-up)."""
    fast = FastPaths(channels_last=True, tf32=True, vae_slicing=True)
    plain_engine = Engine(tiny, device="cuda", dtype="float16")
    plain = np.asarray(plain_engine.render(job, init), dtype=np.int16)
    again = np.asarray(plain_engine.render(job, init), dtype=np.int16)
    del plain_engine
    faster = np.asarray(
        Engine(tiny, device="cuda", dtype="float16", fast_paths=fast).render(job, init),
        dtype=np.int16,
    )

    assert np.array_equal(plain, again), "a CUDA render gave other pixels the second time"
    difference = np.abs(faster - plain)
    assert difference.mean() < 1.0 and difference.max() <= 32, (difference.mean(), difference.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_keeps_the_models_in_cpu_memory_and_renders_the_same_pixels(
    tiny: ModelSource, job: Job, init: PreparedImage
) -> None:
    """`--fast offload`: the UNet waits in CPU memory, runs on the GPU, and the image is the
    GPU render's (the same kernels on the same device; a level allowed for the unknown)."""
    plain = np.asarray(Engine(tiny, device="cuda", dtype="float16").render(job, init), np.int16)
    offloaded = Engine(tiny, device="cuda", dtype="float16", fast_paths=FastPaths(offload=True))
    assert next(offloaded.unet.parameters()).device.type == "cpu"
    image = np.asarray(offloaded.render(job, init), np.int16)
    assert offloaded.precision_record == "offload"
    assert np.abs(image - plain).max() <= 1


def test_offload_chains_the_models_in_the_order_they_run() -> None:
    """What `--fast offload` installs (the GPU test above runs it): each model is moved to the
    device when it runs, and the one before it back to the CPU then, as diffusers' model CPU
    offload does; without offload each model is on the device, in eval mode, frozen."""
    text_encoder, unet, vae = (torch.nn.Linear(2, 2) for _ in range(3))
    place((text_encoder, unet, vae), "cpu", offload=True)
    hooks = [model._hf_hook for model in (text_encoder, unet, vae)]
    assert hooks[0].prev_module_hook is None
    assert hooks[1].prev_module_hook.model is text_encoder
    assert hooks[2].prev_module_hook.model is unet
    plain = torch.nn.Linear(2, 2)
    place((plain,), "meta")
    assert plain.weight.is_meta and not plain.training and not plain.weight.requires_grad


def test_offload_on_the_cpu_is_refused_with_what_to_do(tiny: ModelSource) -> None:
    with pytest.raises(FastPathFailedError, match="this run is on cpu, with nothing to offload"):
        Engine(tiny, device="cpu", fast_paths=FastPaths(offload=True))


@pytest.mark.slow
def test_compiled_unet_renders_what_the_plain_one_does_on_the_cpu(
    tiny: ModelSource, engine: Engine, job: Job, init: PreparedImage
) -> None:
    """`--fast compile` end to end where a test can run it: inductor builds C++ for the CPU
    (a minute of warm-up on 2 cores), with `fullgraph`, so a graph break in diffusers' UNet
    fails here instead of silently running eager. Its kernels sum in another order: close,
    not identical (1 level apart in benchmarks/RESULTS.md)."""
    compiled = Engine(tiny, device="cpu", fast_paths=FastPaths(compile=True))
    faster = np.asarray(compiled.render(job, init), dtype=np.int16)
    plain = np.asarray(engine.render(job, init), dtype=np.int16)

    assert isinstance(compiled.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert np.abs(faster - plain).max() <= 2


@pytest.mark.parametrize("asked", [False, True])
def test_tf32_is_the_engines_own_choice_while_it_renders_and_only_then(
    engine: Engine, job: Job, init: PreparedImage, monkeypatch: pytest.MonkeyPatch, asked: bool
) -> None:
    """The flags are process-wide, and torch turns TF32 on for cuDNN convolutions unless told
    otherwise: a float32 render without `--fast tf32` must not run half in it, nor leave an
    engine's choice behind for the next (the benchmark's plain loop runs in the same process)."""

    def flags() -> tuple[bool, bool]:
        return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    during: set[tuple[bool, bool]] = set()
    before = flags()
    monkeypatch.setattr(engine, "fast_paths", FastPaths(tf32=asked))

    engine.render(job, init, lambda state: during.add(flags()))

    assert during == {(asked, asked)}
    assert flags() == before


def test_nan_pixels_from_the_vae_are_an_error_not_a_black_image(
    engine: Engine, job: Job, init: PreparedImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an SD VAE overflowing in float16 gives: an error saying what to change."""

    def overflowing(latents: torch.Tensor, return_dict: bool = True) -> tuple[torch.Tensor]:
        height, width = (side * 8 for side in latents.shape[-2:])
        return (torch.full((len(latents), 3, height, width), float("nan")),)

    monkeypatch.setattr(engine.family.vae, "decode", overflowing)
    with pytest.raises(NonFiniteImageError, match="run with --dtype float32 or bfloat16"):
        engine.render(job, init)


def test_different_seeds_give_different_images(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    first = engine.render(job, init)
    other_seed = engine.render(replace(job, seed=job.seed + 1), init)

    assert first.tobytes() != other_seed.tobytes()


def test_engine_records_what_it_loaded(engine: Engine) -> None:
    assert (engine.device, engine.dtype) == ("cpu", "float32")
    family = engine.family
    assert family.unet.dtype == family.text_encoder.dtype == family.vae.dtype == torch.float32
    assert 0 < engine.load_seconds < 60


def test_auto_device_and_dtype_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    assert resolve_device("auto") == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda:1") == "float16"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "sees no CUDA GPU"),
        ("cuda:1", "sees no CUDA GPU"),
        ("mps", "no Apple GPU"),
        ("gpu", "unknown device `gpu`"),
        ("cuda:x", "unknown device `cuda:x`"),
    ],
)
def test_an_unavailable_device_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, device: str, message: str
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)

    with pytest.raises(ValueError, match=message):
        resolve_device(device)


def test_an_unknown_dtype_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown dtype `fp16`; use auto, float32"):
        resolve_dtype("fp16", "cpu")
