"""Device and dtype names, torch-free: what `plan` assumes, what the engine then confirms.

`plan` must answer without importing torch, so for `--device auto` it guesses CUDA from the
driver's files; `run` resolves the device with torch itself (engine.resolve_device).
"""

from __future__ import annotations

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
