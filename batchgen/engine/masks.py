"""Inpainting masks: where a job redraws its init image and where it keeps it.

As IMG2IMG.md says, when an init image has transparent regions only those are redrawn, starting
from the colour under them (which `images.prepare` keeps). A mask file may say the same for
every init image: white (or, when it has transparency, transparent) is redrawn, black kept —
AUTOMATIC1111's convention for a plain mask, InvokeAI's for a transparent one.

With an ordinary UNet the engine redraws by latent blending: after every step the kept region
is put back, noised to the step's level, so the model paints the rest to fit around it; the
decoded image then gets the kept pixels back exactly (`composite`), with `mask_blur` pixels of
feathering at the edge.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from batchgen.engine.images import PreparedImage, has_alpha
from batchgen.jobs.job import InitImage, Job


def redraw_mask(job: Job, init: PreparedImage) -> np.ndarray | None:
    """Height × width floats in [0, 1], 1 where the job's image is redrawn; None when it is
    redrawn everywhere (no mask file and an opaque init image: plain img2img)."""
    size = init.rgb.size
    if job.mask is not None:
        mask = _mask_file(job.mask, size)
    elif init.alpha is not None:
        mask = ImageOps.invert(init.alpha)
    else:
        return None
    if job.invert_mask:
        mask = ImageOps.invert(mask)
    if job.mask_blur:
        mask = mask.filter(ImageFilter.GaussianBlur(job.mask_blur))
    return np.asarray(mask, dtype=np.float32) / 255


# One mask serves every job of a recipe. Keyed by its content hash, not its path: an edited
# mask file is read again by a process that runs the recipe again (see init_images.py).
@functools.lru_cache(maxsize=16)
def _mask_file(source: InitImage, size: tuple[int, int]) -> Image.Image:
    """The mask image as 8-bit "L", 255 = redraw, at the job's size."""
    with Image.open(source.path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    alpha = image.convert("RGBA").getchannel("A") if has_alpha(image) else None
    if alpha is not None and alpha.getextrema() != (255, 255):
        mask = ImageOps.invert(alpha)
    else:
        mask = image.convert("L")
    return mask.resize(size, Image.Resampling.BILINEAR) if mask.size != size else mask


def latent_mask(mask: np.ndarray, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mask at latent size, 1 × 1 × h × w: a latent is redrawn wherever any pixel under
    it is, so the model paints whole latents up to the edge (`composite` restores the kept
    pixels there)."""
    pixels = torch.from_numpy(mask)[None, None]
    return F.adaptive_max_pool2d(pixels, latent_size)


def composite(generated: np.ndarray, original: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The generated image (float RGB in [0, 1]) where the mask redraws, the original's
    pixels where it keeps, blended along the mask's feathered edge."""
    kept = np.asarray(original, dtype=np.float32) / 255
    weight = mask[..., None]
    return generated * weight + kept * (1 - weight)
