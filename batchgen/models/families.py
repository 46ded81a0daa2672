"""The model families batchgen renders, as one table, and which family a model is.

A family is known without importing torch — from a diffusers folder's `model_index.json`
(`_class_name`) or a single file's tensor names — so `validate` and `plan` refuse a model
batchgen cannot render before anything loads. Each row names the class that renders the
family (`engine/families/`), imported only when a run loads the model. Stable Diffusion
1.x/2.x registers through `register_family`, as any other family does.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchgen.errors import BatchgenError

PIPELINE_INDEX = "model_index.json"  # what makes a folder a diffusers pipeline


@dataclass(frozen=True)
class FamilyEntry:
    name: str  # what ModelSource.family holds: "sd"
    title: str  # how messages name it
    pipelines: tuple[str, ...]  # model_index.json `_class_name`s of its diffusers folders
    # A single file is of the family when one of its tensor names starts with one of these.
    checkpoint_prefixes: tuple[str, ...]
    # "module:Class" of its engine/families class (or the class itself, for a test's family).
    implementation: str | type
    # Flow matching (SD 3, FLUX): its schedulers are flow matching's, and a recipe that names
    # none gets the model's own instead of batchgen's default (k_lms).
    flow_matching: bool = False

    def load_class(self) -> Any:
        """The class that loads and runs models of this family (imports torch)."""
        if not isinstance(self.implementation, str):
            return self.implementation
        module, _, name = self.implementation.partition(":")
        return getattr(importlib.import_module(module), name)


class UnsupportedFamilyError(BatchgenError):
    """A model of a family batchgen does not render (yet); `hint` lists those it does."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint or f"batchgen renders: {supported()}")


FAMILIES: dict[str, FamilyEntry] = {}

# Families people bring that have no row yet: named, so that a refusal says what the model is.
# Their tensor prefixes are checked before the rendered families'.
NOT_YET_RENDERED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FLUX": (
        ("FluxPipeline", "FluxImg2ImgPipeline"),
        ("double_blocks.", "model.diffusion_model.double_blocks."),
    ),
}


@dataclass(frozen=True)
class NotAModel:
    """A kind of file people keep beside their checkpoints that holds no model to render."""

    what: str  # "a LoRA": how a message names it
    markers: tuple[str, ...]  # a tensor name holding one of these is of the kind…
    only_prefixes: tuple[str, ...] = ()  # …or one whose every tensor name starts with these
    hint: str = ""

    def matches(self, keys: list[str]) -> bool:
        if any(marker in key for key in keys for marker in self.markers):
            return True
        return bool(self.only_prefixes) and all(key.startswith(self.only_prefixes) for key in keys)


NOT_MODELS = (
    NotAModel(
        "a LoRA (or LyCORIS) file",
        # kohya/A1111, diffusers/PEFT, diffusers' older attention processors, LyCORIS
        ("lora_down", "lora_up", "lora_A.", "lora_B.", "lora_unet_", "lora_te", "_lora.", "hada_")
        + ("lokr_",),
        hint="batchgen does not apply LoRAs yet: give `model:` the checkpoint it was made for",
    ),
    NotAModel(
        "a ControlNet",
        ("control_model.", "controlnet_cond_embedding", "controlnet_down_blocks"),
        hint="batchgen has no ControlNet: give `model:` a full checkpoint",
    ),
    NotAModel(
        "a textual-inversion embedding",
        ("emb_params", "string_to_param"),
        only_prefixes=("clip_l", "clip_g"),  # SDXL's embeddings: one tensor per encoder
        hint="batchgen does not load embeddings yet: give `model:` a full checkpoint",
    ),
    NotAModel(
        "a VAE",
        (),
        only_prefixes=(
            "encoder.",
            "decoder.",
            "quant_conv.",
            "post_quant_conv.",
            "first_stage_model.",
        ),
        hint="give it as `vae:` (it replaces the model's VAE), with a full checkpoint as `model:`",
    ),
)


def register_family(entry: FamilyEntry) -> None:
    """Add a family to the table (a new one, or a test's); its name and pipelines must be new."""
    taken = {pipeline for known in FAMILIES.values() for pipeline in known.pipelines}
    if entry.name in FAMILIES or taken & set(entry.pipelines):
        raise ValueError(f"family {entry.name} or one of its pipelines is registered already")
    FAMILIES[entry.name] = entry


def unregister_family(name: str) -> None:
    FAMILIES.pop(name, None)


def supported() -> str:
    return "; ".join(f"{entry.title} ({', '.join(entry.pipelines)})" for entry in FAMILIES.values())


def family_of_folder(folder: Path) -> FamilyEntry:
    """The family of a diffusers folder, by its pipeline class."""
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text(encoding="utf-8"))
        pipeline = str(index["_class_name"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UnsupportedFamilyError(
            f"{folder / PIPELINE_INDEX} does not name its pipeline class (`_class_name`)"
        ) from None
    for entry in FAMILIES.values():
        if pipeline in entry.pipelines:
            return entry
    for title, (pipelines, _) in NOT_YET_RENDERED.items():
        if pipeline in pipelines:
            raise UnsupportedFamilyError(
                f"model {folder} is {title} ({pipeline} in {PIPELINE_INDEX}), which batchgen "
                "does not render yet"
            )
    raise UnsupportedFamilyError(
        f"model {folder} is a {pipeline} ({PIPELINE_INDEX}), a pipeline batchgen does not render"
    )


def is_refiner_folder(folder: Path) -> bool:
    """Whether a diffusers SDXL folder is a refiner: its pipeline asks for aesthetic scores
    (`requires_aesthetics_score`) or it has no first text encoder, as SDXL's refiner."""
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    first_encoder = index.get("text_encoder")
    no_first_encoder = not isinstance(first_encoder, list) or first_encoder[0] is None
    return bool(index.get("requires_aesthetics_score")) or no_first_encoder


def family_of_checkpoint(keys: Iterable[str], path: Path) -> FamilyEntry:
    """The family of a single-file checkpoint, by its tensor names."""
    keys = list(keys)
    for title, (_, prefixes) in NOT_YET_RENDERED.items():
        if any(key.startswith(prefixes) for key in keys):
            raise UnsupportedFamilyError(
                f"{path} is a {title} checkpoint, which batchgen does not render yet"
            )
    # A family registered later may extend an earlier one's layout (SDXL's checkpoints hold a
    # UNet under SD's `model.diffusion_model.`, and their text encoders under their own
    # prefix): the last family that matches is the most specific.
    for entry in reversed(FAMILIES.values()):
        if any(key.startswith(entry.checkpoint_prefixes) for key in keys):
            return entry
    for kind in NOT_MODELS:
        if keys and kind.matches(keys):
            raise UnsupportedFamilyError(f"{path} is {kind.what}, not a model", kind.hint)
    raise UnsupportedFamilyError(
        f"{path} holds no model batchgen knows (no UNet or transformer of a family it renders);"
        " is it a VAE, a LoRA or an embedding rather than a full model?"
    )


register_family(
    FamilyEntry(
        name="sd",
        title="Stable Diffusion 1.x/2.x",
        pipelines=(
            "StableDiffusionPipeline",
            "StableDiffusionImg2ImgPipeline",
            "StableDiffusionInpaintPipeline",
        ),
        checkpoint_prefixes=("model.diffusion_model.",),
        implementation="batchgen.engine.families.sd:StableDiffusion",
    )
)

register_family(
    FamilyEntry(
        name="sdxl",
        title="Stable Diffusion XL",
        pipelines=(
            "StableDiffusionXLPipeline",
            "StableDiffusionXLImg2ImgPipeline",
            "StableDiffusionXLInpaintPipeline",
        ),
        checkpoint_prefixes=("conditioner.embedders.",),
        implementation="batchgen.engine.families.sdxl:StableDiffusionXL",
    )
)

register_family(
    FamilyEntry(
        name="sd3",
        title="Stable Diffusion 3",
        pipelines=("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline"),
        checkpoint_prefixes=("model.diffusion_model.joint_blocks.", "joint_blocks."),
        implementation="batchgen.engine.families.sd3:StableDiffusion3",
        flow_matching=True,
    )
)
