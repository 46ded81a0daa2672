"""The recipe's checks across its models: what a model's family allows of the other fields
(second prompts, a refiner, the kind of scheduler), and `refiner:` resolved into its axes.
Torch-free, as the rest of recipe/: the families are known from models/families.py's table.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from batchgen.engine.schedulers import FLOW_SCHEDULER_NAMES, UnknownSchedulerError, scheduler_spec
from batchgen.models.families import FAMILIES, UnsupportedFamilyError, is_refiner_folder
from batchgen.models.source import (
    ModelNotFoundError,
    ModelSource,
    own_scheduler,
    resolve_model,
)
from batchgen.recipe.problems import PathKey
from batchgen.recipe.schema import RecipeFile, RefinerSpec

# The recipe keys that go to a second text encoder, and the families that have one.
SECOND_PROMPTS = ("prompt_2", "negative_prompt_2")
TWO_ENCODERS = frozenset({"sdxl", "sd3"})
# The axes of `refiner:`, in a recipe's axes only when it has one: the refiner right after the
# model (each loads once), its switch just before the variations.
REFINER_AXES = ("refiner", "refiner_switch")

# How a check reports a problem: at a field's path, with a message and a hint.
Fail = Callable[[PathKey, str, str | None], None]


def _is_flow_scheduler(name: str) -> bool:
    try:
        return scheduler_spec(name).flow
    except UnknownSchedulerError:
        return False  # reported where the name is checked


def refiner_values(spec: RefinerSpec | None) -> tuple[Any, Any]:
    return (spec.model, spec.switch) if spec is not None else (None, None)


def is_sdxl_refiner(source: ModelSource) -> bool:
    """Whether a model is an SDXL refiner, from its (or its config's) model_index.json."""
    folder = source.config or source.path
    return source.family == "sdxl" and is_refiner_folder(folder)


def describe_model(source: ModelSource) -> str:
    """What a model is, for messages: "an SDXL refiner", "a Stable Diffusion 1.x/2.x model"."""
    if is_sdxl_refiner(source):
        return "an SDXL refiner"
    return f"a {FAMILIES[source.family].title} model"


class ModelChecks:
    """The checks of one recipe file's `shape` (its top-level keys `written`, its folder
    `base`), each problem reported through `fail`."""

    def __init__(self, shape: RecipeFile, written: Collection[str], base: Path, fail: Fail):
        self.shape = shape
        self.written = written
        self.base = base
        self.fail = fail

    def check_second_prompts(self, models: Sequence[ModelSource]) -> None:
        """`prompt_2` and `negative_prompt_2` go to a second text encoder, which only some
        families have."""
        single_encoder = [model.reference for model in models if model.family not in TWO_ENCODERS]
        for key in SECOND_PROMPTS:
            if getattr(self.shape, key) and single_encoder:
                self.fail(
                    (key,),
                    "goes to a second CLIP text encoder (SDXL's and SD 3's OpenCLIP bigG), and "
                    f"{', '.join(single_encoder)} has only one",
                    "remove it, or use an SDXL or SD 3 model",
                )

    def refiner_axes(self) -> dict[str, tuple[Any, ...]]:
        """`refiner:`'s models and switches as the axes `refiner` and `refiner_switch`; none
        without it, so that a recipe without a refiner has the axes it always had."""
        spec = self.shape.refiner
        if spec is None:
            return {}
        listed = isinstance(spec.model, list)
        references = spec.model if isinstance(spec.model, list) else [spec.model]
        if not references:
            self.fail(("refiner", "model"), "is empty", "name the SDXL refiner")
        refiners = []
        for index, reference in enumerate(references):
            where: PathKey = ("refiner", "model", index) if listed else ("refiner", "model")
            source = self._refiner(where, reference)
            if source is not None:
                refiners.append(source)
        _, switches = refiner_values(spec)
        switch_list = switches if isinstance(switches, list) else [switches]
        if not switch_list:
            self.fail(("refiner", "switch"), "is empty", "e.g. `switch: 0.8`")
        return {
            "refiner": tuple(dict.fromkeys(refiners)),
            "refiner_switch": tuple(dict.fromkeys(float(value) for value in switch_list)),
        }

    def _refiner(self, where: PathKey, reference: str) -> ModelSource | None:
        try:
            # Its own architecture, detected: `config:` describes the models' single files.
            source = resolve_model(reference, self.base)
        except (ModelNotFoundError, UnsupportedFamilyError) as error:
            self.fail(where, str(error), error.hint)
            return None
        if not is_sdxl_refiner(source):
            self.fail(
                where,
                f"`{reference}` is {describe_model(source)}, not an SDXL refiner",
                "give SDXL's refiner (sd_xl_refiner_1.0), or remove `refiner:`",
            )
            return None
        return source

    def check_refined_models(self, models: Sequence[ModelSource]) -> None:
        """A refiner continues the denoising of an SDXL base model's latents."""
        if self.shape.refiner is None:
            return
        others = [model for model in models if model.family != "sdxl" or is_sdxl_refiner(model)]
        for model in others:
            self.fail(
                ("refiner",),
                f"continues the denoising of an SDXL base model, and `{model.reference}` is "
                f"{describe_model(model)}",
                "use an SDXL base model as `model:`, or remove `refiner:`",
            )

    def check_scheduler_kinds(
        self, models: Sequence[ModelSource], schedulers: Sequence[str]
    ) -> None:
        """Flow-matching models take flow matching's schedulers, the others theirs; a recipe
        that names none gives a flow model its own, which batchgen must know."""
        written = "scheduler" in self.written
        for model in models:
            flow = FAMILIES[model.family].flow_matching
            if not written:
                own = own_scheduler(model)
                if flow and not _is_flow_scheduler(own):
                    self.fail(
                        ("model",),
                        f"`{model.reference}`'s own scheduler `{own or '(none)'}` is not one "
                        "batchgen runs flow-matching models with",
                        f"name one: `scheduler: {FLOW_SCHEDULER_NAMES[0]}`",
                    )
                continue
            wrong = [name for name in schedulers if _is_flow_scheduler(name) != flow]
            if wrong:
                kind = "flow-matching" if flow else "noise-predicting UNet"
                right = FLOW_SCHEDULER_NAMES[:2] if flow else ("k_lms", "k_euler")
                self.fail(
                    ("scheduler",),
                    f"{', '.join(f'`{name}`' for name in wrong)} cannot run `{model.reference}`, "
                    f"a {FAMILIES[model.family].title} ({kind}) model",
                    f"use {' or '.join(right)}, or see `batchgen schedulers`"
                    + ("; left out, the model's own is used" if flow else ""),
                )
