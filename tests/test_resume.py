"""Nothing lost, nothing redone: what a re-run of the same folder does with what it finds there
— changed or missing images, torn and foreign manifests, temp files, unrecorded images, an
edited recipe, --redo and --dry-run, the run lock, a full disk."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from batchgen.store.files import LOCK_FILE_NAME
from batchgen.store.manifest import Manifest
from batchgen.store.runlock import RunLock
from tests.helpers import fail_batches_with, invoke, manifest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def images(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((run_dir / "images").glob("*.png"))}


def pixels(run_dir: Path) -> dict[str, np.ndarray]:
    """Each image's pixels: its PNG text holds the job's index, which an edited recipe may
    change."""
    return {
        path.name: np.asarray(Image.open(path))
        for path in sorted((run_dir / "images").glob("*.png"))
    }


def test_an_image_changed_on_disk_is_made_again_and_the_others_kept(
    recipe: Path, done: Path
) -> None:
    before = images(done)
    first, second = sorted((done / "images").glob("*.png"))[:2]
    first.write_bytes(first.read_bytes() + b"edited")
    second.unlink()
    code, output = invoke("plan", str(recipe))
    assert code == 0
    assert "changed on disk" in output and "is missing" in output
    assert "4 jobs: 2 done, 0 failed, 2 to do" in output
    code, output = invoke("run", str(recipe))
    assert code == 0 and "2 made, 0 failed, 2 already done" in output
    assert images(done) == before


def test_a_torn_last_row_is_ignored_and_its_image_adopted(recipe: Path, done: Path) -> None:
    ledger = done / "manifest.csv"
    data = ledger.read_bytes()
    last_row_start = data.rstrip(b"\r\n").rfind(b"\n") + 1
    ledger.write_bytes(data[: last_row_start + 30])  # killed while appending the last row
    assert len(Manifest(done).rows()) == 3
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    assert "adopted 1 image(s) a killed run wrote but did not record" in output
    assert "nothing to do: all 4 jobs are done" in output
    assert [row.status for row in Manifest(done).rows()] == ["done"] * 4


def test_a_foreign_manifest_is_a_clear_error_and_is_never_overwritten(
    recipe: Path, done: Path
) -> None:
    ledger = done / "manifest.csv"
    ledger.write_text("file,seed\nx.png,1\n")
    code, output = invoke("run", str(recipe))
    assert code == 2
    assert "not batchgen" in output and "Move it aside" in output
    assert ledger.read_text() == "file,seed\nx.png,1\n"


def test_temp_files_of_a_killed_run_are_removed(recipe: Path, done: Path) -> None:
    leftovers = [
        done / "images" / ".0001-gradient-fire-f0.50-s4-S7.png.0a1b2c3d.tmp",
        done / ".report.html.deadbeef.tmp",
    ]
    for leftover in leftovers:
        leftover.write_bytes(b"half an image")
    keep = done / "images" / "notes.tmp"  # not a name batchgen writes: not ours to delete
    keep.write_text("mine")
    code, output = invoke("run", str(recipe))
    assert code == 0 and "removed 2 temp file(s)" in output
    assert not any(path.exists() for path in leftovers) and keep.exists()


def test_an_unrecorded_image_is_adopted_only_when_it_is_the_jobs(recipe: Path, done: Path) -> None:
    rows = manifest(done)
    before = images(done)
    (done / "manifest.csv").unlink()
    # The second job's file holds the first job's image: not the second job's to adopt.
    (done / rows[1]["path"]).write_bytes((done / rows[0]["path"]).read_bytes())
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    assert "adopted 3 image(s)" in output and "1 made, 0 failed, 3 already done" in output
    assert images(done) == before


def test_an_edited_recipe_runs_only_new_jobs_and_keeps_the_old_ones(
    recipe: Path, done: Path
) -> None:
    before = images(done)
    recipe.write_text(recipe.read_text().replace("strength: [0.5, 0.75]", "strength: [0.5, 0.9]"))
    code, output = invoke("plan", str(recipe))
    assert "4 jobs: 2 done, 0 failed, 2 to do" in output
    assert "2 job(s) in the manifest are not in the current recipe (2 with images" in output
    assert "changed since the last run in this folder: strength: [0.5, 0.75] → [0.5, 0.9]" in output
    code, output = invoke("run", str(recipe))
    assert code == 0 and "2 made, 0 failed, 2 already done" in output
    assert "the recipe changed since the last run in this folder" in output
    after = images(done)
    assert len(after) == 6 and all(after[name] == data for name, data in before.items())


def test_a_new_job_never_overwrites_an_old_image_of_the_same_name(recipe: Path, done: Path) -> None:
    """cfg is not part of an image's name: the same index, prompt, strength, steps and
    seed with another cfg would get the old job's file name."""
    before = images(done)
    recipe.write_text(recipe.read_text() + "cfg: 3\n")
    code, output = invoke("run", str(recipe))
    assert code == 0 and "4 made" in output
    after = images(done)
    assert len(after) == 8 and all(after[name] == data for name, data in before.items())
    assert sum(1 for row in Manifest(done).latest().values() if row.cfg == 3) == 4


def test_changed_model_weights_behind_the_same_name_are_a_loud_warning(
    recipe: Path, done: Path
) -> None:
    lock_path = done / LOCK_FILE_NAME
    lock = yaml.safe_load(lock_path.read_text())
    lock["model"][0]["identity"] = "builtin:tiny@0000000000000000"
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    code, output = invoke("run", str(recipe), "--quiet")
    assert code == 0
    assert "warning: the model weights behind `builtin:tiny` changed" in output
    assert "builtin:tiny@0000000000000000 →" in output


def test_redo_failed_makes_only_the_failed_jobs_and_redo_all_every_job(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:
        fail_batches_with(patched, 2, "simulated")
        assert invoke("run", str(recipe), "--batch-size", "1")[0] == 1
    recipe.write_text(recipe.read_text().replace("seeds: [7]", "seeds: [7, 8]"))
    code, output = invoke("run", str(recipe), "--redo", "failed", "--batch-size", "1")
    assert code == 0 and "1 made, 0 failed" in output  # the 4 new jobs wait
    code, output = invoke("plan", str(recipe), "--redo", "all")
    assert "--redo all makes 8" in output
    run_dir = recipe.parent / "out"
    before = pixels(run_dir)
    code, output = invoke("run", str(recipe), "--redo", "all", "--batch-size", "1")
    assert code == 0 and "8 made, 0 failed" in output
    after = pixels(run_dir)
    assert len(after) == 8 and all(np.array_equal(after[name], p) for name, p in before.items())


def test_dry_run_says_what_would_be_made_and_writes_nothing(recipe: Path) -> None:
    code, output = invoke("run", str(recipe), "--dry-run")
    assert code == 0
    assert "4 jobs: 0 done, 0 failed, 4 to do" in output and "dry run: nothing was made" in output
    assert not (recipe.parent / "out").exists()


def test_a_second_run_on_the_same_folder_exits_at_once_naming_the_holder(
    recipe: Path,
) -> None:
    run_dir = recipe.parent / "out"
    with RunLock(run_dir / ".locks" / "run.lock"):
        code, output = invoke("run", str(recipe))
    assert code == 75
    assert f"pid {os.getpid()} on {socket.gethostname()}, started" in output
    assert "Wait for it to finish" in output
    assert not (run_dir / "manifest.csv").exists()


def test_the_lock_of_a_killed_run_is_taken_over(recipe: Path) -> None:
    run_dir = recipe.parent / "out"
    holder = run_dir / ".locks" / "run.lock.json"
    holder.parent.mkdir(parents=True)
    dead_pid = 2**22 + 12345  # above the kernel's largest pid: never running
    holder.write_text(
        json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "then"})
    )
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    assert f"took over the lock of a run that was killed (pid {dead_pid}" in output
    assert not holder.exists()


def test_a_full_disk_stops_the_run_with_a_valid_manifest_and_a_rerun_finishes(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import batchgen.store.files as store

    real_write = store.write_file_atomically
    calls = []

    def write(path: Path, data: bytes) -> None:
        calls.append(path)
        if path.suffix == ".png" and len([p for p in calls if p.suffix == ".png"]) == 3:
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(store, "write_file_atomically", write)
    code, output = invoke("run", str(recipe))
    assert code == 1
    assert "No space left on device" in output
    assert "Free space or fix its permissions, then run the same command again" in output
    run_dir = recipe.parent / "out"
    assert [row["status"] for row in manifest(run_dir)] == ["done", "done"]
    monkeypatch.setattr(store, "write_file_atomically", real_write)
    code, output = invoke("run", str(recipe))
    assert code == 0 and "2 made, 0 failed, 2 already done" in output


def test_an_output_folder_that_cannot_be_made_is_bad_input(recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    code, output = invoke("run", str(recipe), "--output", str(tmp_path / "a-file" / "run"))
    assert code == 2
    assert f"cannot write to the output folder {tmp_path / 'a-file' / 'run'}" in output


def test_keys_a_newer_version_added_to_the_lock_are_not_reported_as_edits(
    recipe: Path, done: Path
) -> None:
    lock_path = done / LOCK_FILE_NAME
    lock = yaml.safe_load(lock_path.read_text(encoding="utf-8"))
    for key in ("mask", "mask_blur", "variation_mode", "upscale_small"):  # batchgen 0.2's lock
        del lock[key]
    lock_path.write_text(yaml.safe_dump(lock), encoding="utf-8")

    code, output = invoke("plan", str(recipe))

    assert code == 0 and "changed since the last run" not in output
    recipe.write_text(recipe.read_text() + "mask_blur: 8\n")
    lock_path.write_text(yaml.safe_dump(lock | {"mask_blur": 4}), encoding="utf-8")
    assert (
        "changed since the last run in this folder: mask_blur: 4 → 8"
        in invoke("plan", str(recipe))[1]
    )
