"""The recipe file's shape as pydantic models: the source of `batchgen schema`, and the first
check of a recipe. Shape errors become `Problem`s at the right line, one per field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from batchgen.recipe.problems import PathKey, Problem, YamlDocument, did_you_mean

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class Range(_Strict):
    """`{start, stop, step}` or `{start, stop, num}`; stop is included."""

    start: float
    stop: float
    step: float | None = Field(default=None, gt=0)
    num: StrictInt | None = Field(default=None, ge=1)


class SeedRange(_Strict):
    """`{start: 1000, count: 8}`: the seeds 1000 … 1007."""

    start: StrictInt = Field(ge=0, le=MAX_SEED)
    count: StrictInt = Field(ge=1)


VariationMode = Literal["noise", "feedback"]
VariationCount = Annotated[StrictInt, Field(ge=0, le=1000)]
VariationAmount = Annotated[float, Field(ge=0.0, le=1.0)]


class Variations(_Strict):
    """InvokeAI's -v/-n on img2img. noise: after each job, `count` jobs whose starting noise is
    slerped `amount` of the way toward another seed's; feedback: each image is the init image
    of the next job, `count` times. Count and amount may be lists: both are sweep axes."""

    count: VariationCount | list[VariationCount] = Field(
        default=0, description="Variations (noise) or iterations (feedback) per job; 0: none"
    )
    amount: VariationAmount | list[VariationAmount] = Field(
        default=0.1, description="noise: how far toward the variation seed's noise, 0-1"
    )
    mode: VariationMode = "noise"


RefinerSwitch = Annotated[float, Field(gt=0.0, lt=1.0)]


class RefinerSpec(_Strict):
    """`refiner: {model, switch}`: AUTOMATIC1111's Refiner. The SDXL refiner takes over the
    denoising once `switch` of the noise schedule is done (diffusers' `denoising_end` on the
    model, `denoising_start` on the refiner). Both may be lists: both are sweep axes."""

    model: str | list[str] = Field(
        description="An SDXL refiner: a diffusers folder, a hub id in the local cache or a "
        "single file, e.g. sd_xl_refiner_1.0.safetensors"
    )
    switch: RefinerSwitch | list[RefinerSwitch] = Field(
        default=0.8,
        description="A1111's 'Refiner switch at': the fraction of the schedule done before the "
        "refiner takes over, between 0 and 1",
    )


# The sweep axes a grid can lay out, by the names of their manifest columns.
AxisName = Literal[
    "model",
    "init_image",
    "prompt",
    "strength",
    "steps",
    "cfg",
    "seed",
    "scheduler",
    "variation_seed",
    "variation_strength",
    "iteration",
    "refiner",
    "refiner_switch",
]


class GridSpec(_Strict):
    """A comparison grid, as in AUTOMATIC1111's X/Y/Z plot: `x` across, `y` down, one sub-grid
    per `z` value; one grid per combination of the other swept axes that `where` leaves open."""

    x: AxisName
    y: AxisName | None = None
    z: AxisName | None = None
    where: dict[AxisName, StrictInt | float | str | list[StrictInt | float | str]] = Field(
        default_factory=dict,
        description="Only the jobs with these values, e.g. {seed: 1592514025} or {strength: [0.4]}",
    )
    cell: StrictInt | None = Field(
        default=None, ge=16, le=4096, description="Longest side of a cell in px; default: ≤ 256"
    )
    margin: StrictInt = Field(default=4, ge=0, le=256, description="Gap between cells in px")
    show_init: StrictBool = Field(
        default=False, description="A first column (a first row when x is init_image) of inits"
    )
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        max_length=100,
        description="File name in grids/ without .png; default from the axes: strength-x-prompt",
    )

    @field_validator("y", "z")
    @classmethod
    def _axes_differ(cls, axis: str | None, info: ValidationInfo) -> str | None:
        taken = [info.data.get(other) for other in ("x", "y") if other != info.field_name]
        if axis is not None and axis in taken:
            raise PydanticCustomError(
                "grid_axes", "`{axis}` is already another axis of this grid", {"axis": axis}
            )
        return axis

    @field_validator("where")
    @classmethod
    def _values_fit_their_axes(
        cls, where: dict[str, int | float | str | list[int | float | str]]
    ) -> dict[str, list[int | float | str]]:
        """Each axis's values as a list of the axis's type, so that `--where seed=7` from the
        command line means what `where: {seed: 7}` means in a recipe."""
        kinds: dict[str, type] = {
            "steps": int,
            "seed": int,
            "strength": float,
            "cfg": float,
            "variation_seed": int,
            "variation_strength": float,
            "iteration": int,
            "refiner_switch": float,
        }
        normal: dict[str, list[int | float | str]] = {}
        for axis, given in where.items():
            values = given if isinstance(given, list) else [given]
            kind = kinds.get(axis, str)
            if not values:
                raise PydanticCustomError(
                    "grid_where", "`{axis}: []` matches nothing", {"axis": axis}
                )
            fractions = kind is int and any(
                isinstance(value, float) and not value.is_integer() for value in values
            )
            try:
                converted = [kind(value) for value in values]
            except ValueError:
                converted = []
            if fractions or not converted:
                wanted = "whole numbers" if kind is int else "numbers"
                raise PydanticCustomError(
                    "grid_where",
                    "{axis} values are {wanted}, got {values}",
                    {"axis": axis, "wanted": wanted, "values": str(values)},
                )
            normal[axis] = converted
        return normal


Strength = Annotated[float, Field(ge=0.0, le=1.0)]
Steps = Annotated[StrictInt, Field(ge=1)]
Cfg = Annotated[float, Field(ge=0.0)]
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
Size = Annotated[StrictInt, Field(ge=8, multiple_of=8)]


class SchedulerChoice(_Strict):
    """`{name: k_dpmpp_2, karras: true}`: a scheduler with options, the same as the name
    `k_dpmpp_2:karras`."""

    name: str
    karras: StrictBool = False
    timestep_spacing: Literal["leading", "linspace", "trailing"] | None = None

    def as_name(self) -> str:
        options = [*(["karras"] if self.karras else []), *filter(None, [self.timestep_spacing])]
        return f"{self.name}:{','.join(options)}" if options else self.name


class IntermediatesSpec(_Strict):
    """`intermediates: {mode, x0}`: how each job's strip of latent steps is drawn."""

    mode: Literal["approximate", "exact"] = Field(
        default="approximate",
        description="approximate: a linear latent→RGB projection (cheap); exact: VAE decodes",
    )
    x0: StrictBool = Field(default=True, description="A second row: the predicted final image")


class RecipeFile(_Strict):
    """A batchgen recipe (v1): init images × prompts × strengths × steps × cfg × seeds."""

    model_config = ConfigDict(title="batchgen recipe")

    name: str | None = Field(default=None, description="Output folder name; default: file stem")
    model: str | list[str] = Field(
        default="builtin:tiny",
        description="builtin:tiny, a diffusers folder, or a hub id in the local cache; a list "
        "sweeps models (always the outermost loop)",
    )
    config: str | None = Field(
        default=None,
        description="For single-file checkpoints: the architecture to load them with, sd15, "
        "sd2 (768-v), sd2-base, builtin:<name> or a diffusers folder; default: from the "
        "tensor shapes",
    )
    vae: str | None = Field(
        default=None,
        description="A VAE replacing the model's: a .safetensors/.ckpt file, a diffusers VAE "
        "folder, or a pipeline folder whose vae/ is used",
    )
    refiner: RefinerSpec | None = Field(
        default=None, description="SDXL only: {model: <refiner>, switch: 0.8}"
    )
    variant: str | None = Field(
        default=None, description="Weight variant of diffusers folders, e.g. fp16"
    )
    scheduler: str | SchedulerChoice | list[str | SchedulerChoice] = Field(
        default="k_lms", description="InvokeAI sampler name (k_lms, ddim, …) or diffusers class"
    )
    init_images: str | list[str] = Field(
        description="Paths relative to the recipe file; globs allowed"
    )
    prompts: str | list[str] | None = None
    prompts_file: str | None = Field(default=None, description="One prompt a line")
    negative_prompt: str = ""
    prompt_2: str = Field(
        default="",
        description="SDXL and SD 3: the prompt of their second CLIP text encoder (OpenCLIP "
        "bigG); default: the same prompt",
    )
    negative_prompt_2: str = Field(
        default="", description="SDXL and SD 3: the second CLIP text encoder's negative prompt"
    )
    strength: Strength | list[Strength] | Range = 0.75
    steps: Steps | list[Steps] | Range = 50
    steps_mode: Literal["nominal", "effective"] = Field(
        default="nominal",
        description="nominal: the denoiser takes int(steps*strength); effective: exactly steps",
    )
    cfg: Cfg | list[Cfg] | Range = 7.5
    seeds: Seed | list[Seed] | SeedRange
    clip_skip: StrictInt = Field(
        default=1,
        ge=1,
        le=12,
        description="AUTOMATIC1111's Clip skip: 1 uses CLIP's last layer, 2 the one before "
        "(diffusers' clip_skip is this minus 1)",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        default="auto", description="auto: float16 on CUDA, float32 elsewhere; --dtype overrides"
    )
    width: Size | None = None
    height: Size | None = None
    fit: StrictBool = Field(
        default=False, description="Downscale the init image to fit width×height, keeping aspect"
    )
    upscale_small: StrictBool = Field(
        default=False,
        description="Scale init images smaller than the model's native size (512 for SD 1.x) up "
        "to it before encoding (IMG2IMG.md: img2img misbehaves below it)",
    )
    keep_size: StrictBool = Field(
        default=False, description="With upscale_small: scale each output back down to its size"
    )
    variations: Variations = Field(default_factory=Variations)
    with_variations: list[tuple[Seed, VariationAmount]] = Field(
        default_factory=list,
        description="[[seed, amount], …] applied in order before `variations` (InvokeAI -V): "
        "reproduces or refines a variation",
    )
    mask: str | None = Field(
        default=None,
        description="A mask image for every init image: white (or transparent) is redrawn, "
        "black kept; default: each init image's own transparent pixels",
    )
    mask_blur: StrictInt = Field(
        default=4, ge=0, le=256, description="Feathering of the mask's edge, in px"
    )
    invert_mask: StrictBool = Field(default=False, description="Redraw what the mask keeps")
    include: list[dict[str, Any]] = Field(default_factory=list)
    exclude: list[dict[str, Any]] = Field(default_factory=list)
    output: str | None = Field(default=None, description="Default: outputs/<name>")
    intermediates: StrictBool | IntermediatesSpec = Field(
        default=False,
        description="Save a strip of the latents at every step per job: true (approximate, "
        "with predicted x0) or {mode: approximate|exact, x0: bool}",
    )
    grids: list[GridSpec] = Field(default_factory=list)


RECIPE_KEYS: tuple[str, ...] = tuple(RecipeFile.model_fields)


def recipe_json_schema() -> dict[str, Any]:
    schema = RecipeFile.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _child(node: Any, part: str | int) -> tuple[bool, Any]:
    if isinstance(node, dict) and part in node:
        return True, node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return True, node[part]
    return False, None


def _data_path(data: Any, loc: tuple[str | int, ...]) -> PathKey:
    """Pydantic's error location without its union-member tags: only real keys and indexes."""
    path: list[str | int] = []
    node = data
    for part in loc:
        found, child = _child(node, part)
        if found:
            node = child
        elif not (isinstance(node, dict) and not path and isinstance(part, str)):
            continue  # a union member's tag, not a place in the file
        path.append(part)  # (or a missing top-level field, named by its key)
    return tuple(path)


def _shape_problems(doc: YamlDocument, error: ValidationError) -> list[Problem]:
    """One problem per field: for a union, the error that got deepest into the value."""
    best: dict[PathKey, tuple[PathKey, ErrorDetails]] = {}
    for item in error.errors():
        path = _data_path(doc.data, tuple(item["loc"]))
        if path[:1] not in best or len(path) > len(best[path[:1]][0]):
            best[path[:1]] = (path, item)
    problems = []
    for path, item in best.values():
        message = item["msg"]
        hint = FIELD_HINTS.get(str(path[0])) if path else None
        if item["type"] == "extra_forbidden":
            choices = RECIPE_KEYS if len(path) == 1 else _nested_keys(path[0])
            hint = did_you_mean(str(path[-1]), choices) or f"known keys: {', '.join(choices)}"
            message = "unknown key"
        elif item["type"] == "missing":
            message = "is required"
            hint = _REQUIRED_HINTS.get(str(path[-1]), hint)
        elif item["type"] == "literal_error":
            expected = re.findall(r"'([^']*)'", str(item.get("ctx", {}).get("expected", "")))
            hint = did_you_mean(str(item["input"]), expected)
        problems.append(doc.problem(path, message, hint))
    return problems


def _nested_keys(top: str | int) -> tuple[str, ...]:
    nested: dict[str, type[BaseModel]] = {
        "variations": Variations,
        "grids": GridSpec,
        "seeds": SeedRange,
        "refiner": RefinerSpec,
    }
    model = nested.get(str(top), Range)
    return tuple(model.model_fields)


_REQUIRED_HINTS = {
    "init_images": "list the pictures to start from, e.g. `init_images: [pictures/fire.png]`",
    "seeds": "give a seed or a list, e.g. `seeds: [1592514025]` or `seeds: {start: 1, count: 4}`",
}
FIELD_HINTS = {
    "strength": "a number 0–1, a list, or a range {start, stop, step|num}",
    "steps": "a whole number ≥ 1, a list, or a range {start, stop, step|num}",
    "cfg": "a number ≥ 0, a list, or a range {start, stop, step|num}",
    "seeds": "a seed, a list of seeds, or {start, count}",
    "width": "a multiple of 8, e.g. 512",
    "height": "a multiple of 8, e.g. 512",
    "with_variations": "a list of [seed, amount] pairs, e.g. [[1592514025, 0.1]]",
}


# Stand-ins for required fields that are missing or wrong, so that the other fields still get
# every check and one `validate` reports all problems.
_PLACEHOLDERS: dict[str, Any] = {"init_images": [], "seeds": 0}


def validate_shape(doc: YamlDocument) -> tuple[RecipeFile, list[Problem]]:
    """The file's shape; on errors, the shape of the fields that are fine, and the errors."""
    try:
        return RecipeFile.model_validate(doc.data), []
    except ValidationError as error:
        problems = _shape_problems(doc, error)
        bad_keys = {item["loc"][0] for item in error.errors() if item["loc"]}
    good = {key: value for key, value in doc.data.items() if key not in bad_keys}
    return RecipeFile.model_validate(_PLACEHOLDERS | good), problems


# Validators for one value of a numeric axis, shared by ranges and include/exclude entries.
AXIS_ITEM: dict[str, TypeAdapter[Any]] = {
    "strength": TypeAdapter(Strength),
    "steps": TypeAdapter(Steps),
    "cfg": TypeAdapter(Cfg),
    "seed": TypeAdapter(Seed),
    "variation_count": TypeAdapter(VariationCount),
    "variation_amount": TypeAdapter(VariationAmount),
}
