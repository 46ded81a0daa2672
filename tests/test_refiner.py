"""`refiner: {model, switch}` through a run: A1111's Refiner and "Refiner switch at" swept,
recorded in the manifest, the PNG's text and the job id (only when used), laid out in grids;
and the refiners, switches and models that cannot work refused by `validate`, before anything
loads. The pixels' parity with diffusers' base-then-refiner pipelines is tests/test_sdxl.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from batchgen.models.source import resolve_model
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from tests.helpers import invoke, manifest, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SWEEP = """
init_images: [pictures/gradient.png]
prompts: [fire]
negative_prompt: smoke
strength: 0.7
steps: 6
scheduler: k_euler
seeds: [7]
"""


def refined(model: Path | str, refiner: Path | str, switch: str = "[0.5, 0.8]") -> str:
    return f"model: {model}\nrefiner:\n  model: {refiner}\n  switch: {switch}\n{SWEEP}"


def test_a_refined_sweep_records_the_refiner_and_its_switch(
    tmp_path: Path, tiny_sdxl_folder: Path, tiny_refiner_folder: Path
) -> None:
    text = refined(tiny_sdxl_folder, tiny_refiner_folder) + "grids:\n  - {x: refiner_switch}\n"
    code, output = invoke("run", str(write_recipe(tmp_path, text)), "--device", "cpu")
    assert code == 0, output
    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    refiner = resolve_model(str(tiny_refiner_folder), Path("."))
    assert [(row["refiner"], float(row["refiner_switch"])) for row in rows] == [
        (refiner.identity, 0.5),
        (refiner.identity, 0.8),
    ]
    assert {row["status"] for row in rows} == {"done"}
    assert len({row["id"] for row in rows}) == len({row["sha256"] for row in rows}) == 2
    with Image.open(run_dir / rows[1]["path"]) as image:
        parameters = image.info["parameters"]
    assert f"Refiner: tiny-refiner [{refiner.short_hash}], Refiner switch at: 0.8" in parameters
    assert (run_dir / "grids" / "refiner_switch.png").is_file()
    code, output = invoke("grid", str(run_dir), "--x", "refiner", "--y", "refiner_switch")
    assert code == 0, output
    assert (run_dir / "grids" / "refiner-x-refiner_switch.png").is_file()
    lock = yaml.safe_load((run_dir / "recipe.lock.yaml").read_text(encoding="utf-8"))
    locked = {"reference": str(tiny_refiner_folder), "identity": refiner.identity}
    assert lock["refiner"] == [locked]
    assert lock["refiner_switch"] == [0.5, 0.8]


def test_without_a_refiner_nothing_of_it_is_in_the_jobs_or_the_lock(
    tmp_path: Path, tiny_sdxl_folder: Path, tiny_refiner_folder: Path
) -> None:
    plain = load_recipe(write_recipe(tmp_path, f"model: {tiny_sdxl_folder}\n{SWEEP}"))
    assert "refiner" not in plain.axes and "refiner" not in plain.locked()
    with_refiner = tmp_path / "refined.yaml"
    with_refiner.write_text(refined(tiny_sdxl_folder, tiny_refiner_folder, "0.8"))
    recipe = load_recipe(with_refiner)
    assert list(recipe.axes)[:2] == ["model", "refiner"]  # each refiner loads once


def test_refiners_that_cannot_work_are_refused_with_where_and_what_to_do(
    tmp_path: Path, tiny_sdxl_folder: Path, tiny_refiner_folder: Path
) -> None:
    # An SDXL base given as the refiner, and an SD 1.x model to refine.
    recipe = write_recipe(tmp_path, refined("builtin:tiny", tiny_sdxl_folder, "0.8"))
    with pytest.raises(RecipeError) as caught:
        load_recipe(recipe)
    problems = {problem.field: problem for problem in caught.value.problems}
    assert set(problems) == {"refiner", "refiner.model"}
    message = problems["refiner.model"].message
    assert "is a Stable Diffusion XL model, not an SDXL refiner" in message
    assert problems["refiner.model"].line == 3
    assert "`builtin:tiny` is a Stable Diffusion 1.x/2.x model" in problems["refiner"].message
    assert problems["refiner"].hint == "use an SDXL base model as `model:`, or remove `refiner:`"

    # The refiner itself as the model, and a switch outside (0, 1).
    (tmp_path / "other.yaml").write_text(refined(tiny_refiner_folder, tiny_refiner_folder))
    with pytest.raises(RecipeError, match="is an SDXL refiner"):
        load_recipe(tmp_path / "other.yaml")
    for switch in ("1.0", "0", "[0.5, 1.2]"):
        (tmp_path / "switch.yaml").write_text(
            refined(tiny_sdxl_folder, tiny_refiner_folder, switch)
        )
        with pytest.raises(RecipeError) as caught:
            load_recipe(tmp_path / "switch.yaml")
        assert [problem.field.split("[")[0] for problem in caught.value.problems] == [
            "refiner.switch"
        ], switch
