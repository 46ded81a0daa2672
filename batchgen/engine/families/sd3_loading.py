"""Loading a Stable Diffusion 3 / 3.5 model's components onto a device, from a diffusers folder
(or a hub snapshot in the local cache): two CLIP text encoders with projections, T5-XXL (which
a folder may leave out: the pipeline then conditions on zeros in its place), the MMDiT
transformer and the 16-channel VAE. The rules of sd_loading.py hold: fixed classes, local
files only, no pickled code."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5Tokenizer

from batchgen.engine.families.base import place
from batchgen.engine.families.sd_loading import (
    Vae,
    load_tokenizer,
    load_vae,
    positions,
    scheduler_config,
    weights_options,
)
from batchgen.models.source import ModelSource

CLIP_ENCODERS = ("text_encoder", "text_encoder_2")
T5_ENCODER = "text_encoder_3"


@dataclass
class SD3Components:
    clip_tokenizers: list[Any]  # CLIP-L's and OpenCLIP bigG's
    clip_encoders: list[Any]  # CLIPTextModelWithProjection, each
    t5_tokenizer: Any | None  # None with T5 left out of the folder
    t5_encoder: Any | None
    vae: Vae
    transformer: Any  # SD3Transformer2DModel
    scheduler_config: dict[str, Any]


def load_sd3_components(
    source: ModelSource,
    torch_dtype: torch.dtype,
    device: str,
    *,
    vae: ModelSource | None = None,
    variant: str | None = None,
    offload: bool = False,
) -> SD3Components:
    """The model's components in `torch_dtype` on `device`, eval mode, no gradients (with
    `offload`, in CPU memory until each runs)."""
    if source.kind == "single_file":
        raise ValueError(
            f"{source.path}: SD 3 single files are not supported yet; use a diffusers folder"
        )
    folder = source.path

    def load(cls: Any, subfolder: str) -> Any:
        options = weights_options(folder / subfolder, torch_dtype, variant)
        return cls.from_pretrained(folder, subfolder=subfolder, **options)

    clip_encoders = [load(CLIPTextModelWithProjection, name) for name in CLIP_ENCODERS]
    has_t5 = (folder / T5_ENCODER).is_dir()
    parts = SD3Components(
        clip_tokenizers=[
            load_tokenizer(folder, name.replace("text_encoder", "tokenizer"), positions(encoder))
            for name, encoder in zip(CLIP_ENCODERS, clip_encoders, strict=True)
        ],
        clip_encoders=clip_encoders,
        t5_tokenizer=_t5_tokenizer(folder) if has_t5 else None,
        t5_encoder=load(T5EncoderModel, T5_ENCODER) if has_t5 else None,
        vae=load(AutoencoderKL, "vae"),
        transformer=load(SD3Transformer2DModel, "transformer"),
        scheduler_config=scheduler_config(folder),
    )
    if vae is not None:
        parts.vae = load_vae(vae, torch_dtype, base_config=folder)
    encoders = [*parts.clip_encoders, *filter(None, [parts.t5_encoder])]
    place((*encoders, parts.transformer, parts.vae), device, offload)
    return parts


def _t5_tokenizer(folder: Path) -> Any:
    return T5Tokenizer.from_pretrained(folder, subfolder="tokenizer_3", local_files_only=True)
