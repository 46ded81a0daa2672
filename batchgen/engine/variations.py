"""Noise variations: a job's starting noise moved part of the way toward another seed's.

InvokeAI's `-v`/`-V` and AUTOMATIC1111's "Variation seed" do the same: spherical
interpolation between two Gaussian noise tensors (a straight line between them would shrink
the noise's norm and wash the image out), linear when the two are nearly parallel.
"""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from batchgen.jobs.job import Job

# Above this |cos| the two tensors are nearly parallel and slerp's division is unstable.
PARALLEL = 0.9995


def slerp(amount: float, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """The point `amount` of the way from `start` to `end` along the great circle between
    them (0: start, 1: end); computed in float32 whatever their dtype."""
    a, b = start.float(), end.float()
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    if abs(cos) > PARALLEL:
        mixed = (1 - amount) * a + amount * b
    else:
        angle = torch.tensor(cos).clamp(-1, 1).arccos()
        sin = angle.sin()
        mixed = (torch.sin((1 - amount) * angle) / sin) * a + (torch.sin(amount * angle) / sin) * b
    return mixed.to(start.dtype)


def varied_noise(job: Job, noise: torch.Tensor) -> torch.Tensor:
    """`noise` (one sample's, drawn from the job's seed) slerped toward each of the job's
    variation seeds in turn. Each variation's noise is drawn on the CPU from its seed alone,
    as the job's own noise is, so it is the same on every device."""
    for seed, amount in job.variations:
        generator = torch.Generator("cpu").manual_seed(seed)
        other = randn_tensor(
            noise.shape, generator=generator, device=noise.device, dtype=noise.dtype
        )
        noise = slerp(amount, noise, other)
    return noise
