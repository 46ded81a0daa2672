"""Scheduler (sampler) names: InvokeAI's short names and diffusers class names.

Torch-free on purpose: `validate` and `plan` check names without importing diffusers. The
engine turns a `SchedulerSpec` into a diffusers scheduler with `from_config`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str  # the diffusers class
    a1111_name: str  # what AUTOMATIC1111 writes as "Sampler:" in the PNG text
    config: dict[str, object] = field(default_factory=dict)  # overrides on the model's config


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

SCHEDULER_NAMES: tuple[str, ...] = (*INVOKEAI_SCHEDULERS, *DIFFUSERS_SCHEDULERS)


class UnknownSchedulerError(ValueError):
    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, SCHEDULER_NAMES, n=1, cutoff=0.6)
        self.hint = f"did you mean `{close[0]}`?" if close else None
        super().__init__(
            f"unknown scheduler `{name}`; known: {', '.join(INVOKEAI_SCHEDULERS)} "
            "or a diffusers class name such as `EulerDiscreteScheduler`"
        )


def scheduler_spec(name: str) -> SchedulerSpec:
    spec = INVOKEAI_SCHEDULERS.get(name) or DIFFUSERS_SCHEDULERS.get(name)
    if spec is None:
        raise UnknownSchedulerError(name)
    return spec
