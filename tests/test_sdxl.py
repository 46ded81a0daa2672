"""SDXL through the family seam: a plain job's pixels are `StableDiffusionXLImg2ImgPipeline`'s
with the same inputs (bit for bit at batch 1 on the CPU, within one 8-bit level batched), with
the pipeline's micro-conditioning, zeros for an empty negative prompt, `prompt_2` and
`clip_skip` on both encoders, base and refiner; on a tiny SDXL-architecture model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from batchgen.engine.families.base import PromptText
from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.engine.schedulers import SCHEDULER_NAMES
from batchgen.jobs.job import Job
from batchgen.models.source import ModelSource, resolve_model
from tests.helpers import (
    invoke,
    local_pipeline,
    manifest,
    max_level_difference,
    pipeline_pixels,
    use_scheduler,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SDXL_RECIPE = """
init_images: [pictures/gradient.png]
prompts: [fire]
strength: 0.5
steps: 4
seeds: [7]
"""


@pytest.fixture(scope="module")
def sdxl_engine(tiny_sdxl: ModelSource) -> Engine:
    return Engine(tiny_sdxl, device="cpu")


@pytest.fixture(scope="module")
def sdxl_pipeline(tiny_sdxl_folder: Path) -> Any:
    return local_pipeline("StableDiffusionXLImg2ImgPipeline", tiny_sdxl_folder)


@pytest.fixture(scope="module")
def sdxl_job(job: Job, tiny_sdxl: ModelSource) -> Job:
    return replace(job, model=tiny_sdxl.identity, steps=6, scheduler="k_euler")


def test_an_sdxl_folder_is_the_sdxl_family(tiny_sdxl: ModelSource) -> None:
    assert tiny_sdxl.family == "sdxl"


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_every_scheduler_matches_the_sdxl_img2img_pipeline(
    sdxl_engine: Engine, sdxl_pipeline: Any, sdxl_job: Job, init: PreparedImage, scheduler: str
) -> None:
    job = replace(sdxl_job, scheduler=scheduler, negative_prompt="blurry, smoke")
    ours = sdxl_engine.render_pixels(job, init)
    theirs = pipeline_pixels(sdxl_pipeline, job, init)
    assert ours.shape == theirs.shape == (job.height, job.width, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "changes",
    [
        {"negative_prompt": ""},  # force_zeros_for_empty_prompt: zeros, not an encoded ""
        {"prompt_2": "oil painting of a red square", "negative_prompt_2": "blurry"},
        {"cfg": 1.0},  # no guidance: no negative half
    ],
)
def test_prompt_options_match_the_pipeline(
    sdxl_engine: Engine,
    sdxl_pipeline: Any,
    sdxl_job: Job,
    init: PreparedImage,
    changes: dict[str, Any],
) -> None:
    job = replace(sdxl_job, **{"negative_prompt": "smoke", **changes})
    assert np.array_equal(
        sdxl_engine.render_pixels(job, init), pipeline_pixels(sdxl_pipeline, job, init)
    )


def test_an_empty_negative_prompt_is_zeros_and_a_written_one_is_not(sdxl_engine: Engine) -> None:
    empty = sdxl_engine.family.encode_prompt(PromptText("", negative=True))
    assert not empty.hidden_states.any() and empty.pooled is not None and not empty.pooled.any()
    assert sdxl_engine.family.encode_prompt(PromptText("smoke", negative=True)).hidden_states.any()
    assert sdxl_engine.family.encode_prompt(PromptText("")).hidden_states.any()  # positive ""


def test_clip_skip_applies_to_both_encoders_as_the_pipelines(
    sdxl_engine: Engine, sdxl_pipeline: Any, sdxl_job: Job, init: PreparedImage
) -> None:
    """A1111's 2 is diffusers' 1 (SDXL's penultimate layer is A1111's 1). The negative is
    empty: diffusers takes the penultimate layer for a written negative prompt whatever
    `clip_skip` says, where batchgen (as A1111) skips for both halves."""
    job = replace(sdxl_job, clip_skip=2, negative_prompt="")
    ours = sdxl_engine.render_pixels(job, init)
    assert np.array_equal(ours, pipeline_pixels(sdxl_pipeline, job, init, clip_skip=1))
    assert not np.array_equal(ours, sdxl_engine.render_pixels(replace(job, clip_skip=1), init))


def test_a_batch_is_each_jobs_image_within_one_level(
    sdxl_engine: Engine, sdxl_job: Job, init: PreparedImage
) -> None:
    jobs = [
        replace(sdxl_job, seed=1, cfg=7.5, prompt="red square"),
        replace(sdxl_job, seed=2, cfg=4.0, negative_prompt="smoke", prompt_2="blue circle"),
        replace(sdxl_job, seed=3, cfg=6.0),
    ]
    batched = sdxl_engine.render_batch(jobs, [init] * 3)
    for job, image in zip(jobs, batched, strict=True):
        assert max_level_difference(image, sdxl_engine.render(job, init)) <= 1


@pytest.fixture(scope="module")
def tiny_refiner(tiny_refiner_folder: Path) -> ModelSource:
    return resolve_model(str(tiny_refiner_folder), Path("."))


@pytest.fixture(scope="module")
def refiner_pipeline(tiny_refiner: ModelSource) -> Any:
    return local_pipeline("StableDiffusionXLImg2ImgPipeline", tiny_refiner.path)


def test_the_refiner_matches_the_pipeline_with_its_aesthetic_scores(
    tiny_refiner: ModelSource, refiner_pipeline: Any, sdxl_job: Job, init: PreparedImage
) -> None:
    engine = Engine(tiny_refiner, device="cpu")
    assert engine.family.requires_aesthetics_score
    for negative in ("", "smoke"):  # no force_zeros in a refiner: "" is encoded
        job = replace(sdxl_job, negative_prompt=negative)
        theirs = pipeline_pixels(refiner_pipeline, job, init)
        assert np.array_equal(engine.render_pixels(job, init), theirs)


@pytest.fixture(scope="module")
def refined_engine(tiny_sdxl: ModelSource, tiny_refiner: ModelSource) -> Engine:
    return Engine(tiny_sdxl, device="cpu", refiners={tiny_refiner.identity: tiny_refiner})


def base_then_refiner_pixels(base: Any, refiner: Any, job: Job, init: PreparedImage) -> np.ndarray:
    """What a user's diffusers code makes of a refined job: the base pipeline's latents up to
    `denoising_end`, the refiner's from `denoising_start`, one generator through both."""
    generator = torch.Generator("cpu").manual_seed(job.seed)
    prompts = {
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt or None,
        "num_inference_steps": job.steps_nominal,
        "guidance_scale": job.cfg,
        "generator": generator,
    }
    use_scheduler(base, job.scheduler)
    latents = base(
        image=init.rgb,
        strength=job.strength,
        denoising_end=job.refiner_switch,
        output_type="latent",
        **prompts,
    ).images
    use_scheduler(refiner, job.scheduler)
    images = refiner(
        image=latents, denoising_start=job.refiner_switch, output_type="np", **prompts
    ).images
    return np.asarray(images[0])


@pytest.mark.parametrize("scheduler", ["k_euler", "k_euler_a", "k_heun", "k_dpmpp_2", "ddim"])
@pytest.mark.parametrize("switch", [0.8, 0.5])
def test_a_refined_job_is_the_base_pipeline_then_the_refiners(
    refined_engine: Engine,
    sdxl_pipeline: Any,
    refiner_pipeline: Any,
    tiny_refiner: ModelSource,
    sdxl_job: Job,
    init: PreparedImage,
    scheduler: str,
    switch: float,
) -> None:
    job = replace(
        sdxl_job,
        scheduler=scheduler,
        steps=10,
        negative_prompt="smoke",
        refiner=tiny_refiner.identity,
        refiner_switch=switch,
    )
    ours = refined_engine.render_pixels(job, init)
    theirs = base_then_refiner_pixels(sdxl_pipeline, refiner_pipeline, job, init)
    assert np.array_equal(ours, theirs)
    unrefined = refined_engine.render_pixels(replace(job, refiner="", refiner_switch=0.0), init)
    assert not np.array_equal(ours, unrefined)


def test_a_float16_render_keeps_the_vae_in_float32_and_says_so(
    tiny_sdxl: ModelSource,
    tiny: ModelSource,
    sdxl_job: Job,
    init: PreparedImage,
    tmp_path: Path,
) -> None:
    """SDXL's VAE overflows in float16 (`force_upcast` in its config): it runs in float32, as
    the pipeline runs it, and the manifest's `fast_paths` record names it. SD 1.x's pipeline
    does not upcast, nor does batchgen."""
    engine = Engine(tiny_sdxl, device="cpu", dtype="float16")
    assert engine.family.vae.dtype == torch.float32 and engine.vae_upcast
    pixels = engine.render_pixels(replace(sdxl_job, dtype="float16", steps=2), init)
    assert np.isfinite(pixels).all() and pixels.std() > 0
    assert not Engine(tiny_sdxl, device="cpu").vae_upcast  # float32 throughout
    assert Engine(tiny, device="cpu", dtype="float16").precision_record == ""

    recipe = write_recipe(tmp_path, f"model: {tiny_sdxl.path}\n{SDXL_RECIPE}")
    code, output = invoke("run", str(recipe), "--device", "cpu", "--dtype", "float16")
    assert code == 0, output
    assert "VAE in float32" in output
    assert {row["fast_paths"] for row in manifest(tmp_path / "out")} == {"vae_float32"}


def test_a_refiner_takes_every_step_that_strength_leaves_below_its_switch(
    refined_engine: Engine, tiny_refiner: ModelSource, sdxl_job: Job, init: PreparedImage
) -> None:
    """At strength 0.2 the steps taken all lie past a switch at 0.5: the refiner takes those
    two and no more (diffusers' refiner would start from its switch, at noise levels the
    latents never had)."""
    job = replace(
        sdxl_job, strength=0.2, steps=10, refiner=tiny_refiner.identity, refiner_switch=0.5
    )
    timesteps: list[float] = []
    refined = refined_engine.render_pixels(job, init, lambda s: timesteps.append(s.timestep))
    plain: list[float] = []
    unrefined = refined_engine.render_pixels(
        replace(job, refiner="", refiner_switch=0.0), init, lambda s: plain.append(s.timestep)
    )
    assert job.steps_taken == 2 and timesteps == plain and len(timesteps) == 3
    assert not np.array_equal(refined, unrefined)  # the refiner's UNet took them
