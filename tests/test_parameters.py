"""The table of job parameters agrees with every place a parameter shows: the manifest's
columns, the PNG record, the job id, A1111's infotext, the recipe's keys and the grid axes.
Adding a parameter anywhere without its row (or a row without its use) fails here."""

from __future__ import annotations

import dataclasses
from typing import get_args

from batchgen.jobs.parameters import AXIS_OF_KEY, PARAMETER, PARAMETERS
from batchgen.recipe.schema import AxisName, RecipeFile
from batchgen.store.images import a1111_parameters, job_record
from batchgen.store.manifest import ADDED_COLUMNS, MANIFEST_COLUMNS
from tests.helpers import INIT, JOB, make_job

# The manifest columns that say how a job ran, not what it is.
RUN_COLUMNS = {
    "id", "status", "path", "model_hash", "device", "batch_size", "fast_paths", "seconds",
    "sha256", "error", "finished_at", "batchgen_version",
}  # fmt: skip

# A job that uses every parameter the id holds only when used.
EVERYTHING = make_job(
    negative_prompt="smoke",
    prompt_2="a painting",
    negative_prompt_2="blurry",
    clip_skip=2,
    vae="vae@00ff",
    with_variations=((7, 0.1),),
    variation_seed=8,
    variation_amount=0.2,
    mask=dataclasses.replace(INIT, label="mask.png", sha256="cd" * 32),
    mask_blur=4,
    invert_mask=True,
    parent_id="0123456789abcdef",
    iteration=1,
    final_size=(256, 256),
    refiner="file:00ff",
    refiner_switch=0.8,
    refiner_label="refiner [00ff]",
)

# The job id's keys, by the columns that carry the same facts.
ID_KEY_COLUMNS = {
    "variations": {"variation_seed", "variation_strength", "with_variations"},
    "mask": {"mask", "mask_blur", "invert_mask"},
    "final_size": {"render_size"},
    "refiner": {"refiner", "refiner_switch"},
}


def test_the_rows_are_the_manifests_job_columns_in_order() -> None:
    job_columns = [column for column in MANIFEST_COLUMNS if column not in RUN_COLUMNS]
    assert [parameter.column for parameter in PARAMETERS] == job_columns


def test_the_png_record_holds_every_parameter() -> None:
    assert set(PARAMETER) <= set(job_record(EVERYTHING))


def test_the_id_holds_what_the_table_says() -> None:
    def columns(keys: set[str]) -> set[str]:
        return set().union(*(ID_KEY_COLUMNS.get(key, {key}) for key in keys))

    plain = set(JOB.pixel_fields())
    used = set(EVERYTHING.pixel_fields()) - plain
    assert columns(plain) == {p.column for p in PARAMETERS if p.in_id == "always"}
    assert columns(used) == {p.column for p in PARAMETERS if p.in_id == "when used"}


def test_the_unused_value_is_what_a_job_without_it_records() -> None:
    record = job_record(JOB)
    for parameter in PARAMETERS:
        if parameter.in_id == "when used":
            assert record[parameter.column] == parameter.unused, parameter.column


def test_older_manifests_are_read_with_every_added_columns_unused_value() -> None:
    for parameter in PARAMETERS:
        if parameter.added_later:
            assert ADDED_COLUMNS[parameter.column] == parameter.unused


def test_a1111_keys_are_the_ones_its_infotext_writes() -> None:
    text = a1111_parameters(EVERYTHING, "tiny", "0123456789", "vae", "abcdef")
    prompt, negative, settings = text.split("\n")
    assert prompt == EVERYTHING.prompt
    written = {pair.split(": ")[0] for pair in settings.split(", ")} | {negative.split(": ")[0]}
    assert {p.a1111 for p in PARAMETERS if p.a1111} <= written


def test_recipe_keys_are_recipe_fields_and_the_grid_axes_are_the_schemas() -> None:
    for parameter in PARAMETERS:
        for key in parameter.recipe_keys:
            assert key in RecipeFile.model_fields, (parameter.column, key)
    assert {p.column for p in PARAMETERS if p.grid_axis} == set(get_args(AxisName))
    assert AXIS_OF_KEY["seeds"] == "seed"
    assert AXIS_OF_KEY["prompts_file"] == "prompt"
