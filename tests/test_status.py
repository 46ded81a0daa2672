"""`batchgen status RUN_DIR`: counts, failures with their errors, time and speed, what is left
of the recipe, who is running — from the manifest, without torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchgen.store.runlock import RunLock
from tests.helpers import fail_batches_with, imports_torch, invoke

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_status_counts_failures_time_and_what_is_left(
    recipe: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fail_batches_with(monkeypatch, 3, "CUDA out of memory (simulated)")
    invoke("run", str(recipe), "--batch-size", "1")
    recipe.write_text(recipe.read_text().replace("seeds: [7]", "seeds: [7, 8]"))
    code, output = invoke("status", str(recipe.parent / "out"))
    assert code == 0, output
    assert "out: 3 done, 1 failed" in output
    assert "images/s)" in output and "first job finished" in output
    assert f"recipe {recipe}: 8 jobs, 3 done, 5 left" in output
    assert "failed: job 3" in output and "RuntimeError: CUDA out of memory (simulated)" in output


def test_status_names_a_run_in_progress_and_jobs_no_longer_in_the_recipe(
    recipe: Path,
    done: Path,
) -> None:
    recipe.write_text(recipe.read_text().replace("strength: [0.5, 0.75]", "strength: 0.5"))
    with RunLock(done / ".locks" / "run.lock"):
        code, output = invoke("status", str(done))
    assert code == 0
    assert "running now: pid" in output
    assert "2 job(s) in the manifest are not in the current recipe" in output
    assert "2 jobs, 2 done, 0 left" in output


def test_status_of_a_folder_that_is_no_run_is_bad_input(tmp_path: Path) -> None:
    code, output = invoke("status", str(tmp_path))
    assert code == 2 and "is not a batchgen run folder" in output


def test_status_does_not_import_torch(done: Path) -> None:
    assert not imports_torch("status", str(done))
