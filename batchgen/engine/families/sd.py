"""Stable Diffusion 1.x/2.x: a CLIP text encoder, a UNet conditioned on its hidden states, and
SD's 4-channel latents (8× smaller than the image, scaled by the VAE's `scaling_factor`).
Registered in models/families.py; its components load through sd_loading.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import torch

from batchgen.engine.families.base import LatentFormat, PromptEmbedding, PromptText
from batchgen.engine.families.sd_loading import load_components
from batchgen.models.source import INPAINTING_CHANNELS, ModelSource

# SD 1.x/2.x share one VAE latent space. These factors are the ones InvokeAI (IMG2IMG.md's
# project) uses for its previews, credited to @keturn and @torridgristle.
LATENT_RGB_FACTORS = (
    # R       G        B
    (0.3444, 0.1385, 0.0670),
    (0.1247, 0.4027, 0.1494),
    (-0.3192, 0.2513, 0.2103),
    (-0.1307, -0.1874, -0.7445),
)


class StableDiffusion:
    """The tokenizer, text encoder, VAE and UNet of one SD 1.x/2.x model."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        vae: Any,
        unet: Any,
        scheduler_config: dict[str, Any],
        device: str,
    ) -> None:
        self.tokenizer, self.text_encoder, self.vae = tokenizer, text_encoder, vae
        self.denoiser = unet
        self.scheduler_config = scheduler_config
        self.device = device
        self.latent_format = LatentFormat.of_vae(vae, LATENT_RGB_FACTORS, "SD 1.x factors")
        self.inpainting = unet.config.in_channels == INPAINTING_CHANNELS

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
        parts = load_components(
            source, torch_dtype, device, vae=vae, variant=variant, offload=offload
        )
        return cls(
            parts.tokenizer,
            parts.text_encoder,
            parts.vae,
            parts.unet,
            parts.scheduler_config,
            device,
        )

    @property
    def unet(self) -> Any:
        return self.denoiser

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: torch.Tensor
    ) -> torch.Tensor:
        return self.denoiser(
            sample, timestep, encoder_hidden_states=conditioning, return_dict=False
        )[0]

    def conditioning(
        self,
        embeddings: Sequence[PromptEmbedding],
        negatives: Sequence[PromptEmbedding] | None,
        size: tuple[int, int],
    ) -> torch.Tensor:
        """The hidden states, concatenated: all SD's UNet is conditioned on."""
        return torch.cat(
            [embedding.hidden_states for embedding in [*(negatives or ()), *embeddings]]
        )

    def encode_prompt(self, prompt: PromptText, clip_skip: int = 1) -> PromptEmbedding:
        """CLIP's hidden state for the prompt, padded and truncated to the tokenizer's
        length (77 for SD), 1 × tokens × width. `clip_skip` is A1111's: 1 takes the last
        layer, 2 the one before it (diffusers' `clip_skip=1`), through the final layer norm
        as diffusers does. An empty negative prompt is encoded like any other."""
        if prompt.text_2:
            raise ValueError("Stable Diffusion 1.x/2.x has one text encoder: no prompt_2")
        text_inputs = self.tokenizer(
            prompt.text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        # Like the pipeline, the mask goes only to text encoders configured for it (not CLIP).
        attention_mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            attention_mask = text_inputs.attention_mask.to(self.device)
        input_ids = text_inputs.input_ids.to(self.device)
        if clip_skip <= 1:
            prompt_embeds = self.text_encoder(input_ids, attention_mask=attention_mask)[0]
        else:
            hidden_states = self.text_encoder(
                input_ids, attention_mask=attention_mask, output_hidden_states=True
            ).hidden_states
            # hidden_states[-1] is the last layer's output; A1111's "Clip skip: N" takes the
            # N-th from the end, then the final layer norm the last layer would have applied.
            prompt_embeds = self._final_layer_norm(hidden_states[-clip_skip])
        return PromptEmbedding(prompt_embeds.to(dtype=self.text_encoder.dtype, device=self.device))

    def _final_layer_norm(self, hidden_state: torch.Tensor) -> torch.Tensor:
        # transformers 5's CLIPTextModel holds it directly; 4.x under `text_model`.
        for name in ("final_layer_norm", "text_model.final_layer_norm"):
            try:
                layer_norm = self.text_encoder.get_submodule(name)
            except AttributeError:
                continue
            return layer_norm(hidden_state)
        raise ValueError(f"{type(self.text_encoder).__name__} has no final_layer_norm")
