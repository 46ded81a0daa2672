"""What only Stable Diffusion 3 has (issue 19), on the tiny SD3-architecture folder
(tools/tiny_sd3.py): flow matching's inpainting, which puts the kept latents back with
`scale_noise` at the σ of the step to come, and `flow_heun` beside `flow_euler`. Everything SD3
shares with SDXL through the CLI (a sweep on the model's own scheduler, `prompt_2`, the A1111
text, grids, the report, status, verify, resume, variations, feedback, inpainting by blending,
intermediates with SD3's 16-channel factors) is checked for both in tests/test_family_runs.py,
whose helpers these tests use; tests/test_sd3.py checks the engine's pixels against diffusers'
pipeline."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from batchgen.engine.denoise import StepState
from batchgen.engine.images import prepare
from batchgen.engine.img2img import Engine
from batchgen.jobs.job import Job
from batchgen.models.source import ModelSource
from tests.helpers import (
    SIZE,
    SWEEP,
    fire_at_cfg_4,
    holed_picture,
    init_image,
    manifest,
    pixels,
    png_text,
    run,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_engine(one_torch_thread: None, tiny_sd3: ModelSource) -> Engine:
    return Engine(tiny_sd3, device="cpu")


# --- inpainting: flow matching's kept latents -----------------------------------------------


@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_heun"])
def test_kept_latents_are_put_back_at_flow_matchings_noise_level_of_the_next_step(
    sd3_engine: Engine,
    tiny_sd3: ModelSource,
    job: Job,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scheduler: str,
) -> None:
    """After each step the kept latents are σ·noise + (1 − σ)·clean at the σ of the step to
    come (scale_noise, not add_noise's √ᾱ mix), and clean after the last: what the model paints
    the hole to fit around."""
    path = holed_picture(tmp_path / "hole.png")
    holed = replace(
        job, model=tiny_sd3.identity, steps=4, strength=0.75, scheduler=scheduler, cfg=5.0,
        init_image=init_image(path), width=SIZE, height=SIZE, mask_blur=0,
    )  # fmt: skip
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_prepare = sd3_engine.prepare_latents

    def prepare_latents(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, noise, clean = real_prepare(*args)  # type: ignore[arg-type]
        drawn.append((noise, clean))
        return latents, noise, clean

    monkeypatch.setattr(sd3_engine, "prepare_latents", prepare_latents)
    states: list[StepState] = []
    sd3_engine.render(holed, prepare(path, (SIZE, SIZE)), states.append)

    ((noise, clean),) = drawn
    assert noise.shape == clean.shape == (1, 16, SIZE // 8, SIZE // 8)
    kept = torch.ones((SIZE // 8, SIZE // 8), dtype=torch.bool)
    kept[2:6, 2:6] = False  # the latents under the hole are redrawn
    steps = len(states) - 1
    assert steps == (3 if scheduler == "flow_euler" else 5)  # Heun: two calls a step but the last
    for state, following in zip(states[1:-1], states[2:], strict=True):
        sigma = following.timestep / 1000  # flow matching's timesteps are σ × 1000
        expected = sigma * noise + (1 - sigma) * clean
        assert torch.allclose(state.latents[:, :, kept], expected[:, :, kept], atol=1e-5)
        assert not torch.allclose(state.latents[:, :, ~kept], expected[:, :, ~kept], atol=1e-2)
    assert torch.equal(states[-1].latents[:, :, kept], clean[:, :, kept])


# --- the other flow scheduler ---------------------------------------------------------------


def test_flow_heun_runs_and_makes_other_images_than_flow_euler(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    # tests/test_family_runs.py's sweep's "fire" jobs at cfg 4.0, with Euler and with Heun.
    body = fire_at_cfg_4(SWEEP) + "scheduler: [flow_euler, flow_heun]\n"
    run(write_recipe(tmp_path, f"model: {tiny_sd3_folder}\n{body}"))

    rows = manifest(tmp_path / "out")
    euler = {row["seed"]: row for row in rows if row["scheduler"] == "flow_euler"}
    heun = [row for row in rows if row["scheduler"] == "flow_heun"]
    assert len(euler) == len(heun) == 2
    assert {row["status"] for row in rows} == {"done"}
    assert {row["steps_taken"] for row in heun} == {"2"}
    for row in heun:
        assert row["id"] != euler[row["seed"]]["id"]  # the scheduler is in the id
        made = pixels(tmp_path / "out" / row["path"])
        assert np.abs(made - pixels(tmp_path / "out" / euler[row["seed"]]["path"])).mean() > 1
        assert "Sampler: Heun," in png_text(tmp_path / "out" / row["path"], "parameters")
