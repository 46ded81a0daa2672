"""Feedback iterations (InvokeAI -n on img2img): each image is the next job's init image;
chains batch with each other, resume from their last finished image, and record parents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.jobs.matrix import expand
from batchgen.recipe.load import load_recipe
from tests.helpers import fail_batches_with, invoke, manifest, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """
init_images: [pictures/gradient.png]
prompts: [fire]
strength: 0.5
steps: 6
seeds: [7, 8]
variations: {count: 2, mode: feedback}
grids: [{x: iteration, y: seed}]
"""


def image_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        row["id"]: (run_dir / row["path"]).read_bytes()
        for row in manifest(run_dir)
        if row["status"] == "done"
    }


def test_chains_link_each_job_to_the_one_before(tmp_path: Path) -> None:
    jobs = list(expand(load_recipe(write_recipe(tmp_path, RECIPE)), "float32"))

    chains = [jobs[:3], jobs[3:]]
    for chain, seed in zip(chains, (7, 8), strict=True):
        assert [(job.iteration, job.seed) for job in chain] == [(0, seed), (1, seed), (2, seed)]
        assert [job.parent_id for job in chain] == ["", chain[0].id, chain[1].id]


def test_each_iteration_starts_from_the_image_before_it(tmp_path: Path, engine: Engine) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    code, output = invoke("run", str(recipe))
    assert code == 0, output

    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    assert [(row["iteration"], row["batch_size"]) for row in rows] == [
        ("0", "2"), ("1", "2"), ("2", "2")
    ] * 2  # the two chains batch together, iteration by iteration  # fmt: skip
    assert (run_dir / "grids" / "iteration-x-seed.png").exists()
    # The last job of the first chain, made alone from its parent's file, is the same image.
    jobs = list(expand(load_recipe(recipe), "float32"))
    with Image.open(run_dir / rows[1]["path"]) as parent:
        init = PreparedImage(parent.convert("RGB"), None)
    alone = np.asarray(engine.render(jobs[2], init), dtype=np.int16)
    with Image.open(run_dir / rows[2]["path"]) as made:
        assert np.abs(np.asarray(made.convert("RGB"), dtype=np.int16) - alone).max() <= 2


def test_an_interrupted_chain_resumes_from_its_last_finished_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "whole").mkdir()
    (tmp_path / "broken").mkdir()
    assert invoke("run", str(write_recipe(tmp_path / "whole", RECIPE)))[0] == 0
    recipe = write_recipe(tmp_path / "broken", RECIPE)

    with monkeypatch.context() as patched:
        fail_batches_with(patched, 3, "CUDA out of memory (simulated)")  # the last iteration
        code, _ = invoke("run", str(recipe))
    assert code == 1
    assert [row["status"] for row in manifest(tmp_path / "broken" / "out")] == [
        "done", "done", "failed"
    ] * 2  # fmt: skip

    code, output = invoke("run", str(recipe))

    assert code == 0 and "2 made, 0 failed, 4 already done" in output
    assert image_bytes(tmp_path / "broken" / "out") == image_bytes(tmp_path / "whole" / "out")


def test_a_job_whose_parent_failed_fails_and_is_retried_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    with monkeypatch.context() as patched:
        fail_batches_with(patched, 2, "broken")  # the middle iteration
        code, _ = invoke("run", str(recipe))
    assert code == 1
    rows = manifest(tmp_path / "out")
    assert [row["status"] for row in rows] == ["done", "failed", "failed"] * 2
    assert "cannot start: its parent job" in rows[2]["error"]

    code, output = invoke("run", str(recipe))
    assert code == 0 and "4 made, 0 failed, 2 already done" in output


def test_feedback_chains_are_not_sharded(tmp_path: Path) -> None:
    code, output = invoke("run", str(write_recipe(tmp_path, RECIPE)), "--shard", "1/2")
    assert code == 2 and "feedback chains cannot be sharded" in output
