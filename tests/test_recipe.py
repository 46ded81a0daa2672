"""Recipes: what a user writes, what they get back when it is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from batchgen.jobs.matrix import check
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.recipe.schema import recipe_json_schema
from tests.helpers import DATA, write

BAD_RECIPES = sorted((DATA / "bad_recipes").glob("*.yaml"))
EXPECT = re.compile(r"^# expect: (\d*): ([^:]*): (.+)$")


def _problems(path: Path) -> list[str]:
    try:
        recipe = load_recipe(path)
    except RecipeError as error:
        return [str(problem) for problem in error.problems]
    return [str(problem) for problem in check(recipe)]


@pytest.mark.parametrize("path", BAD_RECIPES, ids=lambda p: p.stem)
def test_bad_recipe_is_reported_with_file_line_field_and_hint(path: Path) -> None:
    expectations = [EXPECT.match(line) for line in path.read_text().splitlines()]
    expectations = [match for match in expectations if match]
    assert expectations, f"{path.name} states no `# expect:` line"
    problems = _problems(path)
    assert len(problems) == len(expectations), problems
    for match, problem in zip(expectations, problems, strict=True):
        line, field, texts = match.groups()
        where = f"{path}:{line}: " if line else f"{path}: "
        assert problem.startswith(where + (f"{field}: " if field else "")), problem
        for text in texts.split(" | "):
            assert text in problem, problem


def test_scalars_lists_and_both_range_forms(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path,
            """
init_images: pictures/red.png
prompts: fire
strength: {start: 0.3, stop: 0.9, step: 0.2}
cfg: {start: 5, stop: 8, num: 3}
steps: [10, 20]
seeds: {start: 1000, count: 3}
""",
        )
    )
    assert recipe.axes["strength"] == (0.3, 0.5, 0.7, 0.9)
    assert recipe.axes["cfg"] == (5.0, 6.5, 8.0)
    assert recipe.axes["steps"] == (10, 20)
    assert list(recipe.axes["seed"]) == [1000, 1001, 1002]
    assert recipe.axes["prompt"] == ("fire",)
    assert recipe.swept == {"strength", "cfg", "steps", "seed"}


def test_globs_and_prompts_file_are_relative_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("fire\n\ncheery open fire, photograph\n")
    recipe = load_recipe(
        write(
            tmp_path,
            """
init_images: [pictures/*.png]
prompts_file: prompts.txt
seeds: 1
""",
        )
    )
    assert [image.label for image in recipe.axes["init_image"]] == [
        "pictures/blue-wide.png",
        "pictures/red.png",
    ]
    assert recipe.axes["prompt"] == ("fire", "cheery open fire, photograph")


def test_defaults_fill_in_and_output_goes_to_outputs_name(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path, "init_images: pictures/red.png\nprompts: x\nseeds: 1\n", name="my-sweep.yaml"
        )
    )
    assert recipe.name == "my-sweep"
    assert recipe.output == (Path("outputs") / "my-sweep").absolute()
    assert [model.reference for model in recipe.axes["model"]] == ["builtin:tiny"]
    assert recipe.axes["scheduler"] == ("k_lms",)
    assert recipe.steps_mode == "nominal"


def test_explicit_output_is_relative_to_the_recipe(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(
            tmp_path,
            """
init_images: pictures/red.png
prompts: x
seeds: 1
output: runs/here
""",
        )
    )
    assert recipe.output == tmp_path / "runs" / "here"


def test_schema_is_generated_from_the_recipe_model() -> None:
    schema = recipe_json_schema()
    assert schema["title"] == "batchgen recipe"
    assert {"init_images", "prompts", "strength", "seeds", "steps_mode"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False
    assert "init_images" in schema["required"]
