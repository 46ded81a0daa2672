"""Stable Diffusion 3 and 3.5: three text encoders (CLIP-L and OpenCLIP bigG, whose penultimate
hidden states are concatenated and zero-padded to T5's width, then T5-XXL's tokens after them
along the sequence; the two CLIP projections concatenated as the pooled embedding), an MMDiT
transformer over 16-channel latents, and flow matching. Registered in models/families.py; its
components load through sd3_loading.py.

What `StableDiffusion3Img2ImgPipeline` does by default is done here: T5 reads at most
`max_sequence_length` 256 tokens, a folder without T5 conditions on zeros in its place, an
empty negative prompt is encoded like any other, and the transformer is given the
scheduler's timestep (σ × 1000) as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
import torch.nn.functional as F

from batchgen.engine.families.base import LatentFormat, PromptEmbedding, PromptText
from batchgen.engine.families.sd3_loading import SD3Components, load_sd3_components
from batchgen.models.source import ModelSource

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default for T5
# SD3's latent space: the factors of ComfyUI's `latent_formats.SD3`, which its previews use.
LATENT_RGB_FACTORS = (
    # R       G        B
    (-0.0645, 0.0177, 0.1052),
    (0.0028, 0.0312, 0.0650),
    (0.1848, 0.0762, 0.0360),
    (0.0944, 0.0360, 0.0889),
    (0.0897, 0.0506, -0.0364),
    (-0.0020, 0.1203, 0.0284),
    (0.0855, 0.0118, 0.0283),
    (-0.0539, 0.0658, 0.1047),
    (-0.0057, 0.0116, 0.0700),
    (-0.0412, 0.0281, -0.0039),
    (0.1106, 0.1171, 0.1220),
    (-0.0248, 0.0682, -0.0481),
    (0.0815, 0.0846, 0.1207),
    (-0.0120, -0.0055, -0.0867),
    (-0.0749, -0.0634, -0.0456),
    (-0.1418, -0.1457, -0.1259),
)


@dataclass(frozen=True)
class SD3Conditioning:
    """A batch's conditioning: what the transformer takes besides its latents and timestep."""

    hidden_states: torch.Tensor  # batch × (77 + 256) × T5's width
    pooled: torch.Tensor  # batch × (768 + 1280): both CLIP projections


class StableDiffusion3:
    """The tokenizers, text encoders, VAE and transformer of one SD 3 / 3.5 model."""

    inpainting = False  # no SD 3 inpainting transformer is loaded as one: kept regions blend

    def __init__(self, parts: SD3Components, device: str) -> None:
        self.parts = parts
        self.text_encoders = [*parts.clip_encoders, *filter(None, [parts.t5_encoder])]
        self.vae = parts.vae
        self.denoiser = parts.transformer
        self.scheduler_config = parts.scheduler_config
        self.device = device
        self.latent_format = LatentFormat.of_vae(parts.vae, LATENT_RGB_FACTORS, "SD3 factors")

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
        parts = load_sd3_components(
            source, torch_dtype, device, vae=vae, variant=variant, offload=offload
        )
        return cls(parts, device)

    def encode_prompt(self, prompt: PromptText, clip_skip: int = 1) -> PromptEmbedding:
        """CLIP-L reads `text`, bigG `text_2` (or `text`), T5 `text`; each CLIP encoder's hidden
        states `clip_skip` layers before its last (A1111's 1: the penultimate, SD3's own)."""
        hidden_states, pooled = [], []
        texts = (prompt.text, prompt.text_2 or prompt.text)
        for text, tokenizer, encoder in zip(
            texts, self.parts.clip_tokenizers, self.parts.clip_encoders, strict=True
        ):
            output = encoder(
                self._ids(tokenizer, text, tokenizer.model_max_length), output_hidden_states=True
            )
            hidden_states.append(output.hidden_states[-(clip_skip + 1)])
            pooled.append(output.text_embeds)
        clip_dtype = self.parts.clip_encoders[0].dtype
        clip = torch.cat(hidden_states, dim=-1).to(clip_dtype)
        t5 = self._t5_embeddings(prompt.text)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return PromptEmbedding(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))

    def _ids(self, tokenizer: Any, text: str, length: int) -> torch.Tensor:
        ids: torch.Tensor = tokenizer(
            text, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def _t5_embeddings(self, text: str) -> torch.Tensor:
        encoder = self.parts.t5_encoder
        if encoder is None:
            width = self.denoiser.config.joint_attention_dim
            dtype = self.parts.clip_encoders[0].dtype
            return torch.zeros((1, MAX_SEQUENCE_LENGTH, width), device=self.device, dtype=dtype)
        ids = self._ids(self.parts.t5_tokenizer, text, MAX_SEQUENCE_LENGTH)
        embeddings: torch.Tensor = encoder(ids)[0]
        return embeddings.to(encoder.dtype)

    def conditioning(
        self,
        embeddings: Sequence[PromptEmbedding],
        negatives: Sequence[PromptEmbedding] | None,
        size: tuple[int, int],
    ) -> SD3Conditioning:
        parts = [*(negatives or ()), *embeddings]
        pooled = [part.pooled for part in parts if part.pooled is not None]
        return SD3Conditioning(
            hidden_states=torch.cat([part.hidden_states for part in parts]),
            pooled=torch.cat(pooled),
        )

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: SD3Conditioning
    ) -> torch.Tensor:
        return self.denoiser(
            hidden_states=sample,
            timestep=timestep.expand(sample.shape[0]),
            encoder_hidden_states=conditioning.hidden_states,
            pooled_projections=conditioning.pooled,
            return_dict=False,
        )[0]
