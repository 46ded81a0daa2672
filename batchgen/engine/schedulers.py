"""Scheduler (sampler) names: InvokeAI's short names and diffusers class names, with options.

A scheduler is written `name` or `name:option,option`, e.g. `k_dpmpp_2:karras` (A1111's
"DPM++ 2M" with "Schedule type: Karras") or `ddim:trailing`; recipes may also write the
mapping `{name: k_dpmpp_2, karras: true}`, which means the same.

Torch-free on purpose: `validate` and `plan` check names without importing diffusers. The
engine turns a `SchedulerSpec` into a diffusers scheduler with `from_config`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from batchgen.errors import BatchgenError
from batchgen.recipe.problems import did_you_mean


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str  # the diffusers class
    a1111_name: str  # what AUTOMATIC1111 writes as "Sampler:" in the PNG text
    config: dict[str, object] = field(default_factory=dict)  # overrides on the model's config
    options: tuple[str, ...] = ()  # the user's options, sorted: part of the job id
    schedule_type: str = ""  # A1111's "Schedule type:" (Karras), empty for the default
    # Flow matching's (SD 3, FLUX), for velocity-predicting transformers; the others are the
    # noise-predicting UNets' (SD 1.x/2.x, SDXL). Neither kind works on the other's models.
    flow: bool = False

    @property
    def canonical(self) -> str:
        """The class and options, whatever name chose them: what the job id records."""
        return (
            ":".join((self.class_name, ",".join(self.options)))
            if self.options
            else (self.class_name)
        )


# InvokeAI's sampler names, as its CLI's -A option takes them.
INVOKEAI_SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "plms": SchedulerSpec("PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    "k_lms": SchedulerSpec("LMSDiscreteScheduler", "LMS"),
    "k_euler": SchedulerSpec("EulerDiscreteScheduler", "Euler"),
    "k_euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "k_heun": SchedulerSpec("HeunDiscreteScheduler", "Heun"),
    "k_dpm_2": SchedulerSpec("KDPM2DiscreteScheduler", "DPM2"),
    "k_dpm_2_a": SchedulerSpec("KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    "k_dpmpp_2": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M"),
}

# diffusers classes that work with an SD img2img loop and need nothing beyond our dependencies.
_EXTRA_CLASSES: dict[str, str] = {
    "DDPMScheduler": "DDPM",
    "DEISMultistepScheduler": "DEIS",
    "DPMSolverSinglestepScheduler": "DPM++ 2S",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}

DIFFUSERS_SCHEDULERS: dict[str, SchedulerSpec] = {
    spec.class_name: SchedulerSpec(spec.class_name, spec.a1111_name)
    for spec in INVOKEAI_SCHEDULERS.values()
} | {name: SchedulerSpec(name, label) for name, label in _EXTRA_CLASSES.items()}
# PNDM without PRK steps is what SD checkpoints ship; with them img2img skips oddly.
DIFFUSERS_SCHEDULERS["PNDMScheduler"] = INVOKEAI_SCHEDULERS["plms"]

# Flow matching's schedulers, by a short name and by class, with the names Forge writes.
FLOW_SCHEDULERS: dict[str, SchedulerSpec] = {
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", "Euler", flow=True),
    "flow_heun": SchedulerSpec("FlowMatchHeunDiscreteScheduler", "Heun", flow=True),
}
DIFFUSERS_SCHEDULERS |= {spec.class_name: spec for spec in FLOW_SCHEDULERS.values()}

# The UNet families' names (flow matching's are FLOW_SCHEDULER_NAMES).
SCHEDULER_NAMES: tuple[str, ...] = tuple(
    name
    for name in (*INVOKEAI_SCHEDULERS, *DIFFUSERS_SCHEDULERS)
    if not (INVOKEAI_SCHEDULERS.get(name) or DIFFUSERS_SCHEDULERS[name]).flow
)
FLOW_SCHEDULER_NAMES: tuple[str, ...] = (
    *FLOW_SCHEDULERS,
    *(s.class_name for s in FLOW_SCHEDULERS.values()),
)


# Options a scheduler name may carry, and the config they set on the diffusers class.
SCHEDULER_OPTIONS: dict[str, dict[str, object]] = {
    "karras": {"use_karras_sigmas": True},
    "leading": {"timestep_spacing": "leading"},
    "linspace": {"timestep_spacing": "linspace"},
    "trailing": {"timestep_spacing": "trailing"},
}


class UnknownSchedulerError(BatchgenError):
    def __init__(self, name: str, option: str | None = None) -> None:
        if option is not None:
            super().__init__(
                f"unknown scheduler option `{option}` in `{name}`; known: "
                f"{', '.join(SCHEDULER_OPTIONS)}",
                did_you_mean(option, list(SCHEDULER_OPTIONS)),
            )
        else:
            super().__init__(
                f"unknown scheduler `{name}`; known: {', '.join(INVOKEAI_SCHEDULERS)} "
                "or a diffusers class name such as `EulerDiscreteScheduler`",
                did_you_mean(name, list(SCHEDULER_NAMES)),
            )


@functools.lru_cache(maxsize=256)  # once per name, not once per job; callers never mutate it
def scheduler_spec(name: str) -> SchedulerSpec:
    """The scheduler a name (with its options, if any) stands for."""
    base_name, _, option_text = name.partition(":")
    base = (
        INVOKEAI_SCHEDULERS.get(base_name)
        or FLOW_SCHEDULERS.get(base_name)
        or DIFFUSERS_SCHEDULERS.get(base_name)
    )
    if base is None:
        raise UnknownSchedulerError(base_name)
    options = tuple(sorted({o.strip() for o in option_text.split(",") if o.strip()}))
    config = dict(base.config)
    for option in options:
        if option not in SCHEDULER_OPTIONS:
            raise UnknownSchedulerError(name, option)
        config |= SCHEDULER_OPTIONS[option]
    schedule_type = "Karras" if "karras" in options else ""
    return SchedulerSpec(
        base.class_name, base.a1111_name, config, options, schedule_type, flow=base.flow
    )
