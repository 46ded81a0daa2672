"""Device and dtype names, torch-free: what `plan` assumes, what the engine then confirms.

`plan` must answer without importing torch, so for `--device auto` it guesses CUDA from the
driver's files; `run` resolves the device with torch itself (engine.resolve_device).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16")


def guess_device(device: str) -> str:
    if device != "auto":
        return device
    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


def default_dtype(dtype: str, device: str) -> str:
    """`auto` is fp16 on CUDA (what SD checkpoints are made for) and fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "float16" if device.startswith("cuda") else "float32"


def slurm_cpu_threads(env: Mapping[str, str] = os.environ) -> int | None:
    """The CPUs Slurm gave this task (`--cpus-per-task`), as the thread count for a CPU run,
    when OMP_NUM_THREADS does not set one. Slurm sets no thread count, and torch's default
    follows the machine, not the allocation: CPU pixels change in the last bits with the
    thread count, so shards that pick their own would not match each other's runs."""
    cpus = env.get("SLURM_CPUS_PER_TASK", "")
    if env.get("OMP_NUM_THREADS") or not cpus.isdigit() or int(cpus) < 1:
        return None
    return int(cpus)


@dataclass(frozen=True)
class FastPaths:
    """Speed-ups that change pixels within a tolerance, all off unless asked for; the
    manifest's `fast_paths` column names those that were on. (SDPA attention is torch 2's and
    diffusers' default, and the dtype is part of the job itself.)"""

    channels_last: bool = False  # UNet and VAE in NHWC: faster convolutions on tensor cores
    compile: bool = False  # torch.compile of the UNet: minutes of warm-up per shape, then faster
    vae_tiling: bool = False  # decode/encode large images tile by tile: less memory
    vae_slicing: bool = False  # decode a batch one image at a time: less memory
    tf32: bool = False  # TF32 float32 matmuls and convolutions on Ampere and later GPUs

    def __str__(self) -> str:
        """The ones on, comma-separated: what the manifest records ("" for none)."""
        return ",".join(field.name for field in fields(self) if getattr(self, field.name))


NO_FAST_PATHS = FastPaths()


class FastPathFailedError(RuntimeError):
    """A fast path asked for cannot work on this machine (`compile` without a C++ compiler
    for the CPU or Triton for the GPU, or a graph break in the model). Every batch would meet
    it, so a run stops with this instead of failing job after job."""
