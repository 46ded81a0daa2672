"""Loading an SDXL model's components onto a device: from a diffusers folder (base, refiner or
inpainting) or from one original-layout checkpoint file, converted by diffusers' own
single-file code with the shipped configs (`builtin/configs/sdxl-base`, `sdxl-refiner`), so
that nothing is asked of the hub. The rules of sd_loading.py hold: fixed classes, no pickled
code."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from batchgen.engine.families.base import place
from batchgen.engine.families.sd_loading import (
    UNet,
    Vae,
    converting,
    load_tokenizer,
    load_vae,
    positions,
    read_checkpoint,
    scheduler_config,
    weights_options,
)
from batchgen.models.families import PIPELINE_INDEX
from batchgen.models.source import ModelSource

# Each text encoder's subfolder and class; a refiner has only the second.
TEXT_ENCODERS = (
    ("text_encoder", CLIPTextModel),
    ("text_encoder_2", CLIPTextModelWithProjection),
)


@dataclass
class XLComponents:
    tokenizers: list[CLIPTokenizer]  # one per text encoder, in the same order
    text_encoders: list[Any]  # CLIPTextModel (base only), then CLIPTextModelWithProjection
    vae: Vae
    unet: UNet
    scheduler_config: dict[str, Any]
    # The pipeline's registered options, from model_index.json.
    force_zeros_for_empty_prompt: bool
    requires_aesthetics_score: bool


def load_xl_components(
    source: ModelSource,
    torch_dtype: torch.dtype,
    device: str,
    *,
    vae: ModelSource | None = None,
    variant: str | None = None,
    offload: bool = False,
) -> XLComponents:
    """The model's components in `torch_dtype` on `device`, eval mode, no gradients. SDXL's
    VAE overflows in float16: where its config says `force_upcast`, it stays in float32 (as
    the pipeline runs it) and the engine casts at its boundaries."""
    folder = source.config or source.path
    if source.kind == "single_file":
        checkpoint = read_checkpoint(source.path)
        parts = _components_from_checkpoint(checkpoint, source.path, folder, torch_dtype)
        del checkpoint
    else:
        parts = _components_from_folder(folder, torch_dtype, variant)
    if vae is not None:
        parts.vae = load_vae(vae, torch_dtype, base_config=folder)
    if torch_dtype == torch.float16 and parts.vae.config.force_upcast:
        parts.vae.to(torch.float32)
    place((*parts.text_encoders, parts.unet, parts.vae), device, offload)
    return parts


def _present_encoders(folder: Path) -> list[tuple[str, Any]]:
    return [(name, cls) for name, cls in TEXT_ENCODERS if (folder / name).is_dir()]


def _pipeline_options(folder: Path) -> dict[str, bool]:
    index = json.loads((folder / PIPELINE_INDEX).read_text(encoding="utf-8"))
    return {
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
        "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False)),
    }


def _tokenizers(folder: Path, text_encoders: list[Any], names: list[str]) -> list[CLIPTokenizer]:
    return [
        load_tokenizer(folder, name.replace("text_encoder", "tokenizer"), positions(encoder))
        for name, encoder in zip(names, text_encoders, strict=True)
    ]


def _components_from_folder(
    folder: Path, torch_dtype: torch.dtype, variant: str | None
) -> XLComponents:
    encoders = _present_encoders(folder)
    text_encoders = [
        cls.from_pretrained(
            folder, subfolder=name, **weights_options(folder / name, torch_dtype, variant)
        )
        for name, cls in encoders
    ]
    return XLComponents(
        tokenizers=_tokenizers(folder, text_encoders, [name for name, _ in encoders]),
        text_encoders=text_encoders,
        vae=AutoencoderKL.from_pretrained(
            folder, subfolder="vae", **weights_options(folder / "vae", torch_dtype, variant)
        ),
        unet=UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", **weights_options(folder / "unet", torch_dtype, variant)
        ),
        scheduler_config=scheduler_config(folder),
        **_pipeline_options(folder),
    )


def _components_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], path: Path, config: Path, torch_dtype: torch.dtype
) -> XLComponents:
    """What `StableDiffusionXLImg2ImgPipeline.from_single_file(path, config=config)` runs per
    component, on the state dict read safely, with `config` a local diffusers folder."""
    options: dict[str, Any] = {
        "config": str(config),
        "local_files_only": True,
        "torch_dtype": torch_dtype,
    }
    with converting("unet", path, config):
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **options)
    with converting("vae", path, config):
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **options)
    encoders = _present_encoders(config)
    text_encoders = []
    for name, cls in encoders:
        with converting(name, path, config):
            text_encoders.append(
                create_diffusers_clip_model_from_ldm(cls, checkpoint, subfolder=name, **options)
            )
    return XLComponents(
        tokenizers=_tokenizers(config, text_encoders, [name for name, _ in encoders]),
        text_encoders=text_encoders,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config(config),
        **_pipeline_options(config),
    )
