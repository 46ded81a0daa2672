"""Rendering jobs on a device: one model's family loaded once, with the caches and the
batch-level steps around the denoising loop (engine/denoise.py).

`Engine.render` gives, for a plain job, the pixels of diffusers' `StableDiffusionImg2ImgPipeline`
with the same inputs. `render_batch` renders several jobs in one loop (jobs/batching.py
decides which); `render` is a batch of one. Prompt embeddings and init images' posteriors are
cached across jobs: sweeps repeat both.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import replace
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

from batchgen.engine.denoise import Scheduler, StepCallback, denoise, noised
from batchgen.engine.devices import (
    NO_FAST_PATHS,
    FastPathFailedError,
    FastPaths,
    resolve_device,
    resolve_dtype,
)
from batchgen.engine.families.base import OFFLOAD_DEVICES, Family, PromptEmbedding, PromptText
from batchgen.engine.images import PreparedImage
from batchgen.engine.masks import latent_mask
from batchgen.engine.schedulers import scheduler_spec
from batchgen.engine.variations import varied_noise
from batchgen.jobs.batching import auto_batch_size, cpu_decode_size
from batchgen.jobs.job import Job
from batchgen.models.families import FAMILIES
from batchgen.models.source import ModelSource

# Prompt embeddings are 77 × 768 floats for SD 1.x (0.24 MB in float32): 60 MB at most.
PROMPT_CACHE_ENTRIES = 256
# A posterior holds its parameters, log-variance, std and variance, 20 floats per latent
# pixel: 0.3 MB at 512 × 512 in float32. A sweep has few init images; 64 sizes is plenty.
POSTERIOR_CACHE_ENTRIES = 64

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
        refiners: Mapping[str, ModelSource] | None = None,
    ) -> None:
        """`refiners`: SDXL refiners by the identity jobs name them with (`Job.refiner`),
        loaded beside the model and on the same terms (`vae` replaces theirs too)."""
        started = time.perf_counter()
        _silence_libraries()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.torch_dtype: torch.dtype = getattr(torch, self.dtype)
        self.fast_paths = fast_paths

        if fast_paths.offload and not self.device.startswith(OFFLOAD_DEVICES):
            raise FastPathFailedError(
                f"--fast offload keeps the models in CPU memory and moves each to the GPU while "
                f"it runs; this run is on {self.device}, with nothing to offload from: run "
                "without it"
            )

        def load(source: ModelSource) -> Family:
            family_class = FAMILIES[source.family].load_class()
            family: Family = family_class.load(
                source,
                self.torch_dtype,
                self.device,
                vae=vae,
                variant=variant,
                offload=fast_paths.offload,
            )
            self._apply_fast_paths(family)
            return family

        self.family = load(model)
        self.refiners: dict[str, Family] = {}
        for identity, refiner in (refiners or {}).items():
            try:
                self.refiners[identity] = load(refiner)
            except Exception as error:
                raise RefinerLoadError(
                    f"the refiner `{refiner.reference}` ({refiner.path}) does not load: "
                    f"{type(error).__name__}: {error}"
                ) from error
        # A half-precision render whose VAE stays in float32 (SDXL's `force_upcast`): the VAE
        # overflows in float16, and float32 has the range it needs.
        self.vae_upcast = (
            self.family.vae.dtype == torch.float32 and self.torch_dtype != torch.float32
        )
        self.image_processor = VaeImageProcessor(
            vae_scale_factor=self.family.latent_format.vae_scale_factor
        )
        # Sweeps repeat prompts and init images across many jobs: encode each once.
        self.prompt_cache: BoundedCache[PromptEmbedding] = BoundedCache(PROMPT_CACHE_ENTRIES)
        self.posterior_cache: BoundedCache[DiagonalGaussianDistribution] = BoundedCache(
            POSTERIOR_CACHE_ENTRIES
        )
        self.load_seconds = time.perf_counter() - started

    def _apply_fast_paths(self, family: Family) -> None:
        fast = self.fast_paths
        if fast.channels_last:
            family.denoiser.to(memory_format=torch.channels_last)
            family.vae.to(memory_format=torch.channels_last)
        if fast.vae_tiling:
            family.vae.enable_tiling()
        if fast.vae_slicing:
            family.vae.enable_slicing()
        if fast.compile:
            # Compiled lazily at the first call of each batch shape; `fullgraph` so that a
            # graph break shows as an error instead of a silent slowdown.
            family.denoiser = torch.compile(family.denoiser, fullgraph=True)

    @property
    def precision_record(self) -> str:
        """What the manifest's `fast_paths` column records: the fast paths that were on, and
        `vae_float32` when the VAE ran in float32 in a half-precision render."""
        return ",".join(filter(None, (str(self.fast_paths), "vae_float32" * self.vae_upcast)))

    def vae_precision(self) -> contextlib.AbstractContextManager[None]:
        """Around every VAE call. A VAE upcast for its range alone runs its convolutions in TF32
        (float32's range, float16's precision, as the render's): torch's default for cuDNN, so
        what the pipeline does. Under the render's `tf32` switch alone it ran in strict float32,
        and SDXL's decode at 1024² took ten times the pipeline's on an H200 (RESULTS.md)."""
        return tf32(True) if self.vae_upcast else contextlib.nullcontext()

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
        8-bit level (the UNet sums in another order for another batch size;
        tests/test_batching.py checks it), and a batch of one is exactly the pipeline's.
        Strength-0 jobs return their init image unchanged and take no place in the loop.

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
        # Strength 0 "keeps the original intact" (IMG2IMG.md); diffusers would fail there.
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
            return denoise(self, jobs, inits, on_step)

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        conditioning: Any,
        family: Family | None = None,
    ) -> torch.Tensor:
        """The denoiser's output, of `family` (default: the model's; else a refiner).
        Compiling happens here, at the first call of each batch shape: a failure to compile
        is a FastPathFailedError, which stops the run."""
        try:
            return (family or self.family).predict_noise(sample, timestep, conditioning)
        except torch._dynamo.exc.TorchDynamoException as error:  # only compiled code raises it
            cause = getattr(error, "inner_exception", None) or error  # the backend's own error
            reason = next(iter(str(cause).strip().splitlines()), "")  # then: how to debug torch
            raise FastPathFailedError(
                f"--fast compile cannot compile the UNet here: {type(cause).__name__}: {reason}. "
                "torch.compile needs a C++ compiler on the CPU (g++ or clang++ on PATH, or "
                "CXX) and Triton on a GPU: install it, or run without --fast compile"
            ) from error

    def inpainting_channels(
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
            image = self.image_processor.preprocess(init.rgb).to(self.device, self.family.vae.dtype)
            redraw = (
                torch.ones_like(image[:, :1])
                if mask is None
                else (torch.from_numpy(mask) >= 0.5)[None, None].to(image)
            )
            with self.vae_precision():
                blanked = self.family.vae.encode(image * (redraw < 0.5)).latent_dist.mode()
            latents_of_kept = self.family.latent_format.from_vae(blanked)
            parts.append(torch.cat([F.interpolate(redraw, size=size), latents_of_kept], dim=1))
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

    def batch_conditioning(
        self, jobs: Sequence[Job], do_classifier_free_guidance: bool, family: Family | None = None
    ) -> Any:
        """The denoiser's text conditioning for the batch, in the pipeline's order: with
        guidance the unconditional halves first, [negative_1..negative_b, prompt_1..prompt_b].
        `family`: the model's (default) or a refiner's, with text encoders of its own."""
        family = family or self.family
        embeddings = [
            self.prompt_embeddings(PromptText(job.prompt, job.prompt_2), job.clip_skip, family)
            for job in jobs
        ]
        negatives = None
        if do_classifier_free_guidance:
            negatives = [
                self.prompt_embeddings(
                    PromptText(job.negative_prompt, job.negative_prompt_2, negative=True),
                    job.clip_skip,
                    family,
                )
                for job in jobs
            ]
        return family.conditioning(embeddings, negatives, (jobs[0].width, jobs[0].height))

    def prompt_embeddings(
        self, prompt: PromptText, clip_skip: int = 1, family: Family | None = None
    ) -> PromptEmbedding:
        """The family's `encode_prompt` (the model's by default) through the prompt cache."""
        family = family or self.family
        return self.prompt_cache.get(
            (id(family), prompt, clip_skip), lambda: family.encode_prompt(prompt, clip_skip)
        )

    def make_scheduler(self, name: str, family: Family | None = None) -> Scheduler:
        """A fresh scheduler per job: schedulers keep state (step index, multistep history).
        Built from the model's scheduler config, or `family`'s."""
        spec = scheduler_spec(name)
        scheduler_class = getattr(diffusers, spec.class_name)
        config = (family or self.family).scheduler_config
        return scheduler_class.from_config(config, **spec.config)

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
        image = image.to(device=self.device, dtype=self.family.vae.dtype)
        with self.vae_precision():
            return self.family.vae.encode(image).latent_dist

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
        # A VAE kept in float32 (SDXL's force_upcast) samples in float32: cast, as the pipeline.
        init_latents = self.family.latent_format.from_vae(torch.cat(samples).to(self.torch_dtype))
        noise = randn_tensor(
            init_latents.shape, generator=generators, device=self.device, dtype=self.torch_dtype
        )
        if any(job.variations for job in jobs):
            noise = torch.cat([varied_noise(job, noise[k : k + 1]) for k, job in enumerate(jobs)])
        latents = noised(scheduler, init_latents, noise, first_timestep.repeat(len(samples)))
        return latents, noise, init_latents

    def decode_batch(self, latents: torch.Tensor, family: Family | None = None) -> np.ndarray:
        """Latents to float RGB in [0, 1], batch × height × width × 3, by the model's VAE or
        `family`'s: in one VAE call, or on the CPU in calls of `cpu_decode_size` images."""
        vae, latent_format = (family or self.family).vae, (family or self.family).latent_format
        chunk = len(latents)
        if self.device == "cpu":
            factor = self.image_processor.config.vae_scale_factor
            chunk = cpu_decode_size(latents.shape[-1] * factor, latents.shape[-2] * factor)
        with self.vae_precision():
            images = torch.cat(
                [
                    vae.decode(latent_format.to_vae(part.to(vae.dtype)), return_dict=False)[0]
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


class RefinerLoadError(RuntimeError):
    """A refiner named by the recipe cannot be loaded."""


class NonFiniteImageError(RuntimeError):
    """The VAE gave NaN or infinite pixels: an overflow, usually of float16."""


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
