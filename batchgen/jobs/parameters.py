"""Every job parameter once: where a recipe sets it, whether it is a sweep axis, its manifest
column, its key in A1111's infotext, its title in grids, whether the job id holds it, and what
a manifest made before it existed means by leaving it out.

The rows follow manifest.csv's column order (a test holds the table, `ManifestRow`,
`job_record`, `Job.pixel_fields`, A1111's infotext and the grid axes to it). Adding a
parameter is one row here plus its use: the recipe field, the `Job` field, how it renders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "when used": the id holds it only when a job uses it, so that jobs without it keep the ids
# they had before the parameter existed.
InId = Literal["always", "when used", "no"]


@dataclass(frozen=True)
class Parameter:
    column: str  # in manifest.csv and in the PNG's `batchgen` record
    title: str  # in grids, tables and messages
    recipe_keys: tuple[str, ...] = ()  # top-level recipe keys that set it; () when derived
    sweeps: bool = False  # a recipe key gives it a list of values, multiplied into the matrix
    grid_axis: bool = False  # a grid can lay it out (`x`, `y`, `z`, `where`)
    a1111: str = ""  # its key in A1111's `parameters` text; "" when A1111 has none
    in_id: InId = "always"
    # The value of a job that does not use it. For a column a newer version added, older
    # manifests' rows mean this too; a grid does not title an axis holding only it.
    unused: object = None
    added_later: bool = False  # older manifests may lack the column


PARAMETERS: tuple[Parameter, ...] = (
    Parameter("index", "#", in_id="no"),  # position in the matrix: file names, display
    Parameter(
        "init_image", "init image", ("init_images",), sweeps=True, grid_axis=True, in_id="no"
    ),  # its label: the id holds its bytes' hash, the next column
    Parameter("init_image_sha256", "init image sha256"),
    # A1111 writes the prompt as its text's first line, without a key.
    Parameter("prompt", "prompt", ("prompts", "prompts_file"), sweeps=True, grid_axis=True),
    Parameter("negative_prompt", "negative prompt", ("negative_prompt",), a1111="Negative prompt"),
    # SDXL's second text encoder (OpenCLIP bigG); "" gives it the prompt above, as diffusers.
    Parameter(
        "prompt_2", "prompt 2", ("prompt_2",), in_id="when used", unused="", added_later=True
    ),
    Parameter(
        "negative_prompt_2",
        "negative prompt 2",
        ("negative_prompt_2",),
        in_id="when used",
        unused="",
        added_later=True,
    ),
    Parameter(
        "strength",
        "strength",
        ("strength",),
        sweeps=True,
        grid_axis=True,
        a1111="Denoising strength",
    ),
    # As written; the id holds steps_nominal, which steps_mode decides from it.
    Parameter("steps", "steps", ("steps",), sweeps=True, grid_axis=True, in_id="no"),
    Parameter("steps_mode", "steps mode", ("steps_mode",), in_id="no"),
    Parameter("steps_nominal", "steps handed to the scheduler", a1111="Steps"),
    Parameter("steps_taken", "steps taken", in_id="no"),  # steps_nominal × strength
    Parameter("cfg", "CFG", ("cfg",), sweeps=True, grid_axis=True, a1111="CFG scale"),
    Parameter("seed", "seed", ("seeds",), sweeps=True, grid_axis=True, a1111="Seed"),
    Parameter(
        "scheduler", "scheduler", ("scheduler",), sweeps=True, grid_axis=True, a1111="Sampler"
    ),
    Parameter("clip_skip", "clip skip", ("clip_skip",), a1111="Clip skip", unused=1),
    Parameter("width", "width", ("width",), a1111="Size"),
    Parameter("height", "height", ("height",), a1111="Size"),
    Parameter("fit", "fit", ("fit",), in_id="no"),  # how the size was chosen; the id has the size
    # upscale_small + keep_size: the size rendered at before scaling down to width × height.
    Parameter(
        "render_size",
        "render size",
        ("upscale_small", "keep_size"),
        in_id="when used",
        unused="",
        added_later=True,
    ),
    Parameter("model", "model", ("model",), sweeps=True, grid_axis=True, a1111="Model"),
    Parameter("vae", "VAE", ("vae",), a1111="VAE", unused=""),
    # From `refiner: {model, switch}`: SDXL's refiner takes the steps after the switch.
    Parameter(
        "refiner",
        "refiner",
        ("refiner",),
        grid_axis=True,
        a1111="Refiner",
        in_id="when used",
        unused="",
        added_later=True,
    ),
    Parameter(
        "refiner_switch",
        "refiner switch at",
        ("refiner",),
        grid_axis=True,
        a1111="Refiner switch at",
        in_id="when used",
        unused=0.0,
        added_later=True,
    ),
    Parameter("dtype", "dtype", ("dtype",)),
    # From `variations`: each variation is a job of its own.
    Parameter(
        "variation_seed",
        "variation seed",
        grid_axis=True,
        a1111="Variation seed",
        in_id="when used",
        unused=-1,
        added_later=True,
    ),
    Parameter(
        "variation_strength",
        "variation strength",
        grid_axis=True,
        a1111="Variation seed strength",
        in_id="when used",
        unused=0.0,
        added_later=True,
    ),
    Parameter(
        "with_variations",
        "with variations",
        ("with_variations",),
        in_id="when used",
        unused="",
        added_later=True,
    ),
    # From `iterations` (feedback): the job whose image is this job's init image.
    Parameter("parent_id", "parent", in_id="when used", unused="", added_later=True),
    Parameter("iteration", "iteration", grid_axis=True, in_id="no", unused=0, added_later=True),
    Parameter("mask", "mask", ("mask",), in_id="when used", unused="", added_later=True),
    Parameter(
        "mask_blur", "mask blur", ("mask_blur",), in_id="when used", unused=0, added_later=True
    ),
    Parameter(
        "invert_mask",
        "invert mask",
        ("invert_mask",),
        in_id="when used",
        unused=False,
        added_later=True,
    ),
)

PARAMETER: dict[str, Parameter] = {parameter.column: parameter for parameter in PARAMETERS}

# Recipe key → the axis it sweeps.
AXIS_OF_KEY: dict[str, str] = {
    key: parameter.column
    for parameter in PARAMETERS
    if parameter.sweeps
    for key in parameter.recipe_keys
}

# What manifests older than a column mean by its absence.
OLDER_MANIFESTS_MEAN: dict[str, object] = {
    parameter.column: parameter.unused for parameter in PARAMETERS if parameter.added_later
}
