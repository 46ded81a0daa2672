"""What a model family gives the denoising loop (engine/denoise.py): a protocol, so that a
family is a class of its own, never a branch in the loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self

import torch

from batchgen.models.source import ModelSource

# Devices whose memory is not the CPU's: what `--fast offload` can offload from.
OFFLOAD_DEVICES = ("cuda", "mps")


def place(models: Sequence[torch.nn.Module], device: str, offload: bool = False) -> None:
    """A family's models in eval mode without gradients, on `device`; with `offload` in CPU
    memory instead, each moved to `device` for its calls and back to the CPU when the one after
    it in `models` runs (accelerate's hooks, as diffusers' model CPU offload): give them in the
    order they run."""
    hook = None
    for model in models:
        model.eval().requires_grad_(False)
        if offload:
            from accelerate import cpu_offload_with_hook

            _, hook = cpu_offload_with_hook(model, device, prev_module_hook=hook)
        else:
            model.to(device)


@dataclass(frozen=True)
class LatentFormat:
    """A family's latents as data (ComfyUI's latent_formats): what the VAE's output is scaled
    and shifted by before the denoiser sees it, and its shape."""

    channels: int
    scaling_factor: float
    shift_factor: float
    vae_scale_factor: int  # image pixels per latent pixel, along each side
    # RGB ≈ latents · factors for each latent pixel (one row per channel, colours in [-1, 1]):
    # what intermediates' approximate frames show, without a VAE decode. Where they come from.
    latent_rgb_factors: tuple[tuple[float, float, float], ...]
    latent_rgb_source: str

    @classmethod
    def of_vae(
        cls, vae: Any, latent_rgb_factors: tuple[tuple[float, float, float], ...], source: str
    ) -> LatentFormat:
        """The latents of an AutoencoderKL, from its config (as the pipelines read it: the VAE
        halves the size once per down block but the last), with a family's preview factors."""
        config = vae.config
        return cls(
            channels=config.latent_channels,
            scaling_factor=config.scaling_factor,
            shift_factor=config.get("shift_factor") or 0.0,
            vae_scale_factor=2 ** (len(config.block_out_channels) - 1),
            latent_rgb_factors=latent_rgb_factors,
            latent_rgb_source=source,
        )

    def from_vae(self, sample: torch.Tensor) -> torch.Tensor:
        return (sample - self.shift_factor) * self.scaling_factor

    def to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor


@dataclass(frozen=True)
class PromptText:
    """What one prompt embedding is encoded from: the prompt, the second text encoder's prompt
    where a family has two (SDXL's `prompt_2`; "" means the same prompt), and whether it is the
    unconditional half of guidance, which some families encode as zeros when empty."""

    text: str
    text_2: str = ""
    negative: bool = False


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's encoding: the text encoders' hidden states, 1 × tokens × width, and for a
    family whose denoiser also takes one, a pooled embedding, 1 × width."""

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None


class Family(Protocol):
    """A loaded model of one family, on its device, in its dtype."""

    latent_format: LatentFormat
    vae: Any  # an AutoencoderKL: encodes init images, decodes latents
    denoiser: Any  # the UNet or transformer: what `--fast compile` and channels_last change
    scheduler_config: dict[str, Any]  # each job builds its scheduler class from it
    # An inpainting model takes the mask and the kept pixels' latents beside its latents.
    inpainting: bool

    @classmethod
    def load(
        cls,
        source: ModelSource,
        torch_dtype: torch.dtype,
        device: str,
        *,
        vae: ModelSource | None,
        variant: str | None,
        offload: bool = False,
    ) -> Self:
        """The model's components in `torch_dtype` on `device` (with `offload`: in CPU memory,
        each moved to `device` while it runs; see `place`)."""
        ...

    def encode_prompt(self, prompt: PromptText, clip_skip: int) -> PromptEmbedding:
        """One prompt's embedding: encoded alone, so that it does not depend on which prompts
        share its batch. `clip_skip` is A1111's (1: the family's usual layer)."""
        ...

    def conditioning(
        self,
        embeddings: Sequence[PromptEmbedding],
        negatives: Sequence[PromptEmbedding] | None,
        size: tuple[int, int],
    ) -> Any:
        """What `predict_noise` is given for a batch of `size` (width, height) images: with
        guidance the negatives' half first, as the pipeline orders them."""
        ...

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: Any
    ) -> torch.Tensor:
        """The denoiser's output for a batch, given `conditioning`'s result."""
        ...
