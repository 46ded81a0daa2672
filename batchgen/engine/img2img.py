"""Rendering jobs on a device: the model's components loaded once, and our own img2img loop.

The only module that imports torch and diffusers. `Engine.render` follows diffusers'
`StableDiffusionImg2ImgPipeline.__call__` step by step and gives the same pixels, but the
denoising loop is ours, so that custom noise, per-step hooks, caches and batching can be added
around it without patching the pipeline. `Engine.render_batch` runs that loop for several
jobs at once (batching.py decides which); `render` is a batch of one.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import diffusers
import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from transformers.utils import logging as transformers_logging

from batchgen.engine.devices import (
    DTYPES,
    NO_FAST_PATHS,
    FastPathFailedError,
    FastPaths,
    default_dtype,
)
from batchgen.engine.images import PreparedImage
from batchgen.engine.masks import composite, latent_mask, redraw_mask
from batchgen.engine.schedulers import scheduler_spec
from batchgen.engine.variations import varied_noise
from batchgen.jobs.batching import auto_batch_size, batch_key, cpu_decode_size
from batchgen.jobs.job import Job, taken_steps
from batchgen.models.loading import load_components
from batchgen.models.source import ModelSource

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

# Prompt embeddings are 77 × 768 floats for SD 1.x (0.24 MB in float32): 60 MB at most.
PROMPT_CACHE_ENTRIES = 256
# A posterior holds its parameters, log-variance, std and variance, 20 floats per latent
# pixel: 0.3 MB at 512 × 512 in float32. A sweep has few init images; 64 sizes is plenty.
POSTERIOR_CACHE_ENTRIES = 64
# SD inpainting UNets take the latents (4), the mask (1) and the masked image's latents (4).
INPAINTING_UNET_CHANNELS = 9

CachedValue = TypeVar("CachedValue")


class BoundedCache(Generic[CachedValue]):
    """The `entries` most recently used values by key, counting hits and misses; with
    `entries` 0 it keeps nothing (every lookup is a miss), which is how tests turn it off."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self.hits = 0
        self.misses = 0
        self._values: OrderedDict[Hashable, CachedValue] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], CachedValue]) -> CachedValue:
        """The value for `key`, made by `make()` on a miss."""
        if key in self._values:
            self.hits += 1
            self._values.move_to_end(key)
            return self._values[key]
        self.misses += 1
        value = make()
        if self.entries > 0:
            self._values[key] = value
            if len(self._values) > self.entries:
                self._values.popitem(last=False)
        return value


def use_cpu_threads(count: int) -> None:
    """The threads torch renders with on the CPU, for this process."""
    torch.set_num_threads(count)


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
    """One model on one device: the components are loaded once, then `render` makes a job
    and `render_batch` several at once. Prompt embeddings and init images' posteriors are
    cached across jobs."""

    def __init__(
        self,
        model: ModelSource,
        device: str = "auto",
        dtype: str = "auto",
        *,
        vae: ModelSource | None = None,
        variant: str | None = None,
        fast_paths: FastPaths = NO_FAST_PATHS,
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
        self.fast_paths = fast_paths
        self._apply_fast_paths()
        # The model's own scheduler config; each job builds its scheduler class from it.
        self.scheduler_config = components.scheduler_config
        # As the pipeline: the VAE halves the size once per down block but the last.
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        # Sweeps repeat prompts and init images across many jobs: encode each once.
        self.prompt_cache: BoundedCache[torch.Tensor] = BoundedCache(PROMPT_CACHE_ENTRIES)
        self.posterior_cache: BoundedCache[DiagonalGaussianDistribution] = BoundedCache(
            POSTERIOR_CACHE_ENTRIES
        )
        self.load_seconds = time.perf_counter() - started

    def _apply_fast_paths(self) -> None:
        fast = self.fast_paths
        if fast.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if fast.vae_tiling:
            self.vae.enable_tiling()
        if fast.vae_slicing:
            self.vae.enable_slicing()
        if fast.compile:
            # Compiled lazily at the first call of each batch shape; `fullgraph` so that a
            # graph break shows as an error instead of a silent slowdown.
            self.unet = torch.compile(self.unet, fullgraph=True)

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
        return self.render_batch([job], [init], on_step)[0]

    def render_batch(
        self,
        jobs: Sequence[Job],
        inits: Sequence[PreparedImage],
        on_step: StepCallback | None = None,
    ) -> list[PIL.Image.Image]:
        """Each job's image, in order, the jobs that take steps denoised together in one loop
        (they must share a `batch_key`). On the CPU each image is the job's alone within one
        8-bit level (the UNet sums in another order for another batch size; measured in
        tests/test_batching.py), and a batch of one is exactly the pipeline's. Strength-0
        jobs return their init image unchanged and take no place in the loop.

        `on_step` sees the whole batch's latents; `IntermediatesRecorder` keeps the first
        sample's only, so jobs with intermediates are rendered in batches of one.
        """
        if len(jobs) != len(inits):
            raise ValueError(f"{len(jobs)} jobs but {len(inits)} init images")
        to_denoise = [index for index, job in enumerate(jobs) if job.steps_taken > 0]
        denoised: dict[int, PIL.Image.Image] = {}
        if to_denoise:
            pixels = self.render_pixels_batch(
                [jobs[index] for index in to_denoise],
                [inits[index] for index in to_denoise],
                on_step,
            )
            denoised = dict(zip(to_denoise, VaeImageProcessor.numpy_to_pil(pixels), strict=True))
        # Strength 0 "keeps the original intact" (seed doc); diffusers would fail there.
        images = [
            denoised[index] if index in denoised else init.rgb.copy()
            for index, init in enumerate(inits)
        ]
        return [
            image.resize(job.final_size, PIL.Image.Resampling.LANCZOS) if job.final_size else image
            for job, image in zip(jobs, images, strict=True)
        ]

    def render_pixels(
        self, job: Job, init: PreparedImage, on_step: StepCallback | None = None
    ) -> np.ndarray:
        """The job's image as float RGB in [0, 1], height × width × 3, before rounding to
        8 bits. Needs at least one denoising step (`render` handles strength 0)."""
        return self.render_pixels_batch([job], [init], on_step)[0]

    def render_pixels_batch(
        self,
        jobs: Sequence[Job],
        inits: Sequence[PreparedImage],
        on_step: StepCallback | None = None,
    ) -> np.ndarray:
        """The jobs' images as float RGB in [0, 1], batch × height × width × 3: the
        pipeline's img2img with a list of generators, one per job, and per-job cfg."""
        with tf32(self.fast_paths.tf32):
            return self._render_pixels_batch(jobs, inits, on_step)

    @torch.no_grad()
    def _render_pixels_batch(
        self,
        jobs: Sequence[Job],
        inits: Sequence[PreparedImage],
        on_step: StepCallback | None,
    ) -> np.ndarray:
        check_batch(jobs, inits)
        # One CPU generator per job, as a list of `generator=` in diffusers: each sample draws
        # what it would draw alone, on any device.
        generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
        first = jobs[0]  # what the batch shares: see batching.BatchKey
        do_classifier_free_guidance = first.cfg > 1

        prompt_embeds = self.batch_prompt_embeddings(jobs, do_classifier_free_guidance)
        scheduler = self.make_scheduler(first.scheduler)
        timesteps = self.get_timesteps(scheduler, first.steps_nominal, first.strength)
        posteriors = [self.init_posterior(job, init) for job, init in zip(jobs, inits, strict=True)]
        latents, noise, init_latents = self.prepare_latents(
            jobs, posteriors, scheduler, timesteps[:1], generators
        )
        masks = [redraw_mask(job, init) for job, init in zip(jobs, inits, strict=True)]
        # An inpainting UNet sees the mask and the kept pixels itself; any other is blended.
        inpainting = self.unet.config.in_channels == INPAINTING_UNET_CHANNELS
        conditioning = self.inpainting_conditioning(masks, inits, latents) if inpainting else None
        keep = None if inpainting else self.kept_latents(masks, latents)
        extra_step_kwargs = prepare_extra_step_kwargs(scheduler, generators)

        if on_step is not None:
            on_step(StepState(0, float(timesteps[0]), latents, None))
        for index, t in enumerate(timesteps, start=1):
            latent_model_input = (
                torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            )
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            if conditioning is not None:
                extra = (
                    torch.cat([conditioning] * 2) if do_classifier_free_guidance else conditioning
                )
                latent_model_input = torch.cat([latent_model_input, extra], dim=1)
            noise_pred = self.predict_noise(latent_model_input, t, prompt_embeds)
            if do_classifier_free_guidance:
                noise_pred = classifier_free_guidance(noise_pred, [job.cfg for job in jobs])
            step_output = scheduler.step(noise_pred, t, latents, **extra_step_kwargs)
            predicted_x0 = (
                predicted_original_sample(scheduler, step_output, noise_pred, t, latents)
                if on_step is not None
                else None
            )
            latents = step_output.prev_sample
            if keep is not None:
                # The kept region back, at the noise level of the step to come (clean after
                # the last): the model paints the rest to fit around it.
                known = (
                    scheduler.add_noise(
                        init_latents, noise, timesteps[index:][:1].repeat(len(jobs))
                    )
                    if index < len(timesteps)
                    else init_latents
                )
                latents = latents * (1 - keep) + known * keep
            if on_step is not None:
                on_step(StepState(index, float(t), latents, predicted_x0))

        pixels = self.decode_batch(latents)
        for sample, (mask, init) in enumerate(zip(masks, inits, strict=True)):
            if mask is not None:
                pixels[sample] = composite(pixels[sample], init.rgb, mask)
        return pixels

    def predict_noise(
        self, sample: torch.Tensor, timestep: torch.Tensor, prompt_embeds: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output. Compiling happens here, at the first call of each batch shape:
        a failure to compile is a FastPathFailedError, which stops the run."""
        try:
            return self.unet(
                sample, timestep, encoder_hidden_states=prompt_embeds, return_dict=False
            )[0]
        except torch._dynamo.exc.TorchDynamoException as error:  # only compiled code raises it
            cause = getattr(error, "inner_exception", None) or error  # the backend's own error
            reason = next(iter(str(cause).strip().splitlines()), "")  # then: how to debug torch
            raise FastPathFailedError(
                f"--fast compile cannot compile the UNet here: {type(cause).__name__}: {reason}. "
                "torch.compile needs a C++ compiler on the CPU (g++ or clang++ on PATH, or "
                "CXX) and Triton on a GPU: install it, or run without --fast compile"
            ) from error

    def inpainting_conditioning(
        self,
        masks: Sequence[np.ndarray | None],
        inits: Sequence[PreparedImage],
        latents: torch.Tensor,
    ) -> torch.Tensor:
        """A 9-channel inpainting UNet's extra input, b × 5 × h × w, as diffusers' inpainting
        pipeline builds it: the mask at latent size (1: redraw, thresholded at 0.5) and the
        latents of the init image with the redrawn part blanked (the posterior's mean, so the
        samples' random streams stay the img2img ones). No mask: everything is redrawn."""
        size = (latents.shape[-2], latents.shape[-1])
        parts = []
        for mask, init in zip(masks, inits, strict=True):
            image = self.image_processor.preprocess(init.rgb).to(self.device, self.torch_dtype)
            redraw = (
                torch.ones_like(image[:, :1])
                if mask is None
                else (torch.from_numpy(mask) >= 0.5)[None, None].to(image)
            )
            blanked = self.vae.encode(image * (redraw < 0.5)).latent_dist.mode()
            parts.append(
                torch.cat(
                    [F.interpolate(redraw, size=size), blanked * self.vae.config.scaling_factor],
                    dim=1,
                )
            )
        return torch.cat(parts).to(latents.dtype)

    def kept_latents(
        self, masks: Sequence[np.ndarray | None], latents: torch.Tensor
    ) -> torch.Tensor | None:
        """Per sample, 1 where its latents are kept from the init image (b × 1 × h × w), or
        None when every sample is redrawn everywhere."""
        if all(mask is None for mask in masks):
            return None
        size = (latents.shape[-2], latents.shape[-1])
        redrawn = [
            latent_mask(mask, size) if mask is not None else torch.ones(1, 1, *size)
            for mask in masks
        ]
        return (1 - torch.cat(redrawn)).to(device=self.device, dtype=latents.dtype)

    def batch_prompt_embeddings(
        self, jobs: Sequence[Job], do_classifier_free_guidance: bool
    ) -> torch.Tensor:
        """The UNet's text conditioning for the batch, in the pipeline's order: with guidance
        the unconditional halves first, [negative_1..negative_b, prompt_1..prompt_b]."""
        embeddings = [self.prompt_embeddings(job.prompt, job.clip_skip) for job in jobs]
        if do_classifier_free_guidance:
            negatives = [self.prompt_embeddings(job.negative_prompt, job.clip_skip) for job in jobs]
            embeddings = negatives + embeddings
        return torch.cat(embeddings)

    def prompt_embeddings(self, prompt: str, clip_skip: int = 1) -> torch.Tensor:
        """`encode_prompt` through the prompt cache. Each prompt is encoded alone, never in a
        batch, so that its embeddings do not depend on which prompts it was batched with."""
        return self.prompt_cache.get(
            (prompt, clip_skip), lambda: self.encode_prompt(prompt, clip_skip)
        )

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

    def init_posterior(self, job: Job, init: PreparedImage) -> DiagonalGaussianDistribution:
        """`encode_init_image` through the posterior cache. The key is the init file's hash
        (for a feedback iteration, its parent's id) and the job's size, which fix the prepared
        pixels (`images.prepare`); `fit` only chose the size. Encoded alone, as the pipeline
        encodes each image of a batch."""
        key = (job.parent_id or job.init_image.sha256, job.width, job.height)
        return self.posterior_cache.get(key, lambda: self.encode_init_image(init))

    def encode_init_image(self, init: PreparedImage) -> DiagonalGaussianDistribution:
        """The VAE's posterior over the init image's latents (mean and std, not a sample)."""
        image = self.image_processor.preprocess(init.rgb)
        image = image.to(device=self.device, dtype=self.torch_dtype)
        return self.vae.encode(image).latent_dist

    def prepare_latents(
        self,
        jobs: Sequence[Job],
        posteriors: Sequence[DiagonalGaussianDistribution],
        scheduler: Scheduler,
        first_timestep: torch.Tensor,
        generators: list[torch.Generator],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The init images' latents noised to the first timestep, the noise, and the clean
        latents. Each sample's posterior is sampled before its noise is drawn, with its own
        generator: the pipeline's random order, which is why the cache keeps posteriors and
        never a sample. A job's variations then move its noise toward theirs."""
        samples = [posterior.sample(g) for posterior, g in zip(posteriors, generators, strict=True)]
        init_latents = self.vae.config.scaling_factor * torch.cat(samples)
        noise = randn_tensor(
            init_latents.shape, generator=generators, device=self.device, dtype=self.torch_dtype
        )
        if any(job.variations for job in jobs):
            noise = torch.cat([varied_noise(job, noise[k : k + 1]) for k, job in enumerate(jobs)])
        latents = scheduler.add_noise(init_latents, noise, first_timestep.repeat(len(samples)))
        return latents, noise, init_latents

    def decode_batch(self, latents: torch.Tensor) -> np.ndarray:
        """Latents to float RGB in [0, 1], batch × height × width × 3: in one VAE call, or on
        the CPU in calls of `cpu_decode_size` images."""
        scaling_factor = self.vae.config.scaling_factor
        chunk = len(latents)
        if self.device == "cpu":
            factor = self.image_processor.config.vae_scale_factor
            chunk = cpu_decode_size(latents.shape[-1] * factor, latents.shape[-2] * factor)
        images = torch.cat(
            [
                self.vae.decode(part / scaling_factor, return_dict=False)[0]
                for part in latents.split(chunk)
            ]
        )
        if not torch.isfinite(images).all():  # postprocess would make them black, silently
            raise NonFiniteImageError(
                f"the VAE decoded NaN or infinite values in {self.dtype}: some VAEs overflow in "
                "float16; run with --dtype float32 or bfloat16, or give a VAE made for float16 "
                "with `vae:`"
            )
        return self.image_processor.postprocess(images, output_type="np")

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """The batch's first latents to float RGB in [0, 1], height × width × 3."""
        return self.decode_batch(latents[:1])[0]

    @torch.no_grad()
    def decode_latents_exact(self, latents: torch.Tensor) -> PIL.Image.Image:
        """Latents (the UNet's scaling, the batch's first) through the VAE to an 8-bit image:
        for a batch of one's final latents, exactly the image `render` returns."""
        return VaeImageProcessor.numpy_to_pil(self.decode(latents)[None])[0]


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """TF32 for float32 matmuls and convolutions on Ampere and later GPUs, on or off inside
    the block only. The flags are process-wide, and torch's defaults (off for matmuls, on for
    cuDNN convolutions) would leave a float32 render without `--fast tf32` half in TF32 and
    an engine's choice in force for whatever runs after it."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


class NonFiniteImageError(RuntimeError):
    """The VAE gave NaN or infinite pixels: an overflow, usually of float16."""


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
    scheduler: Scheduler, generators: list[torch.Generator]
) -> dict[str, object]:
    """`eta` (DDIM's η, 0 as in the pipeline) and the generators, for the schedulers whose
    `step` takes them; ancestral and SDE schedulers draw fresh noise at every step. Every
    scheduler we offer draws it with `randn_tensor`, which draws sample i from generator i
    (and treats a list of one as that generator), so each sample's noise is its own."""
    accepted = inspect.signature(scheduler.step).parameters
    extra_step_kwargs: dict[str, object] = {}
    if "eta" in accepted:
        extra_step_kwargs["eta"] = 0.0
    if "generator" in accepted:
        extra_step_kwargs["generator"] = generators
    return extra_step_kwargs


def classifier_free_guidance(noise_pred: torch.Tensor, cfgs: Sequence[float]) -> torch.Tensor:
    """uncond + cfg × (cond − uncond) for each sample of [uncond_1..uncond_b, cond_1..cond_b].
    Sample by sample with cfg as a Python float, exactly the pipeline's arithmetic: a b×1×1×1
    tensor of cfgs would round them to the model's dtype (float16: 7.3 → 7.3008)."""
    uncond, cond = noise_pred.chunk(2)
    return torch.cat(
        [
            sample_uncond + cfg * (sample_cond - sample_uncond)
            for sample_uncond, sample_cond, cfg in zip(
                uncond.split(1), cond.split(1), cfgs, strict=True
            )
        ]
    )


def check_batch(jobs: Sequence[Job], inits: Sequence[PreparedImage]) -> None:
    """Raises a ValueError unless the jobs can share one denoising loop."""
    if not jobs or len(jobs) != len(inits):
        raise ValueError(f"a batch needs one init image per job: {len(jobs)} jobs, {len(inits)}")
    key = batch_key(jobs[0])
    for job, init in zip(jobs, inits, strict=True):
        if job.steps_taken == 0:
            raise ValueError(f"job {job.id} takes no denoising steps; `render` returns its init")
        differing = [
            name
            for name, value, first_value in zip(key._fields, batch_key(job), key, strict=True)
            if value != first_value
        ]
        if differing:
            raise ValueError(
                f"job {job.id} cannot share a batch with job {jobs[0].id}: "
                f"they differ in {', '.join(differing)}"
            )
        if init.rgb.size != (job.width, job.height):
            raise ValueError(
                f"init image is {init.rgb.size}, job {job.id} is {job.width}x{job.height}"
            )


def probe_cuda_batch_size(engine: Engine, job: Job, init: PreparedImage) -> int:
    """The largest batch of jobs like `job` that `engine`'s GPU holds, by batching's
    `auto_batch_size`. The trial renders take one denoising step: the UNet needs as much
    memory at every step, and the batched VAE decode is tried with it."""
    if not engine.device.startswith("cuda"):
        raise ValueError(f"probing a batch size needs a CUDA device, not {engine.device}")
    trial = replace(job, steps=1, steps_mode="nominal", strength=1.0)

    def fits(size: int) -> bool:
        # No empty_cache() after a failure: on running out, torch's allocator has already
        # released its cached blocks and retried; it keeps what fits for the real batches.
        try:
            engine.render_batch([trial] * size, [init] * size)
        except torch.cuda.OutOfMemoryError:
            return False
        return True

    return auto_batch_size(engine.device, job.width, job.height, fits)
