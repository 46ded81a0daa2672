"""Intermediates: the per-step hook sees the start and every step without changing the image,
and the strip shows each step's latents (and predicted x0), labelled, with its note."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from PIL import Image

from batchgen.engine.denoise import StepState, get_timesteps, predicted_original_sample
from batchgen.engine.families.sd import LATENT_RGB_FACTORS
from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.jobs.job import Job
from batchgen.views.intermediates import (
    GAP,
    LABEL_HEIGHT,
    NOTE_HEIGHT,
    STRIP_TEXT_KEY,
    Frame,
    IntermediatesRecorder,
    approximate_rgb,
    write_strip,
)
from tests.helpers import DRAWING_HEIGHT, DRAWING_WIDTH

WIDTH, HEIGHT = DRAWING_WIDTH, DRAWING_HEIGHT  # latents 8 × 12
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def render_with_states(engine: Engine, job: Job, init: PreparedImage) -> list[StepState]:
    states: list[StepState] = []
    engine.render(job, init, on_step=states.append)
    return states


def test_the_hook_sees_the_noised_init_then_every_step_with_its_timestep(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    states = render_with_states(engine, job, init)

    timesteps = get_timesteps(engine.make_scheduler("k_lms"), 10, 0.7, "cpu").tolist()
    assert len(timesteps) == job.steps_taken == 7
    assert [state.index for state in states] == list(range(8))
    assert [state.timestep for state in states] == [timesteps[0], *timesteps]
    assert all(state.latents.shape == (1, 4, HEIGHT // 8, WIDTH // 8) for state in states)
    assert states[0].predicted_x0 is None
    assert all(state.predicted_x0 is not None for state in states[1:])


@pytest.mark.parametrize(
    ("scheduler", "states_expected"),
    [
        ("k_lms", 7 + 1),
        ("k_euler_a", 7 + 1),  # draws from the generator at every step
        ("ddim", 7 + 1),
        ("k_dpmpp_2", 7 + 1),  # no x0 in its step output: computed from ᾱ_t
        ("plms", 7 + 2),  # its warm-up step evaluates the UNet twice
        ("k_heun", 2 * 7),  # second order: two evaluations per step but the last
    ],
)
def test_recording_exact_frames_changes_no_pixel(
    engine: Engine, job: Job, init: PreparedImage, scheduler: str, states_expected: int
) -> None:
    job = replace(job, scheduler=scheduler)
    recorder = IntermediatesRecorder(engine, mode="exact", x0=True)

    recorded = engine.render(job, init, on_step=recorder)
    plain = engine.render(job, init)

    assert recorded.tobytes() == plain.tobytes()
    assert len(recorder.frames) == states_expected
    assert all(frame.predicted_x0 is not None for frame in recorder.frames[1:])
    # Exact frames are VAE decodes: the last one is the image itself.
    assert recorder.frames[-1].latents.tobytes() == plain.tobytes()


def test_strength_zero_takes_no_step_and_calls_the_hook_never(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    assert render_with_states(engine, replace(job, strength=0.0), init) == []


def test_computed_x0_is_what_ddim_predicts(engine: Engine) -> None:
    # Unclipped: DDIM's default clips x0 to [-1, 1] under a config that doesn't say (tiny's).
    scheduler = DDIMScheduler.from_config(engine.family.scheduler_config, clip_sample=False)
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 12, 8, generator=generator)
    noise_pred = torch.randn(1, 4, 12, 8, generator=generator)
    timestep = scheduler.timesteps[3]

    ddim_output = scheduler.step(noise_pred, timestep, sample)
    without_x0 = SchedulerOutput(prev_sample=ddim_output.prev_sample)
    computed = predicted_original_sample(scheduler, without_x0, noise_pred, timestep, sample)

    assert computed is not None
    torch.testing.assert_close(computed, ddim_output.pred_original_sample)


def test_approximate_frames_are_the_linear_projection_at_latent_size(engine: Engine) -> None:
    latents = torch.zeros(1, 4, 12, 8)
    latents[0, 3] = -1.0  # SD 1.x's fourth channel is blue's opposite

    frame = approximate_rgb(latents, engine.family.latent_format)

    assert frame.size == (8, 12)
    expected = np.round((np.clip(-np.array(LATENT_RGB_FACTORS[3]) / 2 + 0.5, 0, 1)) * 255)
    assert np.array_equal(np.asarray(frame)[5, 3], expected.astype(np.uint8))
    assert np.asarray(frame)[5, 3, 2] > np.asarray(frame)[5, 3, 0]  # bluish


def test_the_strip_shows_frames_labels_x0_row_and_note(
    engine: Engine, job: Job, init: PreparedImage, tmp_path: Path
) -> None:
    recorder = IntermediatesRecorder(engine, x0=True)
    engine.render(job, init, on_step=recorder)
    path = tmp_path / "intermediates" / "0000-fire.png"

    write_strip(recorder.frames, path, job_id=job.id, note=recorder.note)

    strip = Image.open(path)
    # Latents 8 × 12 enlarged ×10 to 80 × 120 (128 px on the longer side at most).
    frames = job.steps_taken + 1
    assert strip.size == (frames * (80 + GAP) - GAP, NOTE_HEIGHT + LABEL_HEIGHT + 2 * 120 + GAP)
    pixels = np.asarray(strip.convert("L"))
    assert (pixels[:NOTE_HEIGHT] < 128).sum() > 100  # the note is drawn
    assert (pixels[NOTE_HEIGHT : NOTE_HEIGHT + LABEL_HEIGHT, :80] < 128).any()  # a label
    first_latents = np.asarray(strip)[NOTE_HEIGHT + LABEL_HEIGHT :][:120, :80]
    assert np.array_equal(first_latents[::10, ::10], np.asarray(recorder.frames[0].latents))
    assert recorder.note.startswith("approximate (linear latent->RGB")
    record = json.loads(strip.text[STRIP_TEXT_KEY])  # type: ignore[attr-defined]
    assert record["job_id"] == job.id
    assert record["note"] == recorder.note
    assert [step[0] for step in record["steps"]] == list(range(frames))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_without_x0_the_strip_has_one_row(tmp_path: Path) -> None:
    black = Image.new("RGB", (8, 12))
    frames = [Frame(index, 601.0 - 100 * index, black, None) for index in range(3)]

    write_strip(frames, tmp_path / "strip.png", job_id="abc", note="exact (VAE decode)")

    strip = Image.open(tmp_path / "strip.png")
    assert strip.size[1] == NOTE_HEIGHT + LABEL_HEIGHT + 120
    assert strip.size[0] >= 3 * (80 + GAP) - GAP


def test_a_strip_without_frames_or_an_unknown_mode_is_an_error(
    engine: Engine, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="took no denoising step"):
        write_strip([], tmp_path / "strip.png", job_id="abc", note="exact (VAE decode)")
    with pytest.raises(ValueError, match="unknown intermediates mode `fast`"):
        IntermediatesRecorder(engine, mode="fast")  # type: ignore[arg-type]
