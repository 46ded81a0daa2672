"""Resolving a recipe's `model:` to a local diffusers folder and a stable identity.

A reference is `builtin:<name>`, a diffusers folder (absolute or relative to the recipe), a
hub id found in the local Hugging Face cache, or a single SD 1.x/2.x or SDXL checkpoint file
(`.safetensors`/`.ckpt`) with the shipped config folder that describes its architecture.
Torch-free and offline on purpose: `validate` and `plan` resolve models without importing torch,
and nothing here ever downloads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import batchgen
from batchgen.errors import BatchgenError
from batchgen.models.families import (
    PIPELINE_INDEX,
    FamilyEntry,
    UnsupportedFamilyError,
    family_of_checkpoint,
    family_of_folder,
    is_refiner_folder,
)
from batchgen.models.hashcache import file_sha256s, folder_sha256

# Set before huggingface_hub is imported (it reads this once): a model missing from the cache
# must fail fast with our message, not stall a batch run on network timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ModelKind = Literal["builtin", "folder", "hub", "single_file"]

BUILTIN_DIR = Path(batchgen.__file__).parent / "builtin"
# Weightless diffusers folders for single-file checkpoints (tools/make_sd_configs.py).
CONFIGS_DIR = BUILTIN_DIR / "configs"
SHIPPED_CONFIGS = ("sd15", "sd2", "sd2-base", "sdxl-base", "sdxl-refiner")
# CLIP's BPE vocabulary and merges, which all of them use: shipped once, not in each tokenizer/.
CLIP_BPE_DIR = CONFIGS_DIR / "clip-bpe"
# Those a checkpoint's tensor shapes can tell apart: 2.x base has 768-v's shapes.
DETECTED_CONFIGS = ("sd15", "sd2")
BUILTIN_PREFIX = "builtin:"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# The hub's repo id rule: owner/name, letters, digits, "-", "_" and ".".
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class ModelSource:
    reference: str  # as written in the recipe
    kind: ModelKind
    path: Path  # a local diffusers folder (has model_index.json)
    identity: str  # stable text for job ids, see resolve_model
    name: str  # display name, AUTOMATIC1111's "Model:" field
    short_hash: str  # AUTOMATIC1111's "Model hash": 10 hex digits
    # single_file only: the diffusers folder whose configs describe the checkpoint. None for a
    # `.ckpt`, whose tensor shapes only torch can read: detected when it loads
    # (engine/families/sd_loading.py).
    config: Path | None = None
    family: str = "sd"  # its row of models.families.FAMILIES


@functools.lru_cache(maxsize=64)
def own_scheduler(model: ModelSource) -> str:
    """The diffusers class of the model's own scheduler (its scheduler_config.json's
    `_class_name`), or "" where no config says."""
    folder = model.config or model.path
    try:
        config = json.loads(
            (folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
        )
        return str(config["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@functools.lru_cache(maxsize=64)
def native_side(model: ModelSource) -> int:
    """The image side the model was trained at (its UNet's sample size × the VAE's 8), read
    from its config; SD 1.x's 512 when no config can be read (a `.ckpt`)."""
    folder = model.config or model.path
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 8
    except (OSError, ValueError, KeyError, TypeError):
        return 512


class ModelNotFoundError(BatchgenError):
    """The message names what was looked for and where."""


class ConfigNotFoundError(ModelNotFoundError):
    """A single-file checkpoint's `config` names no config."""


def resolve_model(reference: str, base_dir: Path, config: str | None = None) -> ModelSource:
    """Find the model `reference` names; `base_dir` is the recipe's folder. `config` (single
    files only) overrides the detected architecture: a shipped config (SHIPPED_CONFIGS),
    `builtin:<name>` or a diffusers folder.

    Identities: `builtin:<name>@<16 hex of the model files' sha256>`, `folder:<16 hex>`,
    `hub:<repo id>@<snapshot commit>`, `file:<16 hex of the file's sha256>` (plus
    `+config:<16 hex>` when `config` is given).
    """
    if reference.startswith(BUILTIN_PREFIX):
        return _resolve_builtin(reference)
    if reference.lower().endswith(SINGLE_FILE_SUFFIXES):
        return _resolve_single_file(reference, base_dir, config)
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
        family=family_of_folder(path).name,
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
    family = family_of_folder(folder).name  # before hashing gigabytes of a model it refuses
    digest = folder_sha256(folder)  # the weights, not the path: a moved copy is the same model
    return ModelSource(
        reference, "folder", folder, f"folder:{digest[:16]}", folder.name, digest[:10], None, family
    )


def _resolve_single_file(reference: str, base_dir: Path, config: str | None) -> ModelSource:
    path = _existing_file(reference, base_dir)
    shapes = safetensors_shapes(path) if path.suffix.lower() == ".safetensors" else None
    # A .ckpt's tensor names only torch can read: SD's, unless `config:` says otherwise.
    family = family_of_checkpoint(shapes, path).name if shapes is not None else "sd"
    digest = file_sha256s([path])[path]  # the full content hash, cached by path+mtime+size
    identity = f"file:{digest[:16]}"
    config_folder: Path | None = None
    if config is not None:
        config_folder = _config_folder(config, base_dir)
        family = family_of_folder(config_folder).name
        identity += f"+config:{folder_sha256(config_folder)[:16]}"
    elif shapes is not None:
        config_folder = CONFIG_DETECTORS[family](shapes, path)
    # A1111's "Model hash" is the first 10 hex digits of the file's sha256.
    return ModelSource(
        reference, "single_file", path, identity, path.stem, digest[:10], config_folder, family
    )


def _existing_file(reference: str, base_dir: Path) -> Path:
    path = (base_dir / reference).expanduser().resolve()
    if not path.is_file():
        raise ModelNotFoundError(
            f"checkpoint file `{reference}` not found: {path} does not exist",
            hint="relative paths are relative to the recipe's folder",
        )
    return path


def _config_folder(config: str, base_dir: Path) -> Path:
    if config in SHIPPED_CONFIGS:
        return CONFIGS_DIR / config
    if config.startswith(BUILTIN_PREFIX):
        try:
            return _resolve_builtin(config).path
        except ModelNotFoundError as error:
            raise ConfigNotFoundError(f"config: {error}", error.hint) from None
    folder = (base_dir / config).expanduser().resolve()
    if not (folder / PIPELINE_INDEX).is_file():
        raise ConfigNotFoundError(
            f"config `{config}` is not {', '.join(SHIPPED_CONFIGS)}, `{BUILTIN_PREFIX}<name>` "
            f"or a diffusers folder (no {PIPELINE_INDEX} in {folder})",
            hint="a diffusers folder needs only its configs and tokenizer, no weights",
        )
    return folder


def resolve_vae(reference: str, base_dir: Path) -> ModelSource:
    """A VAE override: a single `.safetensors`/`.ckpt` VAE file (converted with the base model's
    VAE config at load time), an AutoencoderKL folder (config.json and weights), or a diffusers
    pipeline folder, whose `vae/` is used."""
    if reference.lower().endswith(SINGLE_FILE_SUFFIXES):
        path = _existing_file(reference, base_dir)
        digest = file_sha256s([path])[path]
        # The file's name with its suffix: what A1111 writes after "VAE:".
        return ModelSource(
            reference, "single_file", path, f"file:{digest[:16]}", path.name, digest[:10]
        )
    folder = (base_dir / reference).expanduser().resolve()
    if (folder / PIPELINE_INDEX).is_file():
        folder = folder / "vae"
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"vae `{reference}` is neither a .safetensors/.ckpt file nor a folder with an "
            f"AutoencoderKL config.json ({folder})",
            hint="point `vae:` at a VAE file, a diffusers VAE folder or a pipeline folder",
        )
    digest = folder_sha256(folder)
    return ModelSource(
        reference, "folder", folder, f"folder:{digest[:16]}", folder.name, digest[:10]
    )


# Original (CompVis/A1111) checkpoint layout: the UNet lives under this prefix.
UNET_PREFIX = "model.diffusion_model."
UNET_CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the JSON header at the start of a safetensors file: no torch,
    no reading of the weights."""
    with open(path, "rb") as file:
        prefix = file.read(8)
        (header_size,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (0,)
        header = file.read(header_size) if 0 < header_size <= MAX_SAFETENSORS_HEADER else b""
    try:
        entries = json.loads(header)
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        raise ModelNotFoundError(
            f"single-file checkpoint {path} is not a valid safetensors file "
            "(its header does not parse)",
            hint="the file may be truncated: download it again, or point `model:` at a "
            "diffusers folder",
        )
    return {
        key: tuple(entry["shape"])
        for key, entry in entries.items()
        if key != "__metadata__" and isinstance(entry, dict)
    }


def detect_config(shapes: Mapping[str, Sequence[int]], path: Path) -> Path:
    """The config folder whose UNet matches the checkpoint: same first block width (conv_in's
    output channels) and same cross-attention width (the text encoder's: 768 for SD 1.x's CLIP
    ViT-L, 1024 for SD 2.x's OpenCLIP ViT-H). Builtin models are candidates too, so the tiny
    model exported as one file loads with its own configs."""
    conv_in = shapes.get(UNET_CONV_IN)
    if conv_in is None or len(conv_in) != 4:
        raise ModelNotFoundError(
            f"{path} has no Stable Diffusion UNet ({UNET_CONV_IN}); is it a VAE, a LoRA or an "
            "embedding rather than a full model?",
            hint="`model:` takes a full SD 1.x/2.x checkpoint; a VAE file goes under `vae:`",
        )
    if conv_in[1] != 4:
        raise ModelNotFoundError(
            f"{path} is an inpainting or other {conv_in[1]}-channel UNet; img2img needs the "
            "4-channel SD 1.x/2.x UNet",
        )
    context_widths = {
        shape[-1]
        for key, shape in shapes.items()
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight")
    }
    candidates = [CONFIGS_DIR / name for name in DETECTED_CONFIGS]
    candidates += [BUILTIN_DIR / name for name in builtin_names()]
    for folder in candidates:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        if conv_in[0] == unet["block_out_channels"][0] and context_widths == {
            unet["cross_attention_dim"]
        }:
            return folder
    raise ModelNotFoundError(
        f"{path}: cannot tell its architecture (first UNet width {conv_in[0]}, "
        f"cross-attention width {sorted(context_widths)}); known: SD 1.x (320, 768), "
        "SD 2.x (320, 1024)",
        hint="give its diffusers config folder with `config:` next to `model:`",
    )


# SDXL's original layout: the base holds CLIP ViT-L (a transformers model) then OpenCLIP bigG;
# the refiner holds only bigG, as embedder 0.
XL_BASE_ENCODER = "conditioner.embedders.0.transformer."
XL_REFINER_ENCODER = "conditioner.embedders.0.model."


def detect_xl_config(shapes: Mapping[str, Sequence[int]], path: Path) -> Path:
    """`sdxl-base` or `sdxl-refiner`, as the file's first text encoder says."""
    if any(key.startswith(XL_REFINER_ENCODER) for key in shapes):
        kind = "sdxl-refiner"
    elif any(key.startswith(XL_BASE_ENCODER) for key in shapes):
        kind = "sdxl-base"
    else:
        raise ModelNotFoundError(
            f"{path} holds an SDXL UNet but neither the base's nor the refiner's text "
            f"encoders ({XL_BASE_ENCODER}…, {XL_REFINER_ENCODER}…)",
            hint="give a diffusers SDXL folder with `config:` next to `model:`",
        )
    conv_in = shapes.get(UNET_CONV_IN, ())
    if len(conv_in) == 4 and conv_in[1] != 4:
        raise ModelNotFoundError(
            f"{path} is an SDXL inpainting or other {conv_in[1]}-channel UNet, and batchgen "
            f"ships configs for the 4-channel base and refiner only",
            hint="give that model's diffusers folder (its configs are enough) with `config:`",
        )
    return CONFIGS_DIR / kind


def no_single_files(shapes: Mapping[str, Sequence[int]], path: Path) -> Path:
    """A family whose single files batchgen cannot load yet (SD 3: their text encoders come in
    several layouts, with or without T5)."""
    raise ModelNotFoundError(
        f"{path} is a Stable Diffusion 3 checkpoint; batchgen loads SD 3 from diffusers folders "
        "only, so far",
        hint="point `model:` at the model's diffusers folder (or its hub id in the local cache)",
    )


CONFIG_DETECTORS = {"sd": detect_config, "sdxl": detect_xl_config, "sd3": no_single_files}


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
    # Imported here: its import is slow, and builtin and folder models never need it.
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
    family = family_of_folder(snapshot).name
    return ModelSource(repo_id, "hub", snapshot, identity, repo_id, short_hash, None, family)


# An inpainting UNet takes the latents (4), the mask (1) and the masked image's latents (4).
INPAINTING_CHANNELS = 9


@dataclass(frozen=True)
class ModelListing:
    reference: str  # what `model:` takes
    kind: ModelKind
    path: Path
    family: str  # its family's title and variant, or why batchgen would not render it


def list_models(folders: list[Path]) -> list[ModelListing]:
    """What `model:` can name on this machine: the builtins, diffusers pipelines in the local
    hub cache, and pipelines and single-file checkpoints in (or one level below) the given
    folders. Each family is read from configs and safetensors headers: no weights are read,
    hashed or loaded, so a folder of multi-gigabyte checkpoints lists at once."""
    found = [
        _folder_listing(BUILTIN_PREFIX + name, "builtin", BUILTIN_DIR / name)
        for name in builtin_names()
    ]
    for repo in sorted(hub_cache_dir().glob("models--*")):
        snapshots = sorted(repo.glob(f"snapshots/*/{PIPELINE_INDEX}"))
        if snapshots:
            repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
            found.append(_folder_listing(repo_id, "hub", snapshots[-1].parent))
    for folder in folders:
        found += _listings_in(folder)
    return found


def _listings_in(folder: Path) -> list[ModelListing]:
    """The pipelines and single files in `folder` and one level below, by path."""
    indexes = [*folder.glob(PIPELINE_INDEX), *folder.glob(f"*/{PIPELINE_INDEX}")]
    pipelines = [index.parent for index in indexes]
    # A pipeline's own weight files (unet/diffusion_pytorch_model.safetensors) are no models.
    files = [
        path
        for path in (*folder.glob("*"), *folder.glob("*/*"))
        if path.suffix.lower() in SINGLE_FILE_SUFFIXES
        and path.is_file()
        and not any(pipeline in path.parents for pipeline in pipelines)
    ]
    listings = [_folder_listing(str(pipeline), "folder", pipeline) for pipeline in pipelines]
    listings += [ModelListing(str(path), "single_file", path, _file_family(path)) for path in files]
    return sorted(listings, key=lambda listing: listing.path)


def _folder_listing(reference: str, kind: ModelKind, folder: Path) -> ModelListing:
    try:
        entry = family_of_folder(folder)
    except UnsupportedFamilyError as error:
        return ModelListing(reference, kind, folder, _not_renderable(error, folder))
    return ModelListing(reference, kind, folder, _titled(entry, _folder_variant(entry, folder)))


def _folder_variant(entry: FamilyEntry, folder: Path) -> str | None:
    """What the folder's configs tell of its kind: "inpainting", SDXL's "base" or "refiner"."""
    if _unet_in_channels(folder) == INPAINTING_CHANNELS:
        return "inpainting"
    if entry.name != "sdxl":
        return None
    return "refiner" if is_refiner_folder(folder) else "base"


def _unet_in_channels(folder: Path) -> int | None:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        return int(unet["in_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a listing tells what it can; loading the model reports a broken config


def _file_family(path: Path) -> str:
    if path.suffix.lower() != ".safetensors":
        # A .ckpt is a pickle: only torch can list its tensors, and a listing never imports it.
        return "unknown until loaded (a .ckpt)"
    try:
        shapes = safetensors_shapes(path)  # the header only
        entry = family_of_checkpoint(shapes, path)
        return _titled(entry, _file_variant(entry, shapes, path))
    except (UnsupportedFamilyError, ModelNotFoundError) as error:
        # LoRAs and VAEs sit beside the models: listed with what they seem to be, not fatal.
        return _not_renderable(error, path)


def _file_variant(
    entry: FamilyEntry, shapes: Mapping[str, Sequence[int]], path: Path
) -> str | None:
    """What the file's tensors tell of its kind: "inpainting", SDXL's "base" or "refiner"."""
    conv_in = shapes.get(UNET_CONV_IN, ())
    if len(conv_in) == 4 and conv_in[1] == INPAINTING_CHANNELS:
        return "inpainting"
    if entry.name != "sdxl":
        return None
    return detect_xl_config(shapes, path).name.removeprefix("sdxl-")


def _titled(entry: FamilyEntry, variant: str | None) -> str:
    return f"{entry.title} ({variant})" if variant else entry.title


def _not_renderable(error: BatchgenError, path: Path) -> str:
    # The path has a column of its own: its name keeps the sentence whole and short.
    return "not renderable: " + error.message.replace(str(path), path.name)
