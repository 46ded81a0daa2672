"""`plan` and `status` summarize a plan in one pass over the jobs, keeping only what they show."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchgen.jobs import plan as plan_module
from batchgen.jobs.job import Job
from batchgen.jobs.plan import make_plan, summarize_plan
from batchgen.recipe.load import load_recipe
from batchgen.store.manifest import Manifest
from batchgen.views.plan_table import PLAN_COLUMNS
from tests.helpers import RESUME_RECIPE, invoke, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_summary_is_the_whole_plan_tallied(tmp_path: Path) -> None:
    """Done jobs, a missing image, new jobs whose names an old row claims, and
    rows outside the recipe: the one-pass summary says what the whole plan says."""
    recipe = write_recipe(tmp_path, RESUME_RECIPE)
    code, output = invoke("run", str(recipe), "--batch-size", "1")
    assert code == 0, output
    min((tmp_path / "out" / "images").glob("*.png")).unlink()
    # Strength 0.75 dropped (its rows are outside the recipe) and cfg swept as the outer
    # axis: cfg is not in an image's name, so new jobs get names that old rows claim.
    recipe.write_text("cfg: [3, 7.5]\n" + recipe.read_text().replace("[0.5, 0.75]", "[0.5, 0.9]"))
    edited = load_recipe(recipe)
    whole = make_plan(edited, "float32").summarize(keep=6, columns=PLAN_COLUMNS)
    streamed = summarize_plan(edited, "float32", keep=6, columns=PLAN_COLUMNS)
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
    recipe = write_recipe(
        tmp_path, RESUME_RECIPE.replace("seeds: [7]", "seeds: {start: 1, count: 100}")
    )
    made: list[weakref.ref[Job]] = []
    expand = plan_module.expand

    def watched(*args: object) -> Iterator[Job]:
        for job in expand(*args):  # type: ignore[arg-type]
            made.append(weakref.ref(job))
            yield job

    monkeypatch.setattr(plan_module, "expand", watched)
    summary = summarize_plan(load_recipe(recipe), "float32", keep=5, columns=PLAN_COLUMNS)
    gc.collect()
    assert summary.total == len(made) == 400
    assert sum(ref() is not None for ref in made) == 5


def test_planning_reads_each_done_image_of_the_recipe_once_and_no_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking that done images are unchanged reads them whole (on several threads): each
    image of a job in the recipe once, and none of the rows the recipe no longer has."""
    recipe = write_recipe(tmp_path, RESUME_RECIPE)
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    recipe.write_text(recipe.read_text().replace("[0.5, 0.75]", "[0.5, 0.9]"))
    edited = load_recipe(recipe)
    kept = {row.path for row in Manifest(tmp_path / "out").latest().values() if row.strength == 0.5}
    read: list[str] = []
    file_sha256 = plan_module.file_sha256

    def recording(path: Path) -> str | None:
        read.append(path.relative_to(tmp_path / "out").as_posix())
        return file_sha256(path)

    monkeypatch.setattr(plan_module, "file_sha256", recording)
    for plan_it in (
        lambda: make_plan(edited, "float32"),
        lambda: summarize_plan(edited, "float32", columns=PLAN_COLUMNS),
    ):
        read.clear()
        plan = plan_it()
        assert sorted(read) == sorted(kept) and len(kept) == 2
    assert isinstance(plan, plan_module.PlanSummary) and plan.count("done") == 2
