"""Loading a model's components — tokenizer, text encoder, VAE, UNet, scheduler config — onto a
device, from a diffusers folder or from a single SD 1.x/2.x checkpoint file.

A recipe must never run code. Components are loaded with fixed classes (never a pipeline or
class named by the model folder, never `trust_remote_code`), and pickled weights (`.ckpt`,
`.bin`) are read only with `torch.load(weights_only=True)`, which unpickles tensors and plain
containers and refuses everything else.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
from transformers import CLIPTextModel, CLIPTokenizer

from batchgen.engine.families.base import place
from batchgen.errors import BatchgenError
from batchgen.models.source import CLIP_BPE_DIR, CONFIGS_DIR, ModelSource, detect_config

# mypy sees diffusers' lazily imported model classes as opaque (no `encode`, not callable), so
# to the type checker they are Any, like engine.Scheduler.
Vae = Any  # AutoencoderKL
UNet = Any  # UNet2DConditionModel


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: Vae
    unet: UNet
    scheduler_config: dict[str, Any]  # each job builds its scheduler class from it


class ModelLoadError(BatchgenError):
    """A model that loads but cannot work as it is."""


class CheckpointError(ModelLoadError):
    """A checkpoint that cannot be loaded safely or completely."""


def load_components(
    source: ModelSource,
    torch_dtype: torch.dtype,
    device: str,
    *,
    vae: ModelSource | None = None,
    variant: str | None = None,
    offload: bool = False,
) -> Components:
    """The model's components in `torch_dtype` on `device`, in eval mode without gradients
    (with `offload`, in CPU memory until each runs: `place`).

    `vae` replaces the model's VAE; `variant` (e.g. "fp16") selects diffusers folders' variant
    weight files (`*.fp16.safetensors`) and does not apply to single files.
    """
    if source.kind == "single_file":
        checkpoint = read_checkpoint(source.path)
        config = source.config or detect_config(
            {key: tuple(tensor.shape) for key, tensor in checkpoint.items()}, source.path
        )
        components = _components_from_checkpoint(checkpoint, source.path, config, torch_dtype)
        del checkpoint  # gigabytes; the models hold their own copies now
    else:
        config = source.path
        components = _components_from_folder(source.path, torch_dtype, variant)
    if vae is not None:
        components.vae = load_vae(vae, torch_dtype, base_config=config)
    place((components.text_encoder, components.unet, components.vae), device, offload)
    return components


def _components_from_folder(
    folder: Path, torch_dtype: torch.dtype, variant: str | None
) -> Components:
    text_encoder = CLIPTextModel.from_pretrained(
        folder,
        subfolder="text_encoder",
        **weights_options(folder / "text_encoder", torch_dtype, variant),
    )
    return Components(
        tokenizer=load_tokenizer(folder, max_length=positions(text_encoder)),
        text_encoder=text_encoder,
        vae=AutoencoderKL.from_pretrained(
            folder, subfolder="vae", **weights_options(folder / "vae", torch_dtype, variant)
        ),
        unet=UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", **weights_options(folder / "unet", torch_dtype, variant)
        ),
        scheduler_config=scheduler_config(folder),
    )


def load_tokenizer(
    folder: Path, subfolder: str = "tokenizer", max_length: int | None = None
) -> CLIPTokenizer:
    """The CLIP tokenizer in `folder`/`subfolder`. batchgen's shipped configs keep only their
    special tokens there and share one copy of CLIP's vocabulary and merges (CLIP_BPE_DIR).

    `max_length`, the text encoder's positions: a tokenizer must not pad beyond them. One
    without `model_max_length` in its config pads to transformers' 10^30, and every prompt
    then fails with "OverflowError: int too big to convert"; refused here, once, at load."""
    shared_bpe: dict[str, Any] = {}
    if folder.resolve().parent == CONFIGS_DIR.resolve():
        shared_bpe = {
            "vocab_file": str(CLIP_BPE_DIR / "vocab.json"),
            "merges_file": str(CLIP_BPE_DIR / "merges.txt"),
        }
    tokenizer: CLIPTokenizer = CLIPTokenizer.from_pretrained(
        folder, subfolder=subfolder, local_files_only=True, **shared_bpe
    )
    if max_length is not None and tokenizer.model_max_length > max_length:
        raise ModelLoadError(
            f"{folder / subfolder} pads prompts to {tokenizer.model_max_length:,} tokens, and "
            f"its text encoder takes {max_length}: its tokenizer_config.json has no (or a "
            "wrong) `model_max_length`",
            hint=f'add "model_max_length": {max_length} to '
            f"{folder / subfolder / 'tokenizer_config.json'}",
        )
    return tokenizer


def positions(text_encoder: Any) -> int:
    """How many tokens a text encoder takes (77 for CLIP)."""
    return int(text_encoder.config.max_position_embeddings)


def weights_options(
    component: Path, torch_dtype: torch.dtype, variant: str | None
) -> dict[str, Any]:
    """safetensors where the folder has them; otherwise the `.bin` pickles, which diffusers
    0.42 (`model_loading_utils.load_state_dict`) and transformers 5.24 (`modeling_utils.
    load_state_dict`, `weights_only=True` by default) both read with `torch.load(weights_only=
    True)`, so a `.bin` that holds anything but tensors is refused, not run."""
    return {
        "local_files_only": True,
        "use_safetensors": any(component.glob("*.safetensors")),
        "dtype": torch_dtype,
        "variant": variant,
    }


def scheduler_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "scheduler" / SCHEDULER_CONFIG_NAME
    config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
    return config


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A single-file checkpoint's tensors, read without running any code from it."""
    if path.suffix.lower() == ".safetensors":
        checkpoint: Any = safetensors.torch.load_file(path)
    else:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = str(error).splitlines()[-1].strip()[:300]
            raise CheckpointError(
                f"{path} is a pickle that needs more than tensors to load ({reason}); "
                "batchgen never runs code from a model file",
                hint="if you trust the file, convert it to safetensors once: "
                f"{_convert_command(path)} and point `model:` at the .safetensors file",
            ) from None
    # Lightning/CompVis checkpoints nest the weights, with training state beside them.
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return {key: value for key, value in checkpoint.items() if isinstance(value, torch.Tensor)}


def _convert_command(path: Path) -> str:
    target = path.with_suffix(".safetensors")
    return (
        'python -c "import torch, safetensors.torch as st; '
        f"sd = torch.load('{path}', map_location='cpu', weights_only=False); "
        "sd = sd.get('state_dict', sd); "
        "st.save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, "
        f"'{target}')\""
    )


def _components_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], path: Path, config: Path, torch_dtype: torch.dtype
) -> Components:
    """diffusers' own single-file converters — what `StableDiffusionImg2ImgPipeline.
    from_single_file(path, config=config)` runs per component — given the state dict we read
    safely, with `config` a local diffusers folder so that nothing is looked up on the hub."""
    options: dict[str, Any] = {
        "config": str(config),
        "local_files_only": True,
        "torch_dtype": torch_dtype,
    }
    with converting("unet", path, config):
        unet = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **options)
    with converting("vae", path, config):
        vae = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **options)
    with converting("text_encoder", path, config):
        text_encoder = create_diffusers_clip_model_from_ldm(
            CLIPTextModel, checkpoint, subfolder="text_encoder", **options
        )
    return Components(
        tokenizer=load_tokenizer(config, max_length=positions(text_encoder)),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler_config=scheduler_config(config),
    )


def load_vae(source: ModelSource, torch_dtype: torch.dtype, base_config: Path) -> Vae:
    """A VAE override: a diffusers AutoencoderKL folder, or a single VAE file converted with
    the base model's VAE config (`base_config/vae`)."""
    if source.kind != "single_file":
        return AutoencoderKL.from_pretrained(
            source.path, **weights_options(source.path, torch_dtype, None)
        )
    with converting("vae", source.path, base_config):
        vae = AutoencoderKL.from_single_file(
            read_checkpoint(source.path),
            config=str(base_config),
            subfolder="vae",
            local_files_only=True,
            torch_dtype=torch_dtype,
        )
    return vae


@contextmanager
def converting(name: str, path: Path, config: Path) -> Iterator[None]:
    """Weights a checkpoint lacks stay on the meta device, and diffusers' cast to the dtype then
    fails with "Cannot copy out of meta tensor"; say which file, component and config instead."""
    try:
        yield
    except NotImplementedError as error:
        if "meta tensor" not in str(error):
            raise
        raise CheckpointError(
            f"{path} lacks {name} weights that config {config} expects",
            hint="the file may be truncated, or of another architecture: give the right "
            "config folder with `config:`",
        ) from None
