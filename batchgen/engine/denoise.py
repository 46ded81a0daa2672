"""The img2img denoising loop, once: `denoise` reads top to bottom as diffusers'
`StableDiffusionImg2ImgPipeline.__call__` does, in numbered steps, over whichever model family
the engine holds (engine/families/). Plain img2img, latent blending of a kept region, the
9-channel inpainting UNet and SDXL's refiner (a second stage after a switch, as the pipeline
with `denoising_end` followed by one with `denoising_start`) are all in it; the steps'
arithmetic is in the helpers below it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from batchgen.engine.families.base import Family
from batchgen.engine.images import PreparedImage
from batchgen.engine.masks import composite, redraw_mask
from batchgen.jobs.batching import batch_key
from batchgen.jobs.job import Job, taken_steps

if TYPE_CHECKING:
    from batchgen.engine.img2img import Engine

# A diffusers scheduler. Their shared base, SchedulerMixin, does not declare the methods every
# one of them has (set_timesteps, scale_model_input, step, add_noise), so type checkers can't.
Scheduler = Any


@dataclass(frozen=True)
class StepState:
    """The denoising loop's latents at its start and after each scheduler step, for a hook.

    Index 0 is the init image's latents noised to the first timestep, before any step
    (IMG2IMG.md's "initial image that SD sees"); index i follows the i-th call of the
    scheduler's `step`, one per UNet evaluation. That is one per step taken, except for
    second-order schedulers (Heun, DPM2: two calls per step but the last) and PLMS (its
    warm-up step calls twice).
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


@dataclass(frozen=True)
class Stage:
    """One model's share of the loop: all of it, or with a refiner the model's steps before
    the switch and then the refiner's, each with its own scheduler and conditioning."""

    family: Family
    scheduler: Scheduler
    timesteps: torch.Tensor
    conditioning: Any
    extra_channels: torch.Tensor | None  # a 9-channel inpainting UNet's mask and kept latents
    keep: torch.Tensor | None  # where the init image's latents are put back after each step
    extra_step_kwargs: dict[str, object]


@torch.no_grad()
def denoise(
    engine: Engine,
    jobs: Sequence[Job],
    inits: Sequence[PreparedImage],
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """The jobs' images as float RGB in [0, 1], batch × height × width × 3: diffusers'
    img2img pipeline with a list of generators, one per job, and per-job cfg."""
    # 1. Check inputs: the jobs must share one loop (batching.BatchKey).
    check_batch(jobs, inits)
    first = jobs[0]
    do_classifier_free_guidance = first.cfg > 1
    # 2. One CPU generator per job, as a list of `generator=` in diffusers: each sample draws
    #    what it would draw alone, on any device.
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]

    # 3. Encode the prompts (the negative ones first, with guidance).
    conditioning = engine.batch_conditioning(jobs, do_classifier_free_guidance)

    # 4. The timesteps that strength leaves.
    scheduler = engine.make_scheduler(first.scheduler)
    timesteps = get_timesteps(scheduler, first.steps_nominal, first.strength, engine.device)

    # 5. The init images' latents, noised to the first of them.
    posteriors = [engine.init_posterior(job, init) for job, init in zip(jobs, inits, strict=True)]
    latents, noise, init_latents = engine.prepare_latents(
        jobs, posteriors, scheduler, timesteps[:1], generators
    )

    # 6. What is redrawn: an inpainting model sees the mask and the kept pixels itself (its
    #    extra input channels); any other has the kept latents put back after each step.
    masks = [redraw_mask(job, init) for job, init in zip(jobs, inits, strict=True)]
    inpainting = engine.family.inpainting
    extra_channels = engine.inpainting_channels(masks, inits, latents) if inpainting else None
    keep = None if inpainting else engine.kept_latents(masks, latents)

    # 7. The stages, with the scheduler's own arguments (DDIM's eta, the generators of
    #    ancestral schedulers): the model's, and a refiner's after its switch.
    stages = [
        Stage(
            engine.family,
            scheduler,
            timesteps,
            conditioning,
            extra_channels,
            keep,
            prepare_extra_step_kwargs(scheduler, generators),
        )
    ]
    if first.refiner:
        stages = with_refiner(engine, stages[0], jobs, masks, latents, generators)

    # 8. The denoising loop, through each stage's timesteps in turn.
    steps = [(stage, t) for stage in stages for t in stage.timesteps]
    if on_step is not None:
        on_step(StepState(0, float(timesteps[0]), latents, None))
    for index, (stage, t) in enumerate(steps, start=1):
        model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        model_input = scaled_model_input(stage.scheduler, model_input, t)
        if stage.extra_channels is not None:
            extra = stage.extra_channels
            extra = torch.cat([extra] * 2) if do_classifier_free_guidance else extra
            model_input = torch.cat([model_input, extra], dim=1)
        noise_pred = engine.predict_noise(model_input, t, stage.conditioning, stage.family)
        if do_classifier_free_guidance:
            noise_pred = classifier_free_guidance(noise_pred, [job.cfg for job in jobs])
        step_output = stage.scheduler.step(noise_pred, t, latents, **stage.extra_step_kwargs)
        predicted_x0 = (
            predicted_original_sample(stage.scheduler, step_output, noise_pred, t, latents)
            if on_step is not None
            else None
        )
        latents = step_output.prev_sample
        if stage.keep is not None:
            # The kept region back, at the noise level of the step to come (clean after the
            # last): the model paints the rest to fit around it.
            known = (
                noised(stage.scheduler, init_latents, noise, steps[index][1].repeat(len(jobs)))
                if index < len(steps)
                else init_latents
            )
            latents = latents * (1 - stage.keep) + known * stage.keep
        if on_step is not None:
            on_step(StepState(index, float(t), latents, predicted_x0))

    # 9. Decode (with the last stage's VAE, as its pipeline would), and paste the kept pixels
    #    back over the decoded ones.
    pixels = engine.decode_batch(latents, stages[-1].family)
    for sample, (mask, init) in enumerate(zip(masks, inits, strict=True)):
        if mask is not None:
            pixels[sample] = composite(pixels[sample], init.rgb, mask)
    return pixels


def get_timesteps(
    scheduler: Scheduler, num_inference_steps: int, strength: float, device: str
) -> torch.Tensor:
    """The schedule for `num_inference_steps`, minus the first steps that strength skips
    (diffusers' `get_timesteps`: int(steps × strength) steps are left)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    t_start = num_inference_steps - taken_steps(num_inference_steps, strength)
    # Second-order schedulers hold `order` timesteps per step.
    begin_index = t_start * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    return scheduler.timesteps[begin_index:]


def noised(
    scheduler: Scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Clean latents noised to `timesteps` (one per sample), as the scheduler's pipelines do:
    flow matching's `scale_noise` (σ·noise + (1 − σ)·clean), the others' `add_noise`."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(clean, timesteps, noise)
    return scheduler.add_noise(clean, noise, timesteps)


def scaled_model_input(scheduler: Scheduler, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoiser's input at `t`: flow-matching schedulers have no scaling (nor the method)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, t)


def with_refiner(
    engine: Engine,
    base: Stage,
    jobs: Sequence[Job],
    masks: Sequence[np.ndarray | None],
    latents: torch.Tensor,
    generators: list[torch.Generator],
) -> list[Stage]:
    """The model's stage cut at the jobs' refiner switch, and the refiner's stage after it:
    a fresh scheduler of the refiner's (as its own pipeline has), its prompt embeddings, and
    blending for any kept region (a refiner has no inpainting channels)."""
    first = jobs[0]
    refiner = engine.refiners[first.refiner]
    scheduler = engine.make_scheduler(first.scheduler, refiner)
    begun = len(base.scheduler.timesteps) - len(base.timesteps)  # where strength began
    guided = first.cfg > 1
    return [
        replace(base, timesteps=timesteps_before_switch(base, first.refiner_switch)),
        Stage(
            refiner,
            scheduler,
            timesteps_after_switch(
                scheduler, first.steps_nominal, first.refiner_switch, engine.device, begun
            ),
            engine.batch_conditioning(jobs, guided, refiner),
            None,
            engine.kept_latents(masks, latents),
            prepare_extra_step_kwargs(scheduler, generators),
        ),
    ]


def switch_timestep(scheduler: Scheduler, switch: float) -> int:
    """The training timestep where `switch` of the schedule is done (diffusers'
    `discrete_timestep_cutoff`)."""
    trained = scheduler.config.num_train_timesteps
    return int(round(trained - switch * trained))


def timesteps_before_switch(stage: Stage, switch: float) -> torch.Tensor:
    """The stage's timesteps at or above the switch's: the pipeline's `denoising_end`."""
    cutoff = switch_timestep(stage.scheduler, switch)
    return stage.timesteps[: int((stage.timesteps >= cutoff).sum())]


def timesteps_after_switch(
    scheduler: Scheduler, num_inference_steps: int, switch: float, device: str, earliest: int
) -> torch.Tensor:
    """The refiner's timesteps below the switch's: the pipeline's `denoising_start` (on a
    second-order scheduler, from the start of a step). Never from before index `earliest`,
    where strength began: where strength leaves fewer steps than the switch, the refiner takes
    all of them (the pipeline would take steps at noise levels the latents never had)."""
    scheduler.set_timesteps(num_inference_steps, device=device)
    cutoff = switch_timestep(scheduler, switch)
    count = int((scheduler.timesteps < cutoff).sum())
    if scheduler.order == 2 and count % 2 == 0:
        count += 1  # else the cut would fall between a step's two evaluations
    begin = max(len(scheduler.timesteps) - count, earliest)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    return scheduler.timesteps[begin:]


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
    output as in DDIM's step. Flow matching's Euler doesn't either: x0 = x_t − σ·v. None for a
    prediction type these formulas do not cover.
    """
    for name in ("pred_original_sample", "denoised"):
        predicted = getattr(step_output, name, None)
        if predicted is not None:
            return predicted
    if hasattr(scheduler, "scale_noise"):  # flow matching: x_t = σ·ε + (1 − σ)·x0, v = ε − x0
        sigma = timestep.to(sample.device, sample.dtype) / scheduler.config.num_train_timesteps
        return sample - sigma * model_output
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
