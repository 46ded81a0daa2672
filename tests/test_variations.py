"""Noise variations (InvokeAI -v/-V, A1111 "Variation seed"): each job's noise slerped toward
seeds derived from the job, reproducible, recorded, and refinable with `with_variations`."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.engine.variations import slerp
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import expand, variation_seed
from batchgen.recipe.load import load_recipe
from tests.helpers import (
    BATCH_TOLERANCE_LEVELS,
    invoke,
    manifest,
    max_level_difference,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """
init_images: [pictures/gradient.png]
prompts: [fire]
strength: 0.6
steps: 5
seeds: [7, 8]
variations: {count: 2, amount: [0.1, 0.5]}
"""


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255


def rms(first: Image.Image, second: Image.Image) -> float:
    return float(np.sqrt(np.mean((pixels(first) - pixels(second)) ** 2)))


def noise(seed: int) -> torch.Tensor:
    return torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_slerp_keeps_the_noise_on_the_sphere_between_its_ends() -> None:
    start, end = noise(1), noise(2)

    assert torch.equal(slerp(0.0, start, end), start)
    torch.testing.assert_close(slerp(1.0, start, end), end)
    halfway = slerp(0.5, start, end)
    # A straight line would shrink the norm to about 0.71 of it: a washed-out image.
    assert halfway.norm() / start.norm() == pytest.approx(1.0, abs=0.05)


def test_slerp_of_nearly_parallel_noise_is_linear() -> None:
    start = noise(1)
    torch.testing.assert_close(slerp(0.25, start, 2 * start), 1.25 * start)


def test_each_job_is_followed_by_its_variations_with_seeds_derived_from_it(
    tmp_path: Path,
) -> None:
    recipe = load_recipe(write_recipe(tmp_path, RECIPE))

    jobs = list(expand(recipe, "float32"))

    # Per seed: the job, then 2 variations at 0.1 and the same 2 seeds at 0.5.
    assert len(jobs) == 10
    base, *variations = jobs[:5]
    assert base.variation_seed is None
    seeds = [variation_seed(base, 1), variation_seed(base, 2)]
    assert [(job.variation_seed, job.variation_amount) for job in variations] == [
        (seeds[0], 0.1), (seeds[1], 0.1), (seeds[0], 0.5), (seeds[1], 0.5)
    ]  # fmt: skip
    assert len({job.id for job in jobs}) == 10
    assert [job.id for job in expand(load_recipe(recipe.path), "float32")] == [
        job.id for job in jobs
    ]  # never random: the same recipe gives the same variations


def test_no_amount_or_no_count_means_no_variations(tmp_path: Path) -> None:
    path = write_recipe(
        tmp_path, RECIPE.replace("count: 2, amount: [0.1, 0.5]", "count: 3, amount: 0")
    )
    assert [job.variation_seed for job in expand(load_recipe(path), "float32")] == [None, None]
    path.write_text(path.read_text().replace("count: 3, amount: 0", "count: [0, 1], amount: 0.2"))
    # count 0 gives the job alone, count 1 the job (already there) and one variation.
    assert len(list(expand(load_recipe(path), "float32"))) == 4


def test_a_run_records_variations_in_the_manifest_and_the_png(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, RECIPE.replace("seeds: [7, 8]", "seeds: [7]"))
    code, output = invoke("run", str(recipe))
    assert code == 0, output

    rows = manifest(tmp_path / "out")
    assert [(row["variation_seed"], row["variation_strength"]) for row in rows][:3] == [
        ("-1", "0.0"),
        (rows[1]["variation_seed"], "0.1"),
        (rows[2]["variation_seed"], "0.1"),
    ]
    with Image.open(tmp_path / "out" / rows[1]["path"]) as image:
        parameters = image.text["parameters"]  # type: ignore[attr-defined]
    assert (
        f"Variation seed: {rows[1]['variation_seed']}, Variation seed strength: 0.1" in parameters
    )
    assert f"-V{rows[1]['variation_seed']}.png" in rows[1]["path"]
    with (tmp_path / "out" / "manifest.csv").open(newline="") as file:
        assert "variation_seed" in next(csv.reader(file))


def test_a_larger_amount_departs_further_from_the_jobs_own_image(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    base = engine.render(job, init)
    renders = {
        amount: engine.render(replace(job, variation_seed=1234, variation_amount=amount), init)
        for amount in (0.0, 0.1, 0.9)
    }

    assert max_level_difference(renders[0.0], base) == 0  # amount 0 is the job itself
    assert 0 < rms(renders[0.1], base) < rms(renders[0.9], base)


def test_with_variations_reproduces_a_variation_and_refines_from_it(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    chosen = replace(job, variation_seed=1234, variation_amount=0.3)
    again = replace(job, with_variations=((1234, 0.3),))  # InvokeAI -V 1234:0.3

    assert again.id == chosen.id
    assert max_level_difference(engine.render(again, init), engine.render(chosen, init)) == 0
    refined = replace(again, variation_seed=99, variation_amount=0.05)
    assert rms(engine.render(refined, init), engine.render(chosen, init)) < rms(
        engine.render(job, init), engine.render(chosen, init)
    )


def test_variations_batch_together_and_match_their_renders_alone(
    engine: Engine, job: Job, init: PreparedImage
) -> None:
    jobs = [job] + [replace(job, variation_seed=s, variation_amount=0.4) for s in (5, 6)]

    together = engine.render_batch(jobs, [init] * 3)

    for batched, alone in zip(together, (engine.render(j, init) for j in jobs), strict=True):
        assert max_level_difference(batched, alone) <= BATCH_TOLERANCE_LEVELS
