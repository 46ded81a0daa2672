"""Rendering jobs on a device: the model's components loaded once, and our own img2img loop.

The only module that imports torch and diffusers. `Engine.render` follows diffusers'
`StableDiffusionImg2ImgPipeline.__call__` step by step and gives the same pixels, but the
denoising loop is ours, so that custom noise, per-step hooks, caches and batching can be added
around it without patching the pipeline.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import logging as transformers_logging

from batchgen.devices import DTYPES, default_dtype
from batchgen.images import PreparedImage
from batchgen.job import Job, taken_steps
from batchgen.loading import load_components
from batchgen.models import ModelSource
from batchgen.schedulers import scheduler_spec

# A diffusers scheduler. Their shared base, SchedulerMixin, does not declare the methods every
# one of them has (set_timesteps, scale_model_input, step, add_noise), so type checkers can't.
Scheduler = Any


@dataclass(frozen=True)
class StepState:
    """The denoising loop's latents at its start and after each scheduler step, for a hook.

    Index 0 is the init image's latents noised to the first timestep, before any step (the seed
    doc's "initial image that SD sees"); index i follows the i-th call of the scheduler's `step`,
    one per UNet evaluation. That is one per step taken, except for second-order schedulers
    (Heun, DPM2: two calls per step but the last) and PLMS (its warm-up step calls twice).
    The tensors are the loop's own, batch × 4 × height/8 × width/8: read or copy them, never
    change them in place.
    """

    index: int
    # The UNet's timestep at this step (index 0: the one the noise matches). Not always a whole
    # number: Karras sigmas and DPM2's midpoints fall between the training timesteps.
    timestep: float
    latents: torch.Tensor
    predicted_x0: torch.Tensor | None  # the clean latents this step aimed at; None at index 0


StepCallback = Callable[[StepState], None]


def resolve_device(device: str) -> str:
    """`auto` is CUDA if torch sees a GPU, else Apple's MPS, else the CPU; a device named
    explicitly must be usable here, or this raises a ValueError that says what to use."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                "device `mps` is not available: this machine or torch build has no Apple GPU "
                "support; use `--device cpu`"
            )
        return device
    kind, colon, index = device.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ValueError(f"unknown device `{device}`; use auto, cpu, cuda, cuda:N or mps")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        raise ValueError(
            f"device `{device}` is not available: torch {torch.__version__} sees no CUDA GPU "
            f"(CUDA build: {torch.version.cuda or 'none'}); use `--device cpu`"
        )
    if colon and int(index) >= gpus:
        raise ValueError(
            f"device `{device}` is not available: torch sees {gpus} CUDA GPU(s), "
            f"cuda:0 to cuda:{gpus - 1}"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is float16 on CUDA and float32 on the CPU and MPS (see devices.default_dtype)."""
    resolved = default_dtype(dtype, device)
    if resolved not in DTYPES:
        raise ValueError(f"unknown dtype `{dtype}`; use auto, {', '.join(DTYPES)}")
    return resolved


def _silence_libraries() -> None:
    """Our progress lines replace theirs: no tqdm bars or info logs in a run's output."""
    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()


class Engine:
    """One model on one device: the components are loaded once, then `render` makes a job."""

    def __init__(
        self,
        model: ModelSource,
        device: str = "auto",
        dtype: str = "auto",
        *,
        vae: ModelSource | None = None,
        variant: str | None = None,
    ) -> None:
        started = time.perf_counter()
        _silence_libraries()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.torch_dtype: torch.dtype = getattr(torch, self.dtype)

        components = load_components(model, self.torch_dtype, self.device, vae=vae, variant=variant)
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.vae = components.vae
        self.unet = components.unet
        # The model's own scheduler config; each job builds its scheduler class from it.
        self.scheduler_config = components.scheduler_config
        # As the pipeline: the VAE halves the size once per down block but the last.
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        self.load_seconds = time.perf_counter() - started

    @property
    def device_label(self) -> str:
        """The device as the manifest records it: CPU results change in the last bits with
        torch's thread count, GPU results with the GPU model."""
        if self.device == "cpu":
            return f"cpu ({torch.get_num_threads()} threads)"
        if self.device.startswith("cuda"):
            return f"{self.device} ({torch.cuda.get_device_name(self.device)})"
        return self.device

    def render(
        self, job: Job, init: PreparedImage, on_step: StepCallback | None = None
    ) -> PIL.Image.Image:
        """The job's image, pixel for pixel what diffusers' img2img pipeline makes of it.
        `on_step` sees the latents before the first step and after each one; strength 0 takes
        no step and calls it never."""
        if job.steps_taken == 0:
            # Strength 0 "keeps the original intact" (seed doc); diffusers would fail here.
            return init.rgb.copy()
        pixels = self.render_pixels(job, init, on_step)
        return VaeImageProcessor.numpy_to_pil(pixels[None])[0]

    @torch.no_grad()
    def render_pixels(
        self, job: Job, init: PreparedImage, on_step: StepCallback | None = None
    ) -> np.ndarray:
        """The job's image as float RGB in [0, 1], height × width × 3, before rounding to
        8 bits. Needs at least one denoising step (`render` handles strength 0)."""
        if job.steps_taken == 0:
            raise ValueError(f"job {job.id} takes no denoising steps; `render` returns its init")
        if init.rgb.size != (job.width, job.height):
            raise ValueError(
                f"init image is {init.rgb.size}, job {job.id} is {job.width}x{job.height}"
            )
        # One CPU generator per job, as `generator=` in diffusers: the same pixels on any device.
        generator = torch.Generator("cpu").manual_seed(job.seed)
        do_classifier_free_guidance = job.cfg > 1

        prompt_embeds = self.encode_prompt(job.prompt, job.clip_skip)
        if do_classifier_free_guidance:
            # Unconditional and conditional in one UNet batch, in the pipeline's order.
            negative_embeds = self.encode_prompt(job.negative_prompt, job.clip_skip)
            prompt_embeds = torch.cat([negative_embeds, prompt_embeds])

        scheduler = self.make_scheduler(job.scheduler)
        timesteps = self.get_timesteps(scheduler, job.steps_nominal, job.strength)
        posterior = self.encode_init_image(init)
        latents = self.prepare_latents(posterior, scheduler, timesteps[:1], generator)
        extra_step_kwargs = prepare_extra_step_kwargs(scheduler, generator)

        if on_step is not None:
            on_step(StepState(0, float(timesteps[0]), latents, None))
        for index, t in enumerate(timesteps, start=1):
            latent_model_input = (
                torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            )
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            noise_pred = self.unet(
                latent_model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False
            )[0]
            if do_classifier_free_guidance:
                noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                noise_pred = noise_pred_uncond + job.cfg * (noise_pred_text - noise_pred_uncond)
            step_output = scheduler.step(noise_pred, t, latents, **extra_step_kwargs)
            if on_step is not None:
                predicted_x0 = predicted_original_sample(
                    scheduler, step_output, noise_pred, t, latents
                )
                on_step(StepState(index, float(t), step_output.prev_sample, predicted_x0))
            latents = step_output.prev_sample

        return self.decode(latents)

    def encode_prompt(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """CLIP's hidden state for the prompt, padded and truncated to the tokenizer's
        length (77 for SD), 1 × tokens × width. `clip_skip` is A1111's: 1 takes the last
        layer, 2 the one before it (diffusers' `clip_skip=1`), through the final layer norm
        as diffusers does."""
        text_inputs = self.tokenizer(
            prompt,
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
        return prompt_embeds.to(dtype=self.text_encoder.dtype, device=self.device)

    def _final_layer_norm(self, hidden_state: torch.Tensor) -> torch.Tensor:
        # transformers 5's CLIPTextModel holds it directly; 4.x under `text_model`.
        for name in ("final_layer_norm", "text_model.final_layer_norm"):
            try:
                layer_norm = self.text_encoder.get_submodule(name)
            except AttributeError:
                continue
            return layer_norm(hidden_state)
        raise ValueError(f"{type(self.text_encoder).__name__} has no final_layer_norm")

    def make_scheduler(self, name: str) -> Scheduler:
        """A fresh scheduler per job: schedulers keep state (step index, multistep history)."""
        spec = scheduler_spec(name)
        scheduler_class = getattr(diffusers, spec.class_name)
        return scheduler_class.from_config(self.scheduler_config, **spec.config)

    def get_timesteps(
        self, scheduler: Scheduler, num_inference_steps: int, strength: float
    ) -> torch.Tensor:
        """The schedule for `num_inference_steps`, minus the first steps that strength skips
        (diffusers' `get_timesteps`: int(steps × strength) steps are left)."""
        scheduler.set_timesteps(num_inference_steps, device=self.device)
        t_start = num_inference_steps - taken_steps(num_inference_steps, strength)
        # Second-order schedulers hold `order` timesteps per step.
        begin_index = t_start * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin_index)
        return scheduler.timesteps[begin_index:]

    def encode_init_image(self, init: PreparedImage) -> DiagonalGaussianDistribution:
        """The VAE's posterior over the init image's latents (mean and std, not a sample)."""
        image = self.image_processor.preprocess(init.rgb)
        image = image.to(device=self.device, dtype=self.torch_dtype)
        return self.vae.encode(image).latent_dist

    def prepare_latents(
        self,
        posterior: DiagonalGaussianDistribution,
        scheduler: Scheduler,
        first_timestep: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """The init image's latents noised to the first timestep. The posterior is sampled
        before the noise is drawn, with the same generator: the pipeline's random order."""
        init_latents = self.vae.config.scaling_factor * posterior.sample(generator)
        noise = randn_tensor(
            init_latents.shape, generator=generator, device=self.device, dtype=self.torch_dtype
        )
        return scheduler.add_noise(init_latents, noise, first_timestep)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to float RGB in [0, 1], height × width × 3."""
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="np")[0]

    @torch.no_grad()
    def decode_latents_exact(self, latents: torch.Tensor) -> PIL.Image.Image:
        """Latents (the UNet's scaling, batch of one) through the VAE to an 8-bit image: for
        the final latents, exactly the image `render` returns."""
        return VaeImageProcessor.numpy_to_pil(self.decode(latents)[None])[0]


def predicted_original_sample(
    scheduler: Scheduler,
    step_output: object,
    model_output: torch.Tensor,
    timestep: torch.Tensor,
    sample: torch.Tensor,
) -> torch.Tensor | None:
    """The clean latents (x0) that the step from `sample` at `timestep` aimed at.

    Most schedulers return it: `pred_original_sample` from DDIM, DDPM, LMS, Euler, Euler a,
    Heun, DPM2 and DPM2 a, `denoised` from LCM. PLMS, DPM++ (2M, 2S), DEIS and UniPC don't; all
    are variance-preserving (x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε), so x0 follows from the model's
    output as in DDIM's step. None for a prediction type that formula does not cover.
    """
    for name in ("pred_original_sample", "denoised"):
        predicted = getattr(step_output, name, None)
        if predicted is not None:
            return predicted
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        return None
    # These schedulers' timesteps are whole training timesteps, Karras sigmas or not.
    alpha_prod_t = alphas_cumprod[int(timestep)].to(sample.device, sample.dtype)
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    if prediction_type == "v_prediction":
        return alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    return None


def prepare_extra_step_kwargs(
    scheduler: Scheduler, generator: torch.Generator
) -> dict[str, object]:
    """`eta` (DDIM's η, 0 as in the pipeline) and the generator, for the schedulers whose
    `step` takes them; ancestral and SDE schedulers draw fresh noise at every step."""
    accepted = inspect.signature(scheduler.step).parameters
    extra_step_kwargs: dict[str, object] = {}
    if "eta" in accepted:
        extra_step_kwargs["eta"] = 0.0
    if "generator" in accepted:
        extra_step_kwargs["generator"] = generator
    return extra_step_kwargs
