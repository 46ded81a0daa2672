"""The unit of work: one image to make, with everything that determines its pixels.

`Job` crosses every module (matrix → plan → engine → store), so it is plain, frozen data
without torch. Its `id` is a hash of the pixel-determining fields only: it does not depend on
the job's position in the matrix, the batch it runs in, or the output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

from batchgen.schedulers import scheduler_spec

StepsMode = Literal["nominal", "effective"]


@dataclass(frozen=True)
class InitImage:
    """An init image on disk, identified by its bytes."""

    path: Path  # absolute
    label: str  # as the recipe names it, relative to the recipe's folder
    sha256: str
    width: int  # after EXIF orientation
    height: int


def nominal_steps(steps: int, strength: float, mode: StepsMode) -> int:
    """The step count handed to the scheduler.

    In `nominal` mode that is `steps` as written. In `effective` mode it is the smallest count
    for which the denoiser takes exactly `steps` (the seed doc's 20 ÷ 0.4 = 50).
    """
    if mode == "nominal" or strength <= 0.0:
        return steps
    candidate = max(steps, math.ceil(steps / strength) - 1)
    while taken_steps(candidate, strength) < steps:
        candidate += 1
    return candidate


def taken_steps(nominal: int, strength: float) -> int:
    """Denoising steps actually run: diffusers' `get_timesteps` rule, int(steps × strength)."""
    return min(int(nominal * strength), nominal)


@dataclass(frozen=True)
class Job:
    index: int  # position in the recipe's matrix, for file names and display only
    init_image: InitImage
    prompt: str
    negative_prompt: str
    strength: float
    steps: int  # as written in the recipe
    steps_mode: StepsMode
    cfg: float
    seed: int
    scheduler: str  # as written: an InvokeAI name or a diffusers class name
    width: int  # output size, multiples of 8
    height: int
    fit: bool  # how width×height was chosen; the size itself is what the id records
    model: str  # model identity (see models.resolve_model)
    dtype: str  # "float32", "float16" or "bfloat16"
    clip_skip: int = 1  # A1111's convention: 1 uses CLIP's last layer, 2 the one before
    vae: str = ""  # identity of a VAE that replaces the model's own; "" for the model's
    model_name: str = field(default="", compare=False)  # short display name, not in the id

    @property
    def steps_nominal(self) -> int:
        return nominal_steps(self.steps, self.strength, self.steps_mode)

    @property
    def steps_taken(self) -> int:
        return taken_steps(self.steps_nominal, self.strength)

    def pixel_fields(self) -> dict[str, object]:
        """Everything that determines the image, in canonical form."""
        return {
            "model": self.model,
            "scheduler": scheduler_spec(self.scheduler).canonical,
            "init_image_sha256": self.init_image.sha256,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "strength": float(self.strength),
            "steps_nominal": self.steps_nominal,
            "cfg": float(self.cfg),
            "seed": int(self.seed),
            "width": self.width,
            "height": self.height,
            "dtype": self.dtype,
            "clip_skip": self.clip_skip,
            "vae": self.vae,
        }

    @cached_property
    def id(self) -> str:
        canonical = json.dumps(self.pixel_fields(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
