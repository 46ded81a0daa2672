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

from batchgen.engine.schedulers import scheduler_spec

StepsMode = Literal["nominal", "effective"]


@dataclass(frozen=True)
class InitImage:
    """An init image on disk, identified by its bytes."""

    path: Path  # absolute
    label: str  # as the recipe names it, relative to the recipe's folder
    sha256: str
    width: int  # after EXIF orientation
    height: int
    # An alpha channel (from the header; it may still be all opaque): its transparent pixels
    # mark where the image is redrawn (inpainting).
    has_alpha: bool = False


def nominal_steps(steps: int, strength: float, mode: StepsMode) -> int:
    """The step count handed to the scheduler.

    In `nominal` mode that is `steps` as written. In `effective` mode it is the smallest count
    for which the denoiser takes exactly `steps` (IMG2IMG.md's 20 ÷ 0.4 = 50).
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
    # SDXL's second text encoder's prompts; "": the same as `prompt` / `negative_prompt`.
    prompt_2: str = ""
    negative_prompt_2: str = ""
    vae: str = ""  # identity of a VAE that replaces the model's own; "" for the model's
    model_name: str = field(default="", compare=False)  # short display name, not in the id
    # SDXL's refiner (A1111's "Refiner"): its identity, "" for none, and the fraction of the
    # noise schedule after which it takes over (diffusers' denoising_end / denoising_start).
    refiner: str = ""
    refiner_switch: float = 0.0
    refiner_label: str = field(default="", compare=False)  # A1111's "name [hash]"
    # Noise variations (InvokeAI -V / -v, A1111 "Variation seed"): the seed's noise is slerped
    # toward each (seed, amount)'s noise in turn: `with_variations` first, then the job's own.
    with_variations: tuple[tuple[int, float], ...] = ()
    variation_seed: int | None = None
    variation_amount: float = 0.0
    # Inpainting: a mask image (white or transparent: redraw); without one, the init image's
    # own transparent pixels. Blurred by `mask_blur` px; `invert_mask` swaps the regions.
    mask: InitImage | None = None
    mask_blur: int = 0
    invert_mask: bool = False
    # Feedback iterations (InvokeAI -n on img2img): the job whose image is this job's init.
    parent_id: str = ""
    iteration: int = 0  # 0: the chain's first job, from the init image itself
    # upscale_small + keep_size: width × height is the (upscaled) size rendered at, and the
    # image is scaled down to this size after.
    final_size: tuple[int, int] | None = None

    @property
    def steps_nominal(self) -> int:
        return nominal_steps(self.steps, self.strength, self.steps_mode)

    @property
    def steps_taken(self) -> int:
        return taken_steps(self.steps_nominal, self.strength)

    def pixel_fields(self) -> dict[str, object]:
        """Everything that determines the image, in canonical form."""
        fields: dict[str, object] = {
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
        # Only when used, so that a job without them has the same id in every version, whichever
        # fields a version adds.
        for name in ("prompt_2", "negative_prompt_2"):
            if getattr(self, name):
                fields[name] = getattr(self, name)
        if self.variations:
            fields["variations"] = [list(pair) for pair in self.variations]
        if self.inpaints:
            fields["mask"] = {
                "sha256": self.mask.sha256 if self.mask else "alpha",
                "blur": self.mask_blur,
                "invert": self.invert_mask,
            }
        if self.parent_id:
            fields["parent_id"] = self.parent_id
        if self.refiner:
            fields["refiner"] = {"model": self.refiner, "switch": float(self.refiner_switch)}
        if self.final_size:
            fields["final_size"] = list(self.final_size)
        return fields

    @property
    def variations(self) -> tuple[tuple[int, float], ...]:
        """Every (seed, amount) the noise is slerped toward, in order."""
        if self.variation_seed is None:
            return self.with_variations
        return (*self.with_variations, (self.variation_seed, self.variation_amount))

    @property
    def inpaints(self) -> bool:
        """Whether a mask may keep part of the image: a mask file, or an init image with
        an alpha channel (a fully opaque one then renders as plain img2img)."""
        return self.mask is not None or self.init_image.has_alpha

    @cached_property
    def id(self) -> str:
        canonical = _CANONICAL_JSON.encode(self.pixel_fields())
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


# What json.dumps(..., sort_keys=True, ensure_ascii=False) builds on every call: made once, as a
# recipe of 10,000 jobs makes 10,000 ids. Changing its output would change every job id.
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
