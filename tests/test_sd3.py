"""Stable Diffusion 3 through the family seam: a plain job's pixels are
`StableDiffusion3Img2ImgPipeline`'s with the same inputs (bit for bit at batch 1 on the CPU,
within one 8-bit level batched), with its three text encoders, flow matching's noising and
schedulers, and the model's own scheduler where a recipe names none; on a tiny
SD3-architecture model (tools/tiny_sd3.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchgen.engine.families.base import PromptText
from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.engine.schedulers import FLOW_SCHEDULERS
from batchgen.jobs.job import Job
from batchgen.models.source import ModelSource
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from tests.helpers import (
    invoke,
    local_pipeline,
    manifest,
    max_level_difference,
    pipeline_pixels,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_engine(tiny_sd3: ModelSource) -> Engine:
    return Engine(tiny_sd3, device="cpu")


@pytest.fixture(scope="module")
def sd3_pipeline(tiny_sd3_folder: Path) -> Any:
    return local_pipeline("StableDiffusion3Img2ImgPipeline", tiny_sd3_folder)


@pytest.fixture(scope="module")
def sd3_job(job: Job, tiny_sd3: ModelSource) -> Job:
    # 6 steps at 0.5 take 3 by either rule: see the steps test below.
    return replace(
        job, model=tiny_sd3.identity, steps=6, strength=0.5, scheduler="flow_euler", cfg=7.0
    )


def sd3_pixels(pipe: Any, job: Job, init: PreparedImage, **options: Any) -> np.ndarray:
    # The size, or the pipeline resizes to its transformer's sample size.
    return pipeline_pixels(pipe, job, init, height=job.height, width=job.width, **options)


def test_an_sd3_folder_is_the_flow_matching_sd3_family(sd3_engine: Engine) -> None:
    assert sd3_engine.family.latent_format.channels == 16
    assert type(sd3_engine.family).__name__ == "StableDiffusion3"


@pytest.mark.parametrize("scheduler", sorted(FLOW_SCHEDULERS))
@pytest.mark.parametrize("negative_prompt", ["", "blurry, smoke"])
def test_every_flow_scheduler_matches_the_sd3_img2img_pipeline(
    sd3_engine: Engine,
    sd3_pipeline: Any,
    sd3_job: Job,
    init: PreparedImage,
    scheduler: str,
    negative_prompt: str,
) -> None:
    job = replace(sd3_job, scheduler=scheduler, negative_prompt=negative_prompt)
    ours = sd3_engine.render_pixels(job, init)
    theirs = sd3_pixels(sd3_pipeline, job, init)
    assert ours.shape == theirs.shape == (job.height, job.width, 3)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize(
    "changes",
    [
        {"prompt_2": "oil painting of a red square", "negative_prompt_2": "blurry"},
        {"cfg": 1.0},  # no guidance: no negative half
        {"strength": 1.0},
    ],
)
def test_prompt_and_guidance_options_match_the_pipeline(
    sd3_engine: Engine,
    sd3_pipeline: Any,
    sd3_job: Job,
    init: PreparedImage,
    changes: dict[str, Any],
) -> None:
    job = replace(sd3_job, **{"negative_prompt": "smoke", **changes})
    assert np.array_equal(sd3_engine.render_pixels(job, init), sd3_pixels(sd3_pipeline, job, init))


def test_clip_skip_moves_both_clip_encoders_to_an_earlier_layer(
    sd3_engine: Engine, sd3_pipeline: Any, sd3_job: Job, init: PreparedImage
) -> None:
    """A1111's 2 is diffusers' 1. The negative is empty: diffusers keeps the penultimate layer
    for any negative prompt, where batchgen (as A1111) skips for both halves."""
    job = replace(sd3_job, clip_skip=2, cfg=1.0)
    ours = sd3_engine.render_pixels(job, init)
    assert np.array_equal(ours, sd3_pixels(sd3_pipeline, job, init, clip_skip=1))
    assert not np.array_equal(ours, sd3_engine.render_pixels(replace(job, clip_skip=1), init))


def test_a_batch_is_each_jobs_image_within_one_level(
    sd3_engine: Engine, sd3_job: Job, init: PreparedImage
) -> None:
    jobs = [
        replace(sd3_job, seed=1, cfg=7.0, prompt="red square"),
        replace(sd3_job, seed=2, cfg=4.0, negative_prompt="smoke", prompt_2="blue circle"),
        replace(sd3_job, seed=3, cfg=5.5),
    ]
    batched = sd3_engine.render_batch(jobs, [init] * 3)
    for job, image in zip(jobs, batched, strict=True):
        assert max_level_difference(image, sd3_engine.render(job, init)) <= 1


def test_the_prompt_embedding_holds_clip_then_t5_and_both_projections(
    sd3_engine: Engine,
) -> None:
    embedding = sd3_engine.family.encode_prompt(PromptText("fire"), 1)
    transformer = sd3_engine.family.denoiser.config
    assert embedding.hidden_states.shape == (1, 77 + 256, transformer.joint_attention_dim)
    assert embedding.pooled is not None
    assert embedding.pooled.shape == (1, transformer.pooled_projection_dim)


def test_steps_follow_the_seed_document_where_the_pipeline_rounds_otherwise(
    sd3_engine: Engine, sd3_job: Job, init: PreparedImage
) -> None:
    """IMG2IMG.md: 10 steps at strength 0.7 take 7. diffusers' flow pipelines compute
    int(10 − 10 × 0.7) = int(2.9999999999999996) = 2 steps to skip and take 8; batchgen keeps
    the table, as for SD, so that a sweep's steps mean the same on every family."""
    job = replace(sd3_job, steps=10, strength=0.7)
    timesteps: list[float] = []
    sd3_engine.render_pixels(job, init, lambda state: timesteps.append(state.timestep))
    assert job.steps_taken == 7 and len(timesteps) == 7 + 1


SD3_RECIPE = """
init_images: [pictures/gradient.png]
prompts: [fire]
strength: 0.5
steps: 4
seeds: [7]
"""


def test_a_recipe_without_a_scheduler_runs_the_models_own(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_sd3_folder}\n{SD3_RECIPE}")
    code, output = invoke("run", str(recipe), "--device", "cpu")
    assert code == 0, output
    [row] = manifest(tmp_path / "out")
    assert row["status"] == "done"
    assert row["scheduler"] == "FlowMatchEulerDiscreteScheduler"


def test_schedulers_of_the_other_kind_are_refused_at_their_line(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    recipe = write_recipe(tmp_path, f"model: {tiny_sd3_folder}\nscheduler: k_lms\n{SD3_RECIPE}")
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    [problem] = caught.value.problems
    assert (problem.field, problem.line) == ("scheduler", 2)
    assert "`k_lms` cannot run" in problem.message and "flow-matching" in problem.message
    assert problem.hint is not None and "flow_euler" in problem.hint

    (tmp_path / "sd.yaml").write_text("model: builtin:tiny\nscheduler: flow_euler\n" + SD3_RECIPE)
    with pytest.raises(RecipeError, match="`flow_euler` cannot run `builtin:tiny`"):
        load_recipe(tmp_path / "sd.yaml")
