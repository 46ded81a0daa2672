"""A tiny SDXL-architecture pipeline with seeded random weights, built in about a second: what
the tests and the SDXL benchmark run the SDXL family on (issue 18). Not shipped: its pixels mean
nothing, only that batchgen's are diffusers'.

It has SDXL's whole structure at tiny widths: two CLIP text encoders of different widths (the
second with a projection, giving the pooled embedding), a UNet with `text_time` added
conditioning (pooled embedding + 6 time ids; a refiner's 5 with the aesthetic score), Euler
with SDXL's schedule, and builtin:tiny's trained VAE and tokenizer. Run as a script it writes
the folder: `python tools/tiny_sdxl.py OUT [--refiner] [--inpainting]`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from batchgen.models.source import BUILTIN_DIR

SEED = 0
TINY = BUILTIN_DIR / "tiny"
# Unequal widths, as SDXL's 768 and 1280: diffusers' single-file code tells the encoders apart
# by them.
WIDTHS = (32, 48)
TIME_EMBED_DIM = 8  # SDXL: 256 per time id


def _text_encoder(cls: type, width: int) -> torch.nn.Module:
    tokenizer_config = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    config = CLIPTextConfig(
        vocab_size=len(tokenizer_config),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,  # clip_skip 2 reaches the first layer's output
        num_attention_heads=4,
        max_position_embeddings=tokenizer_config.model_max_length,
        projection_dim=width,
        hidden_act="gelu",
        bos_token_id=tokenizer_config.bos_token_id,
        eos_token_id=tokenizer_config.eos_token_id,
        pad_token_id=tokenizer_config.pad_token_id,
    )
    model: torch.nn.Module = cls(config)
    return model


def tiny_sdxl(refiner: bool = False, inpainting: bool = False) -> StableDiffusionXLImg2ImgPipeline:
    """The pipeline, the same weights on every call with the same arguments."""
    torch.manual_seed(SEED)
    text_encoder = None if refiner else _text_encoder(CLIPTextModel, WIDTHS[0])
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, WIDTHS[1])
    time_ids = 5 if refiner else 6
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=WIDTHS[1] if refiner else sum(WIDTHS),
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=WIDTHS[1] + time_ids * TIME_EMBED_DIM,
        transformer_layers_per_block=(1, 2),
    )
    vae = AutoencoderKL.from_pretrained(TINY, subfolder="vae")
    vae.register_to_config(scaling_factor=0.13025)  # SDXL's, not builtin:tiny's SD value
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    tokenizer = CLIPTokenizer.from_pretrained(TINY, subfolder="tokenizer")
    pipeline = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=None if refiner else tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        requires_aesthetics_score=refiner,
        force_zeros_for_empty_prompt=not refiner,
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def write_tiny_sdxl(folder: Path, refiner: bool = False, inpainting: bool = False) -> Path:
    """The pipeline saved as a diffusers folder (safetensors), as `save_pretrained` writes it."""
    if folder.exists():
        shutil.rmtree(folder)
    tiny_sdxl(refiner, inpainting).save_pretrained(folder, safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--refiner", action="store_true")
    parser.add_argument("--inpainting", action="store_true")
    args = parser.parse_args()
    print(write_tiny_sdxl(args.output, args.refiner, args.inpainting))


if __name__ == "__main__":
    main()
