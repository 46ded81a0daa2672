"""What only SDXL has (issue 18), on the tiny SDXL-architecture folder (tools/tiny_sdxl.py):
the prompt cache's pooled embeddings, and inpainting with a 9-channel SDXL inpainting UNet.
Everything SDXL shares with SD3 through the CLI (sweeps, `prompt_2`, the A1111 text, grids,
the report, status, verify, resume, variations, feedback, inpainting by blending,
intermediates) is checked for both in tests/test_family_runs.py, whose helpers these tests use
(and shards and `--fast`, for SDXL alone); tests/test_sdxl.py checks the engine's pixels
against diffusers' pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from batchgen.engine.families.base import PromptText
from batchgen.engine.images import PreparedImage, prepare
from batchgen.engine.img2img import BoundedCache, Engine
from batchgen.jobs.job import Job
from batchgen.models.source import ModelSource, resolve_model
from tests.helpers import (
    SIZE,
    beyond_the_feathering,
    hole,
    holed_picture,
    init_image,
    inpainting_run,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sdxl_job(job: Job, model: ModelSource, **changes: object) -> Job:
    """conftest's `job` (64×96, k_lms) on `model`, at 4 steps (2 taken at strength 0.5)."""
    return replace(job, model=model.identity, steps=4, strength=0.5, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny_sdxl_inpainting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL with a 9-channel UNet (SDXL inpainting's), random weights."""
    from tools.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(
        tmp_path_factory.mktemp("sdxl-inpainting") / "tiny-sdxl-inpainting", inpainting=True
    )


# --- the prompt cache -----------------------------------------------------------------------


def test_the_prompt_cache_serves_repeats_with_their_pooled_embedding(
    tiny_sdxl: ModelSource, job: Job, init: PreparedImage
) -> None:
    engine = Engine(tiny_sdxl, device="cpu")  # its own: counts from zero
    first = sdxl_job(job, tiny_sdxl, prompt="red square", negative_prompt="smoke", seed=1)
    again = replace(first, seed=2, cfg=4.0)  # the same prompts
    other_2 = replace(first, prompt_2="blue circle")

    engine.render(first, init)
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (0, 2)  # prompt, negative
    cached = engine.render(again, init)
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (2, 2)
    assert engine.posterior_cache.hits == 1  # the same init image at the same size
    engine.render(other_2, init)  # another second prompt is another embedding
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (3, 3)

    embedding = engine.prompt_embeddings(PromptText("red square"))
    assert engine.prompt_cache.hits == 4
    assert embedding.pooled is not None and embedding.pooled.shape == (1, 48)
    uncached = engine.family.encode_prompt(PromptText("red square"), 1)
    assert uncached.pooled is not None and torch.equal(embedding.pooled, uncached.pooled)
    engine.prompt_cache = BoundedCache(0)  # off: every job encodes its prompts
    assert np.array_equal(np.asarray(engine.render(again, init)), np.asarray(cached))


# --- an SDXL inpainting UNet ----------------------------------------------------------------


def test_an_sdxl_inpainting_unet_runs_and_keeps_the_opaque_part(
    tiny_sdxl_inpainting: Path, tmp_path: Path
) -> None:
    row, original, made = inpainting_run(tiny_sdxl_inpainting, tmp_path)

    assert (row["status"], row["mask"]) == ("done", "alpha")
    assert np.array_equal(beyond_the_feathering(made), beyond_the_feathering(original))
    assert np.abs(hole(made) - hole(original)).mean() > 5


def test_an_sdxl_inpainting_unet_is_given_the_mask_and_the_kept_image(
    tiny_sdxl_inpainting: Path, tmp_path: Path, job: Job
) -> None:
    model = resolve_model(str(tiny_sdxl_inpainting), Path("."))
    engine = Engine(model, device="cpu")
    assert engine.family.inpainting
    seen: list[torch.Tensor] = []
    engine.family.denoiser.conv_in.register_forward_hook(
        lambda _, inputs, __: seen.append(inputs[0])
    )
    path = holed_picture(tmp_path / "hole.png")
    holed = sdxl_job(job, model, init_image=init_image(path), width=SIZE, height=SIZE, mask_blur=0)

    engine.render(holed, prepare(path, (SIZE, SIZE)))

    first = seen[0]  # guided: unconditional and conditional halves, 4 + 1 + 4 channels
    assert first.shape == (2, 9, SIZE // 8, SIZE // 8)
    mask = first[0, 4]
    assert mask[0, 0] == 0 and mask[4, 4] == 1  # a corner is kept, the hole's middle redrawn
    assert first[0, 5:].abs().sum() > 0  # the kept image's latents
