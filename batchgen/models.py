"""Resolving a recipe's `model:` to a local diffusers folder and a stable identity.

A reference is `builtin:<name>`, a diffusers folder (absolute or relative to the recipe), or a
hub id found in the local Hugging Face cache. Torch-free and offline on purpose: `validate` and
`plan` resolve models without importing torch, and nothing here ever downloads.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import batchgen
from batchgen.hashcache import folder_sha256

# Set before huggingface_hub is imported (it reads this once): a model missing from the cache
# must fail fast with our message, not stall a batch run on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ModelKind = Literal["builtin", "folder", "hub"]

BUILTIN_DIR = Path(batchgen.__file__).parent / "builtin"
BUILTIN_PREFIX = "builtin:"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# The hub's repo id rule: owner/name, letters, digits, "-", "_" and ".".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


@dataclass(frozen=True)
class ModelSource:
    reference: str  # as written in the recipe
    kind: ModelKind
    path: Path  # a local diffusers folder (has model_index.json)
    identity: str  # stable text for job ids, see resolve_model
    name: str  # display name, AUTOMATIC1111's "Model:" field
    short_hash: str  # AUTOMATIC1111's "Model hash": 10 hex digits


class ModelNotFoundError(ValueError):
    """The message names what was looked for and where; `hint` says what to do next."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def resolve_model(reference: str, base_dir: Path) -> ModelSource:
    """Find the diffusers folder `reference` names; `base_dir` is the recipe's folder.

    Identities: `builtin:<name>@<16 hex of the model files' sha256>`, `folder:<absolute path>`,
    `hub:<repo id>@<snapshot commit>`.
    """
    if reference.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(reference)
    if reference.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise _single_file_error(reference, base_dir)
    folder = (base_dir / reference).expanduser().absolute()
    if reference.startswith((".", "/", "~")) or folder.is_dir():
        return _resolve_folder(reference, folder)
    if HUB_ID.fullmatch(reference):
        return _resolve_hub(reference, not_a_folder=folder)
    hint = f"write `{BUILTIN_PREFIX}{reference}`" if reference in builtin_names() else None
    raise ModelNotFoundError(
        f"model `{reference}` is not `{BUILTIN_PREFIX}<name>`, a folder (none at {folder}) "
        "or a hub id `owner/name`",
        hint=hint or "point `model:` at a diffusers folder (one with model_index.json)",
    )


def builtin_names() -> list[str]:
    return sorted(path.parent.name for path in BUILTIN_DIR.glob(f"*/{PIPELINE_INDEX}"))


def _resolve_builtin(reference: str) -> ModelSource:
    name = reference.removeprefix(BUILTIN_PREFIX)
    known = builtin_names()
    if name not in known:
        available = ", ".join(BUILTIN_PREFIX + known_name for known_name in known) or "none"
        raise ModelNotFoundError(
            f"unknown builtin model `{reference}` (looked in {BUILTIN_DIR}); "
            f"available: {available}",
            # An empty list means a source checkout where the folder was never generated.
            hint=None if known else "generate it with `make tiny-model`",
        )
    path = BUILTIN_DIR / name
    digest = folder_sha256(path)
    return ModelSource(
        reference=reference,
        kind="builtin",
        path=path,
        identity=f"{BUILTIN_PREFIX}{name}@{digest[:16]}",
        name=name,
        short_hash=digest[:10],
    )


def _resolve_folder(reference: str, folder: Path) -> ModelSource:
    folder = folder.resolve()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model folder `{reference}` not found: {folder} does not exist",
            hint="relative paths are relative to the recipe's folder",
        )
    if not (folder / PIPELINE_INDEX).is_file():
        raise ModelNotFoundError(
            f"model folder {folder} has no {PIPELINE_INDEX}, so it is not a diffusers pipeline",
            hint="point `model:` at the folder that holds model_index.json "
            "(what `save_pretrained` or `hf download` writes)",
        )
    digest = folder_sha256(folder)  # the weights, not the path: a moved copy is the same model
    return ModelSource(
        reference, "folder", folder, f"folder:{digest[:16]}", folder.name, digest[:10]
    )


def _single_file_error(reference: str, base_dir: Path) -> ModelNotFoundError:
    path = (base_dir / reference).expanduser().resolve()
    found = "" if path.is_file() else f" (and {path} does not exist)"
    return ModelNotFoundError(
        f"model `{reference}` is a single-file checkpoint; those are not supported yet{found}",
        hint="convert it to a diffusers folder (diffusers' "
        "scripts/convert_original_stable_diffusion_to_diffusers.py, or "
        "`StableDiffusionImg2ImgPipeline.from_single_file(...).save_pretrained(folder)`) "
        "and point `model:` at that folder",
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (the hub library reads it once
    at import, which would miss a later change)."""
    if cache_dir := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(cache_dir).expanduser()
    if hf_home := os.environ.get("HF_HOME"):
        return Path(hf_home).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def _resolve_hub(repo_id: str, not_a_folder: Path) -> ModelSource:
    # Imported here: it costs a quarter second, which builtin and folder models never pay.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache_dir = hub_cache_dir()
    try:
        snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"hub model `{repo_id}` is not in the local Hugging Face cache ({cache_dir}), "
            f"nor is there a folder {not_a_folder}; batchgen never downloads",
            hint=f"download it on a machine with network (`hf download {repo_id}`) and copy "
            "the cache over (HF_HUB_CACHE or HF_HOME select it), or point `model:` at a "
            "diffusers folder",
        ) from None
    if not (snapshot / PIPELINE_INDEX).is_file():
        raise ModelNotFoundError(
            f"hub model `{repo_id}` is cached at {snapshot} but has no {PIPELINE_INDEX}, "
            "so it is not a diffusers pipeline (or only part of it was downloaded)",
            hint=f"download the whole repo with `hf download {repo_id}`",
        )
    # The snapshot folder is named after its commit, which fixes every file in it: no need
    # to hash gigabytes. The short hash is of that identity.
    identity = f"hub:{repo_id}@{snapshot.name}"
    short_hash = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:10]
    return ModelSource(repo_id, "hub", snapshot, identity, repo_id, short_hash)


@dataclass(frozen=True)
class ModelListing:
    reference: str  # what `model:` takes
    kind: ModelKind
    path: Path


def list_models(folders: list[Path]) -> list[ModelListing]:
    """What `model:` can name on this machine: the builtins, diffusers pipelines in the local
    hub cache, and pipelines in (or one level below) the given folders."""
    found = [
        ModelListing(BUILTIN_PREFIX + name, "builtin", BUILTIN_DIR / name)
        for name in builtin_names()
    ]
    for repo in sorted(hub_cache_dir().glob("models--*")):
        snapshots = sorted(repo.glob(f"snapshots/*/{PIPELINE_INDEX}"))
        if snapshots:
            repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
            found.append(ModelListing(repo_id, "hub", snapshots[-1].parent))
    for folder in folders:
        for index in sorted([*folder.glob(PIPELINE_INDEX), *folder.glob(f"*/{PIPELINE_INDEX}")]):
            found.append(ModelListing(str(index.parent), "folder", index.parent))
    return found
