"""`plan` and `status` summarize a plan in one pass over the jobs, keeping only what they show."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchgen import plan as plan_module
from batchgen.cli import _PLAN_COLUMNS
from batchgen.job import Job
from batchgen.plan import make_plan, summarize_plan
from batchgen.recipe import load_recipe
from tests.test_cli import invoke, write_recipe
from tests.test_resume import RECIPE  # four jobs, each with denoising steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_summary_is_the_whole_plan_tallied(tmp_path: Path) -> None:
    """Done jobs, a missing image, new jobs whose names an old row claims, and
    rows outside the recipe: the one-pass summary says what the whole plan says."""
    recipe = write_recipe(tmp_path, RECIPE)
    code, output = invoke("run", str(recipe), "--batch-size", "1")
    assert code == 0, output
    min((tmp_path / "out" / "images").glob("*.png")).unlink()
    # Strength 0.75 dropped (its rows are outside the recipe) and cfg swept as the outer
    # axis: cfg is not in an image's name, so new jobs get names that old rows claim.
    recipe.write_text("cfg: [3, 7.5]\n" + recipe.read_text().replace("[0.5, 0.75]", "[0.5, 0.9]"))
    edited = load_recipe(recipe)
    whole = make_plan(edited, "float32").summarize(keep=6, columns=_PLAN_COLUMNS)
    streamed = summarize_plan(edited, "float32", keep=6, columns=_PLAN_COLUMNS)
    assert streamed == whole
    assert (streamed.total, streamed.count("done"), streamed.count("todo")) == (8, 1, 7)
    assert len(streamed.outside) == 2
    assert streamed.varying == {"prompt", "strength", "cfg"}
    assert any(planned.path.endswith(f"-{planned.job.id[:8]}.png") for planned in streamed.head)


def test_a_summary_holds_only_the_jobs_it_shows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe of any size is summarized in memory that does not grow with it: each job
    is dropped once counted, but for the first rows that `plan` prints."""
    recipe = write_recipe(tmp_path, RECIPE.replace("seeds: [7]", "seeds: {start: 1, count: 100}"))
    made: list[weakref.ref[Job]] = []
    expand = plan_module.expand

    def watched(*args: object) -> Iterator[Job]:
        for job in expand(*args):  # type: ignore[arg-type]
            made.append(weakref.ref(job))
            yield job

    monkeypatch.setattr(plan_module, "expand", watched)
    summary = summarize_plan(load_recipe(recipe), "float32", keep=5, columns=_PLAN_COLUMNS)
    gc.collect()
    assert summary.total == len(made) == 400
    assert sum(ref() is not None for ref in made) == 5


def test_done_images_are_hashed_each_once_and_a_missing_one_is_none(tmp_path: Path) -> None:
    """The threaded check of done images gives each file's sha256, as a plain read would."""
    import hashlib
    from types import SimpleNamespace

    for number in range(20):
        (tmp_path / f"{number}.png").write_bytes(bytes([number]) * (number * 1000 + 1))
    rows = [SimpleNamespace(status="done", path=f"{number}.png") for number in range(20)]
    rows += [
        SimpleNamespace(status="done", path="gone.png"),
        SimpleNamespace(status="failed", path=""),
        SimpleNamespace(status="done", path="0.png"),  # retried: two rows, one file
    ]

    digests = plan_module._image_digests(tmp_path, rows)  # type: ignore[arg-type]

    assert digests == {
        **{
            f"{n}.png": hashlib.sha256((tmp_path / f"{n}.png").read_bytes()).hexdigest()
            for n in range(20)
        },
        "gone.png": None,
    }
