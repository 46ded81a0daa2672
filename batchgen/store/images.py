"""What an image file is called and what it carries: its name, AUTOMATIC1111's `parameters`
text, batchgen's own JSON record of the job, written as one atomic PNG.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from batchgen import __version__
from batchgen.engine.schedulers import scheduler_spec
from batchgen.jobs.job import Job
from batchgen.store.files import PNG_COMPRESS_LEVEL, write_png_atomically

SLUG_MAX_LENGTH = 40

# ---------------------------------------------------------------------------------------------
# Images: names, metadata, writing


@functools.lru_cache(maxsize=4096)  # a sweep repeats a few prompts and init names many times
def _slug(text: str) -> str:
    """Lowercase ASCII words joined by '-', whole words up to SLUG_MAX_LENGTH; may be ''."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    if not words:
        return ""
    slug = words[0][:SLUG_MAX_LENGTH]
    for word in words[1:]:
        if len(slug) + 1 + len(word) > SLUG_MAX_LENGTH:
            break
        slug += f"-{word}"
    return slug


def image_filename(job: Job, index_width: int) -> str:
    """`<index>-<init>-<prompt-slug>-f<strength>-s<steps>-S<seed>[-V<variation seed>]
    [-n<iteration>].png`, e.g.
    `0003-fire-drawing-cheery-open-fire-photograph-f0.40-s10-S1592514025.png`.

    Only `[a-zA-Z0-9.-]`. The zero-padded index makes the name unique within a run; the rest is
    there for people browsing the folder.
    """
    init = _slug(job.init_image.path.stem) or "init"
    prompt = _slug(job.prompt) or ("prompt" if job.prompt.strip() else "empty")
    variation = f"-V{job.variation_seed}" if job.variation_seed is not None else ""
    iteration = f"-n{job.iteration}" if job.iteration else ""
    return (
        f"{job.index:0{index_width}d}-{init}-{prompt}"
        f"-f{job.strength:.2f}-s{job.steps}-S{job.seed}{variation}{iteration}.png"
    )


def _a1111_quote(value: object) -> str:
    """AUTOMATIC1111's `quote()`: JSON-quote a value only when it would break the line."""
    text = str(value)
    if any(special in text for special in (",", ":", "\n")):
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(
    job: Job, model_name: str, model_hash: str, vae_name: str = "", vae_hash: str = ""
) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs (its `create_infotext`).

    Prompt line, `Negative prompt:` line when there is one, then the settings in A1111's key
    order. `Steps` is the count handed to the scheduler, as in A1111 img2img (which also runs
    only `steps × strength` of them). Empty names and hashes (no `vae:` override: the model's
    own VAE) are left out, as A1111 leaves out settings it does not have.
    """
    scheduler = scheduler_spec(job.scheduler)
    settings: dict[str, object] = {
        "Steps": job.steps_nominal,
        "Sampler": scheduler.a1111_name,
        "Schedule type": scheduler.schedule_type,
        "CFG scale": float(job.cfg),
        "Seed": int(job.seed),
        "Size": f"{job.width}x{job.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": job.variation_seed if job.variation_seed is not None else "",
        "Variation seed strength": job.variation_amount if job.variation_seed is not None else "",
        "Denoising strength": float(job.strength),
        "Clip skip": job.clip_skip if job.clip_skip > 1 else "",
        "Refiner": job.refiner_label if job.refiner else "",
        "Refiner switch at": float(job.refiner_switch) if job.refiner else "",
        "Version": f"batchgen {__version__}",
    }
    settings_line = ", ".join(
        f"{key}: {_a1111_quote(value)}" for key, value in settings.items() if value != ""
    )
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    return f"{job.prompt}{negative}\n{settings_line}".strip()


def job_record(job: Job) -> dict[str, Any]:
    """The job as flat JSON-able data: what the PNG's `batchgen` chunk holds, and the
    job's share of its manifest row (the keys named like manifest columns)."""
    return {
        "id": job.id,
        "index": job.index,
        "init_image": job.init_image.label,
        "init_image_sha256": job.init_image.sha256,
        "init_image_width": job.init_image.width,
        "init_image_height": job.init_image.height,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "prompt_2": job.prompt_2,
        "negative_prompt_2": job.negative_prompt_2,
        "strength": float(job.strength),
        "steps": job.steps,
        "steps_mode": job.steps_mode,
        "steps_nominal": job.steps_nominal,
        "steps_taken": job.steps_taken,
        "cfg": float(job.cfg),
        "seed": int(job.seed),
        "scheduler": job.scheduler,
        "clip_skip": job.clip_skip,
        "width": (job.final_size or (job.width, job.height))[0],  # the image's size
        "height": (job.final_size or (job.width, job.height))[1],
        "fit": job.fit,
        "render_size": f"{job.width}x{job.height}" if job.final_size else "",
        "model": job.model,
        "vae": job.vae,
        "refiner": job.refiner,
        "refiner_switch": float(job.refiner_switch),
        "refiner_name": job.refiner_label,
        "model_name": job.model_name,
        "dtype": job.dtype,
        "variation_seed": job.variation_seed if job.variation_seed is not None else -1,
        "variation_strength": float(job.variation_amount),
        "with_variations": format_variations(job.with_variations),
        "parent_id": job.parent_id,
        "iteration": job.iteration,
        "mask": mask_label(job),
        "mask_blur": job.mask_blur if job.inpaints else 0,
        "invert_mask": job.invert_mask if job.inpaints else False,
        "batchgen_version": __version__,
    }


def format_variations(pairs: tuple[tuple[int, float], ...]) -> str:
    """InvokeAI's -V text: `seed:amount,seed:amount`."""
    return ",".join(f"{seed}:{amount:g}" for seed, amount in pairs)


def mask_label(job: Job) -> str:
    """The mask file as the recipe names it, `alpha` for the init image's transparency, or
    "" when nothing is masked."""
    if job.mask is not None:
        return job.mask.label
    return "alpha" if job.init_image.has_alpha else ""


def write_image(
    image: Image.Image,
    path: Path,
    job: Job,
    parameters: str,
    made_with: Mapping[str, object] | None = None,
    compress_level: int = PNG_COMPRESS_LEVEL,
) -> str:
    """Write `image` as a PNG carrying `parameters` (A1111) and `batchgen` (the job record,
    plus `made_with`: the device and batch size, which a run adopting the image after a kill
    reads back) text chunks, atomically; return the sha256 of the file's bytes.

    Deterministic: the same pixels and texts give the same bytes (no timestamp chunk).
    Text that is not Latin-1 goes into an iTXt chunk (Pillow's choice), which A1111 reads too.
    """
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("batchgen", json.dumps(job_record(job) | dict(made_with or {})))
    return hashlib.sha256(write_png_atomically(image, path, info, compress_level)).hexdigest()
