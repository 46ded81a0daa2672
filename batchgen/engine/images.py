"""Init images: reading headers cheaply, choosing the output size, preparing the pixels.

Torch-free: `validate` and `plan` use the header functions; the engine uses `prepare`.
The prepared image is fully determined by the file's bytes and the output size, which is why
the job id records the size and the file's hash, not `fit`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from batchgen.errors import BatchgenError

# Beyond this many pixels an init image is refused before decoding (decompression bombs).
MAX_INIT_PIXELS = 64 * 1024 * 1024
# IMG2IMG.md: img2img "does not work properly on initial images smaller than 512x512".
SMALL_IMAGE_SIDE = 512
LATENT_FACTOR = 8  # SD's VAE downsamples 8×; sizes must be multiples of it

# EXIF orientations that turn the picture a quarter turn, swapping width and height.
_QUARTER_TURNS = {5, 6, 7, 8}


class InitImageError(BatchgenError):
    """An init image that cannot be read, or is too large to be one."""


@dataclass(frozen=True)
class ImageHeader:
    width: int  # as displayed, after EXIF orientation
    height: int
    sha256: str
    has_alpha: bool  # an alpha channel or a transparent palette colour (maybe all opaque)


def read_header(path: Path) -> ImageHeader:
    """Size (EXIF-oriented) and content hash, without decoding the pixels."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InitImageError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
            transparent = has_alpha(image)
    except Image.DecompressionBombError:
        raise InitImageError(
            f"{path} is over the limit of {MAX_INIT_PIXELS:,} pixels (a decompression bomb?); "
            "downscale it first"
        ) from None
    except (OSError, SyntaxError) as error:
        raise InitImageError(f"{path} is not an image Pillow can read ({error})") from error
    if width * height > MAX_INIT_PIXELS:
        raise InitImageError(
            f"{path} is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{MAX_INIT_PIXELS:,}; downscale it first"
        )
    if orientation in _QUARTER_TURNS:
        width, height = height, width
    return ImageHeader(width, height, hashlib.sha256(data).hexdigest(), transparent)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def _round_down(value: float) -> int:
    return max(LATENT_FACTOR, int(value) // LATENT_FACTOR * LATENT_FACTOR)


def output_size(
    source: tuple[int, int], width: int | None, height: int | None, fit: bool
) -> tuple[int, int]:
    """The size a job renders at, in multiples of 8.

    No width/height: the init image's own size. One of them: the other follows the aspect.
    Both: exactly that size (stretched), or with `fit` the image downscaled to fit inside the
    box keeping its aspect (InvokeAI `--fit`); fit never upscales.
    """
    src_w, src_h = source
    if width is None and height is None:
        return _round_down(src_w), _round_down(src_h)
    if width is None:
        assert height is not None
        return _round_down(src_w * height / src_h), _round_down(height)
    if height is None:
        return _round_down(width), _round_down(src_h * width / src_w)
    if not fit:
        return _round_down(width), _round_down(height)
    scale = min(width / src_w, height / src_h, 1.0)
    return _round_down(src_w * scale), _round_down(src_h * scale)


def upscaled_size(size: tuple[int, int], native_side: int) -> tuple[int, int]:
    """`size` scaled up, keeping its aspect, until its shorter side reaches `native_side`
    (multiples of 8, rounded up); unchanged when it is that large already."""
    width, height = size
    if min(width, height) >= native_side:
        return size
    scale = native_side / min(width, height)
    # The shorter side lands on native_side exactly; 1e-9 keeps float error from adding 8.
    width, height = (
        math.ceil(side * scale / LATENT_FACTOR - 1e-9) * LATENT_FACTOR for side in (width, height)
    )
    return width, height


@dataclass(frozen=True)
class PreparedImage:
    rgb: Image.Image  # exactly the job's size
    alpha: Image.Image | None  # kept for transparent-region inpainting; None when opaque


def prepare(path: Path, size: tuple[int, int]) -> PreparedImage:
    """Decode, apply EXIF orientation, split off alpha, resize to the job's size."""
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    if has_alpha(image):
        image = image.convert("RGBA")
        # The colour under transparent pixels is kept: it is the starting point there.
        rgb, alpha = image.convert("RGB"), image.getchannel("A")
    else:
        rgb, alpha = image.convert("RGB"), None
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
        alpha = alpha.resize(size, Image.Resampling.LANCZOS) if alpha else None
    if alpha is not None and alpha.getextrema() == (255, 255):
        alpha = None
    return PreparedImage(rgb, alpha)
