"""The wheels a lent GPU machine lacks, downloaded into .whl/ (`make gpu-kit`).

That machine (benchmarks/README.md, "On a lent GPU machine"; benchmarks/device.sh runs there)
has Python 3.12, torch, transformers and pytest but no network, no diffusers and no pydantic.
The kit is batchgen's dependency closure, walked in this virtual environment from batchgen's
requirements for CPython 3.12 on Linux x86-64 and stopped at what the machine has (GPU_HAS),
each package at the version installed here, so that it matches what the tests here ran with.
IF_OLDER packages go to .whl/if-older/, which device.sh installs only where the machine's copy
is older (the kit's pydantic wants typing-extensions >= 4.16). Wheels already there are kept,
stale ones removed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# What the GPU machine has of batchgen's dependency closure (its package list is longer).
GPU_HAS = [
    "torch",
    "transformers",
    "tokenizers",
    "accelerate",
    "safetensors",
    "huggingface-hub",
    "numpy",
    "scipy",
    "pillow",
    "pyyaml",
    "click",
    "tqdm",
    "rich",
    "filelock",
    "regex",
    "requests",
    "httpx",
    "packaging",
    "typing-extensions",
    "zipp",
    "jinja2",
    "fsspec",
    "pytest",
]
IF_OLDER = ["typing-extensions"]
# The machine: CPython 3.12 on Linux x86-64, as pip and requirement markers see it.
PIP_TARGET = [
    "--no-deps",
    "--only-binary=:all:",
    "--python-version=3.12",
    "--implementation=cp",
    *(
        f"--platform={platform}"
        for platform in (
            "manylinux_2_28_x86_64",
            "manylinux_2_27_x86_64",
            "manylinux_2_17_x86_64",
            "manylinux2014_x86_64",
            "manylinux1_x86_64",
        )
    ),
]
MARKERS = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def needs(distribution: str) -> Iterator[str]:
    """The distribution's requirements that apply on the GPU machine."""
    for text in metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(MARKERS):
            yield canonicalize_name(requirement.name)


def installed_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"gpu-kit: {name} is not installed in this venv; run make setup")


def kit_contents(kit: Path) -> dict[Path, dict[str, str]]:
    """Folder → package → version: the closure the machine lacks, and the IF_OLDER ones."""
    has = {canonicalize_name(name) for name in GPU_HAS}
    missing: dict[str, str] = {}
    todo = list(needs("batchgen"))
    while todo:
        name = todo.pop()
        if name not in has and name not in missing:
            missing[name] = installed_version(name)
            todo.extend(needs(name))
    if_older = {canonicalize_name(name): installed_version(name) for name in IF_OLDER}
    return {kit: missing, kit / "if-older": if_older}


def sync(folder: Path, packages: dict[str, str]) -> None:
    """Leave exactly these wheels in `folder`: stale ones removed, missing ones downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    present = set()
    for wheel in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if name in packages and Version(packages[name]) == version:
            present.add(name)
        else:
            print(f"gpu-kit: removing stale {wheel}")
            wheel.unlink()
    for name, version in sorted(packages.items()):
        if name not in present:
            pip = [sys.executable, "-m", "pip", "download", "-q", *PIP_TARGET, "-d", str(folder)]
            subprocess.run([*pip, f"{name}=={version}"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=Path(".whl"), help="default: .whl")
    kit = parser.parse_args().kit
    for folder, packages in kit_contents(kit).items():
        sync(folder, packages)
    total = 0
    for wheel in sorted(kit.rglob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel}")
    print(f"{total / 2**20:8.2f} MiB  in all")


if __name__ == "__main__":
    main()
