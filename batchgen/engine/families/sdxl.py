"""Stable Diffusion XL, base and refiner: two CLIP text encoders (the refiner keeps only the
second), a UNet conditioned on their concatenated penultimate hidden states plus a pooled text
embedding and "micro-conditioning" time ids, and SD's 4-channel latents at its own scaling.
Registered in models/families.py; its components load through sdxl_loading.py.

What `StableDiffusionXLImg2ImgPipeline` does by default is done here: `original_size` and
`target_size` are the render size, `crops_coords_top_left` is (0, 0), a refiner's time ids
carry aesthetic scores (6.0, and 2.5 for the negative half), and an empty negative prompt is
zeros where the model says `force_zeros_for_empty_prompt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch

from batchgen.engine.families.base import LatentFormat, PromptEmbedding, PromptText
from batchgen.engine.families.sdxl_loading import XLComponents, load_xl_components
from batchgen.models.source import INPAINTING_CHANNELS, ModelSource

# The pipeline's defaults for a refiner (`requires_aesthetics_score`), as in SDXL's paper.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
# SDXL's VAE has a latent space of its own (not SD 1.x's): the factors of ComfyUI's
# `latent_formats.SDXL`, which its previews use.
LATENT_RGB_FACTORS = (
    # R       G        B
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)


@dataclass(frozen=True)
class XLConditioning:
    """A batch's conditioning: what SDXL's UNet takes besides its latents and timestep."""

    hidden_states: torch.Tensor  # batch × 77 × (768 + 1280): both encoders' penultimate layers
    pooled: torch.Tensor  # batch × 1280: the second encoder's projected end-of-text embedding
    time_ids: torch.Tensor  # batch × 6 (base) or × 5 (refiner): sizes, crop, aesthetic score


class StableDiffusionXL:
    """The tokenizers, text encoders, VAE and UNet of one SDXL model (base or refiner)."""

    def __init__(self, parts: XLComponents, device: str) -> None:
        self.tokenizers, self.text_encoders = parts.tokenizers, parts.text_encoders
        self.vae = parts.vae
        self.denoiser = parts.unet
        self.scheduler_config = parts.scheduler_config
        self.force_zeros_for_empty_prompt = parts.force_zeros_for_empty_prompt
        self.requires_aesthetics_score = parts.requires_aesthetics_score
        self.device = device
        self.latent_format = LatentFormat.of_vae(parts.vae, LATENT_RGB_FACTORS, "SDXL factors")
        self.inpainting = parts.unet.config.in_channels == INPAINTING_CHANNELS

    @classmethod
    def load(
        cls,
        source: ModelSource,
        torch_dtype: torch.dtype,
        device: str,
        *,
        vae: ModelSource | None = None,
        variant: str | None = None,
        offload: bool = False,
    ) -> Self:
        parts = load_xl_components(
            source, torch_dtype, device, vae=vae, variant=variant, offload=offload
        )
        return cls(parts, device)

    @property
    def text_dtype(self) -> torch.dtype:
        """The pipeline casts the embeddings to the last text encoder's dtype."""
        dtype: torch.dtype = self.text_encoders[-1].dtype
        return dtype

    def encode_prompt(self, prompt: PromptText, clip_skip: int = 1) -> PromptEmbedding:
        """Each encoder's hidden states `clip_skip` layers before the last (A1111's 1: the
        penultimate layer, SDXL's own; diffusers' `clip_skip` is this minus 1), without the
        final layer norm, concatenated; the pooled embedding is the last encoder's projection.
        The first encoder reads `text`, the second `text_2` (or `text`); a refiner, with the
        second encoder only, reads `text`, as the pipeline's pairing of prompts and encoders
        does."""
        texts = [prompt.text, prompt.text_2 or prompt.text][: len(self.text_encoders)]
        hidden_states, pooled = [], None
        for text, tokenizer, text_encoder in zip(
            texts, self.tokenizers, self.text_encoders, strict=True
        ):
            input_ids = tokenizer(
                text,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            output = text_encoder(input_ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-(clip_skip + 1)])
            pooled = getattr(output, "text_embeds", None)  # only the projecting encoder's
        if pooled is None:
            raise ValueError("SDXL's last text encoder must be a CLIPTextModelWithProjection")
        embedding = PromptEmbedding(
            torch.cat(hidden_states, dim=-1).to(self.text_dtype), pooled.to(self.text_dtype)
        )
        empty_negative = prompt.negative and not (prompt.text or prompt.text_2)
        if empty_negative and self.force_zeros_for_empty_prompt:
            return PromptEmbedding(
                torch.zeros_like(embedding.hidden_states), torch.zeros_like(pooled)
            )
        return embedding

    def time_ids(self, size: tuple[int, int], negative: bool) -> torch.Tensor:
        """The micro-conditioning of one image of `size` (width, height), 1 × 5 or 6:
        (height, width) as original size, crop (0, 0), then the target size or, for a
        refiner, the aesthetic score."""
        width, height = size
        tail: tuple[float, ...] = (height, width)
        if self.requires_aesthetics_score:
            tail = (NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE,)
        return torch.tensor([[height, width, 0, 0, *tail]], dtype=self.text_dtype)

    def conditioning(
        self,
        embeddings: Sequence[PromptEmbedding],
        negatives: Sequence[PromptEmbedding] | None,
        size: tuple[int, int],
    ) -> XLConditioning:
        halves = [(negatives, True)] if negatives is not None else []
        halves.append((embeddings, False))
        parts = [(embedding, negative) for half, negative in halves for embedding in half]
        pooled = [embedding.pooled for embedding, _ in parts]
        return XLConditioning(
            hidden_states=torch.cat([embedding.hidden_states for embedding, _ in parts]),
            pooled=torch.cat([p for p in pooled if p is not None]),
            time_ids=torch.cat([self.time_ids(size, negative) for _, negative in parts]).to(
                self.device
            ),
        )

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: XLConditioning
    ) -> torch.Tensor:
        added: dict[str, Any] = {
            "text_embeds": conditioning.pooled,
            "time_ids": conditioning.time_ids,
        }
        return self.denoiser(
            sample,
            timestep,
            encoder_hidden_states=conditioning.hidden_states,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
