"""Which device and dtype a process renders on, decided here only.

`plan` answers without importing torch, so for `--device auto` it guesses CUDA from the
driver's files (`guess_device`); `run` resolves the device with torch itself
(`resolve_device`, which imports torch when called), giving each process of a multi-process
launcher its own GPU. Importing this module does not import torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from batchgen.errors import BatchgenError

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


def resolve_device(device: str, env: Mapping[str, str] = os.environ) -> str:
    """`auto` is CUDA if torch sees a GPU, else Apple's MPS, else the CPU; a device named
    explicitly must be usable here, or this raises a ValueError that says what to use. Under
    a multi-process launcher (LOCAL_RANK) `cuda` is the process's own GPU, `cuda:LOCAL_RANK`."""
    return launcher_device(_resolved_with_torch(device), env)


def launcher_device(resolved: str, env: Mapping[str, str]) -> str:
    local_rank = env.get("LOCAL_RANK")
    if resolved == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    return resolved


def check_device(device: str) -> str:
    """`device` if it names a device batchgen knows (whether this machine has it is
    `resolve_device`'s to say), else a ValueError that says what to write."""
    kind, colon, index = device.partition(":")
    if device in ("auto", "cpu", "mps") or (kind == "cuda" and (not colon or index.isdigit())):
        return device
    raise ValueError(f"unknown device `{device}`; use auto, cpu, cuda, cuda:N or mps")


def _resolved_with_torch(device: str) -> str:
    import torch

    check_device(device)
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
    _, colon, index = device.partition(":")
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
    """`auto` is float16 on CUDA and float32 on the CPU and MPS (see default_dtype)."""
    resolved = default_dtype(dtype, device)
    if resolved not in DTYPES:
        raise ValueError(f"unknown dtype `{dtype}`; use auto, {', '.join(DTYPES)}")
    return resolved


def use_cpu_threads(count: int) -> None:
    """The threads torch renders with on the CPU, for this process."""
    import torch

    torch.set_num_threads(count)


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
    # Model CPU offload (diffusers' enable_model_cpu_offload): each model is moved to the GPU
    # for its calls and back when the next one runs: a GPU that cannot hold them all, slower.
    offload: bool = False

    def __str__(self) -> str:
        """The ones on, comma-separated: what the manifest records ("" for none)."""
        return ",".join(field.name for field in fields(self) if getattr(self, field.name))


NO_FAST_PATHS = FastPaths()


class FastPathFailedError(BatchgenError):
    """A fast path asked for cannot work on this machine (`compile` without a C++ compiler
    for the CPU or Triton for the GPU, or a graph break in the model). Every batch would meet
    it, so a run stops with this instead of failing job after job."""
