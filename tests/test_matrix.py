"""The job matrix: order, include/exclude, ids that resume and CI verification rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgen.jobs.matrix import check, expand
from batchgen.recipe.load import load_recipe
from tests.helpers import write

BASE = """
init_images: pictures/red.png
prompts: [fire, water]
strength: [0.4, 0.7]
steps: 10
seeds: [1, 2]
"""


def jobs(folder: Path, text: str, name: str = "recipe.yaml", dtype: str = "float32"):
    return list(expand(load_recipe(write(folder, text, name)), dtype))


def test_order_is_the_nested_order_of_the_axes_as_written(tmp_path: Path) -> None:
    order = [(j.prompt, j.strength, j.seed) for j in jobs(tmp_path, BASE)]
    assert order == [
        ("fire", 0.4, 1),
        ("fire", 0.4, 2),
        ("fire", 0.7, 1),
        ("fire", 0.7, 2),
        ("water", 0.4, 1),
        ("water", 0.4, 2),
        ("water", 0.7, 1),
        ("water", 0.7, 2),
    ]
    assert [j.index for j in jobs(tmp_path, BASE)] == list(range(1, 9))


def test_same_recipe_twice_gives_the_same_ids(tmp_path: Path) -> None:
    assert [j.id for j in jobs(tmp_path, BASE)] == [j.id for j in jobs(tmp_path, BASE)]


def test_reordered_keys_change_the_order_but_not_the_ids(tmp_path: Path) -> None:
    reordered = """
seeds: [1, 2]
steps: 10
strength: [0.4, 0.7]
prompts: [fire, water]
init_images: pictures/red.png
"""
    first, second = jobs(tmp_path, BASE), jobs(tmp_path, reordered, "other.yaml")
    assert [j.seed for j in second[:2]] == [1, 1]  # seeds are now the outermost loop
    assert sorted(j.id for j in first) == sorted(j.id for j in second)


def test_ids_do_not_depend_on_the_output_folder(tmp_path: Path) -> None:
    moved = BASE + "output: somewhere/else\n"
    assert [j.id for j in jobs(tmp_path, BASE)] == [j.id for j in jobs(tmp_path, moved, "o.yaml")]


@pytest.mark.parametrize(
    "change",
    [
        "negative_prompt: blurry\n",
        "clip_skip: 2\n",
        "cfg: 9\n",
        "scheduler: ddim\n",
        "width: 32\nheight: 32\n",
        "model: ../tiny-copy\n",
    ],
)
def test_any_pixel_determining_change_gives_new_ids(tmp_path: Path, change: str) -> None:
    if "tiny-copy" in change:
        import shutil

        from batchgen.models.source import resolve_model

        shutil.copytree(resolve_model("builtin:tiny", tmp_path).path, tmp_path / "tiny-copy")
        (tmp_path / "sub").mkdir()
        changed = jobs(tmp_path / "sub", BASE + change)
    else:
        changed = jobs(tmp_path, BASE + change, "changed.yaml")
    assert not {j.id for j in jobs(tmp_path, BASE)} & {j.id for j in changed}


def test_dtype_and_init_image_bytes_are_part_of_the_id(tmp_path: Path) -> None:
    base = {j.id for j in jobs(tmp_path, BASE)}
    assert not base & {j.id for j in jobs(tmp_path, BASE, dtype="float16")}
    red = tmp_path / "pictures" / "red.png"
    red.write_bytes(red.read_bytes() + b"\0")  # same pixels, other bytes: ids go by bytes
    assert not base & {j.id for j in expand(load_recipe(tmp_path / "recipe.yaml"), "float32")}


def test_scheduler_aliases_are_the_same_job(tmp_path: Path) -> None:
    invoke = jobs(tmp_path, BASE + "scheduler: k_lms\n", "a.yaml")
    diffusers = jobs(tmp_path, BASE + "scheduler: LMSDiscreteScheduler\n", "b.yaml")
    assert [j.id for j in invoke] == [j.id for j in diffusers]


def test_exclude_drops_matching_combinations(tmp_path: Path) -> None:
    found = jobs(tmp_path, BASE + "exclude:\n  - {prompt: water, strength: 0.7}\n")
    assert len(found) == 6
    assert ("water", 0.7) not in {(j.prompt, j.strength) for j in found}


def test_include_extends_matching_combinations_and_adds_new_ones(tmp_path: Path) -> None:
    text = (
        BASE
        + """include:
  - {strength: 0.7, cfg: 12}
  - {prompt: smoke, strength: 0.5, seed: 3}
"""
    )
    found = jobs(tmp_path, text)
    assert len(found) == 9
    assert {j.cfg for j in found if j.strength == 0.7} == {12.0}
    assert {j.cfg for j in found if j.strength == 0.4} == {7.5}
    last = found[-1]
    assert (last.prompt, last.strength, last.seed, last.index) == ("smoke", 0.5, 3, 9)


def test_a_duplicate_combination_is_one_job(tmp_path: Path) -> None:
    text = BASE + "include:\n  - {prompt: fire, strength: 0.4, seed: 1}\n"
    assert len(jobs(tmp_path, text)) == 8


def test_steps_taken_in_nominal_and_effective_mode(tmp_path: Path) -> None:
    nominal = jobs(tmp_path, BASE)
    assert {(j.strength, j.steps_taken) for j in nominal} == {(0.4, 4), (0.7, 7)}
    effective = jobs(
        tmp_path, BASE.replace("steps: 10", "steps: 20") + "steps_mode: effective\n", "e.yaml"
    )
    assert {(j.strength, j.steps_nominal, j.steps_taken) for j in effective} == {
        (0.4, 50, 20),
        (0.7, 29, 20),
    }


def test_strength_zero_takes_no_steps_and_is_valid(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE.replace("[0.4, 0.7]", "[0.0, 0.4]")))
    assert check(recipe) == []
    assert {j.steps_taken for j in expand(recipe, "float32") if j.strength == 0} == {0}


def test_a_matrix_over_the_job_limit_is_refused_before_expanding(tmp_path: Path) -> None:
    recipe = load_recipe(
        write(tmp_path, BASE.replace("seeds: [1, 2]", "seeds: {start: 0, count: 1000000000}"))
    )
    problems = check(recipe, max_jobs=1000)
    assert len(problems) == 1 and "--max-jobs" in str(problems[0])


def test_sizes_follow_the_init_image_fit_and_width(tmp_path: Path) -> None:
    wide = "init_images: pictures/blue-wide.png\nprompts: x\nseeds: 1\n"  # 96x64
    assert {(j.width, j.height) for j in jobs(tmp_path, wide)} == {(96, 64)}
    assert {(j.width, j.height) for j in jobs(tmp_path, wide + "width: 48\n", "w.yaml")} == {
        (48, 32)
    }
    boxed = wide + "width: 48\nheight: 48\n"
    assert {(j.width, j.height) for j in jobs(tmp_path, boxed, "s.yaml")} == {(48, 48)}
    assert {(j.width, j.height) for j in jobs(tmp_path, boxed + "fit: true\n", "f.yaml")} == {
        (48, 32)
    }


def test_scheduler_options_are_written_either_way_and_change_the_id(tmp_path: Path) -> None:
    short = jobs(tmp_path, BASE + "scheduler: k_dpmpp_2:karras\n", "a.yaml")
    mapping = jobs(tmp_path, BASE + "scheduler: {name: k_dpmpp_2, karras: true}\n", "b.yaml")
    plain = jobs(tmp_path, BASE + "scheduler: k_dpmpp_2\n", "c.yaml")
    assert [j.id for j in short] == [j.id for j in mapping]
    assert not {j.id for j in short} & {j.id for j in plain}
