"""Intermediates: what the latents look like at every step of a job, as one labelled PNG strip
(IMG2IMG.md's "latent steps" pictures).

`IntermediatesRecorder` is the engine's per-step hook: it turns each `StepState` into a frame,
either approximately (a linear latent→RGB projection: free, one pixel per latent pixel) or
exactly (a VAE decode per frame: full size, one decode each). `write_strip` lays the frames
out. No torch import here: tensors arrive from the engine and leave as numpy arrays.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from batchgen.store.files import write_png_atomically

if TYPE_CHECKING:
    import torch

    from batchgen.engine.denoise import StepState
    from batchgen.engine.families.base import LatentFormat
    from batchgen.engine.img2img import Engine

Mode = Literal["approximate", "exact"]
MODES: tuple[Mode, ...] = ("approximate", "exact")
STRIP_TEXT_KEY = "batchgen-intermediates"  # the PNG text chunk: job id, note, frames


def approximate_rgb(latents: torch.Tensor, latent_format: LatentFormat) -> Image.Image:
    """The first latents of a batch as RGB, one pixel per latent pixel, without the VAE: the
    family's latent→RGB factors (colours in [-1, 1]) applied to each latent pixel."""
    channels_last = latents[0].detach().float().cpu().numpy().transpose(1, 2, 0)
    return _to_8bit(channels_last @ np.array(latent_format.latent_rgb_factors))


def _to_8bit(rgb: np.ndarray) -> Image.Image:
    """[-1, 1] colours to an 8-bit image, rounded as diffusers' image processor rounds."""
    unit = np.clip(rgb / 2 + 0.5, 0.0, 1.0)
    return Image.fromarray(np.round(unit * 255).astype(np.uint8))


@dataclass(frozen=True)
class Frame:
    """One step's pictures: approximate ones are latent-sized, exact ones image-sized."""

    index: int  # StepState.index: 0 is the noised init, before any step
    timestep: float
    latents: Image.Image
    predicted_x0: Image.Image | None  # None at index 0, or when not asked for


class IntermediatesRecorder:
    """A per-step hook for `Engine.render` that keeps one `Frame` per `StepState`.

    `approximate` projects latents to colour with `projection` (SD 1.x's unless fitted);
    `exact` decodes each through the engine's VAE. `x0` adds the predicted clean image.
    One recorder per job: `frames` accumulates.
    """

    def __init__(
        self,
        engine: Engine,
        mode: Mode = "approximate",
        x0: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown intermediates mode `{mode}`; use {' or '.join(MODES)}")
        self.engine = engine
        self.mode = mode
        self.x0 = x0
        self.latent_format = engine.family.latent_format
        self.frames: list[Frame] = []

    @property
    def note(self) -> str:
        """What made the frames' colours, for the strip's note."""
        if self.mode == "exact":
            return "exact (VAE decode)"
        # "->", not an arrow: Pillow's built-in font has no glyph for "→".
        return f"approximate (linear latent->RGB, {self.latent_format.latent_rgb_source})"

    def __call__(self, state: StepState) -> None:
        predicted_x0 = state.predicted_x0 if self.x0 else None
        self.frames.append(
            Frame(
                state.index,
                state.timestep,
                self._picture(state.latents),
                None if predicted_x0 is None else self._picture(predicted_x0),
            )
        )

    def _picture(self, latents: torch.Tensor) -> Image.Image:
        if self.mode == "exact":
            return self.engine.decode_latents_exact(latents)
        return approximate_rgb(latents, self.latent_format)


# The strip's layout, in pixels.
GAP = 2  # between frames and between rows
PAD = 3  # text from the edges of its band
FONT_SIZE = 10
NOTE_HEIGHT = 16  # the note band on top
LABEL_HEIGHT = 14  # the step labels under it


def write_strip(
    frames: Sequence[Frame], path: Path, *, job_id: str, note: str, cell_px: int = 128
) -> None:
    """One PNG: `note` on top, then each frame's `index t=timestep` label, the frames left to
    right, and a row of predicted x0 below when any frame has one. Frames are enlarged by a
    whole factor (NEAREST, latent pixels stay sharp) up to `cell_px` on their longer side, or
    shrunk to it. Written atomically, with a text chunk naming the job and the note."""
    if not frames:
        raise ValueError(f"job {job_id} has no intermediates: it took no denoising step")
    latent_cells = [_cell(frame.latents, cell_px) for frame in frames]
    x0_cells = [
        None if frame.predicted_x0 is None else _cell(frame.predicted_x0, cell_px)
        for frame in frames
    ]
    rows = 2 if any(cell is not None for cell in x0_cells) else 1
    heading = note if rows == 1 else f"{note} · top: latents, bottom: predicted x0"

    font = ImageFont.load_default(size=FONT_SIZE)
    cell_width, cell_height = latent_cells[0].size
    frames_width = len(frames) * (cell_width + GAP) - GAP
    note_width = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(heading, font=font))
    strip = Image.new(
        "RGB",
        (
            max(frames_width, note_width + 2 * PAD),
            NOTE_HEIGHT + LABEL_HEIGHT + rows * (cell_height + GAP) - GAP,
        ),
        "white",
    )
    draw = ImageDraw.Draw(strip)
    draw.text((PAD, PAD), heading, fill="black", font=font)
    top = NOTE_HEIGHT + LABEL_HEIGHT
    for column, (frame, latent_cell, x0_cell) in enumerate(
        zip(frames, latent_cells, x0_cells, strict=True)
    ):
        left = column * (cell_width + GAP)
        draw.text((left + 1, NOTE_HEIGHT), _label(frame), fill="black", font=font)
        strip.paste(latent_cell, (left, top))
        if x0_cell is not None:
            strip.paste(x0_cell, (left, top + cell_height + GAP))

    info = PngInfo()
    steps = [[frame.index, frame.timestep] for frame in frames]
    info.add_text(STRIP_TEXT_KEY, json.dumps({"job_id": job_id, "note": note, "steps": steps}))
    write_png_atomically(strip, path, info)


def _cell(picture: Image.Image, cell_px: int) -> Image.Image:
    longer = max(picture.size)
    if longer <= cell_px:
        factor = cell_px // longer
        return picture.resize(
            (picture.width * factor, picture.height * factor), Image.Resampling.NEAREST
        )
    return picture.resize(
        (max(1, picture.width * cell_px // longer), max(1, picture.height * cell_px // longer)),
        Image.Resampling.LANCZOS,
    )


def _label(frame: Frame) -> str:
    # Whole timesteps as such; Karras sigmas and DPM2's midpoints fall in between.
    timestep = f"{frame.timestep:.0f}" if frame.timestep.is_integer() else f"{frame.timestep:.1f}"
    return f"{frame.index} t={timestep}"
