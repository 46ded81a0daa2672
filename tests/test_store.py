"""The run folder: image names, PNG metadata, atomic writes, the manifest ledger, the lock file
and run.log."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from batchgen import __version__
from batchgen.store.files import RunLog, write_lock_file, write_png_atomically
from batchgen.store.images import a1111_parameters, image_filename, job_record, write_image
from batchgen.store.manifest import (
    ADDED_COLUMNS,
    MANIFEST_COLUMNS,
    Manifest,
    ManifestError,
    ManifestRow,
)
from tests.helpers import INIT, JOB, gradient_image, make_job, make_row

SETTINGS = (
    "Steps: 10, Sampler: LMS, CFG scale: 7.5, Seed: 1592514025, Size: 384x384, "
    f"Model hash: 0123456789, Model: tiny, Denoising strength: 0.4, Version: batchgen {__version__}"
)
FILENAME_PATTERN = re.compile(r"\d{4,}-[a-z0-9-]+-[a-z0-9-]+-f\d\.\d\d-s\d+-S\d+\.png")


# --- file names --------------------------------------------------------------------------


def test_image_filename_follows_the_documented_pattern() -> None:
    job = make_job(prompt="Cheery open fire, photograph")

    assert image_filename(job, 4) == (
        "0003-fire-drawing-cheery-open-fire-photograph-f0.40-s10-S1592514025.png"
    )


@pytest.mark.parametrize(
    ("prompt", "slug"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("火の鳥", "prompt"),
        ("Café crème brûlée", "cafe-creme-brulee"),
        ("../../etc/passwd; rm -rf /", "etc-passwd-rm-rf"),
        ("a " * 60, "-".join(["a"] * 20)),
        ("x" * 100, "x" * 40),
    ],
)
def test_image_filenames_are_filesystem_safe_for_any_prompt(prompt: str, slug: str) -> None:
    name = image_filename(make_job(prompt=prompt, strength=0.125, seed=7), 5)

    assert name == f"00003-fire-drawing-{slug}-f0.12-s10-S7.png"
    assert FILENAME_PATTERN.fullmatch(name)


def test_image_filename_slugs_the_init_image_and_never_leaves_it_empty() -> None:
    odd = dataclasses.replace(INIT, path=Path("/x/Ünïcode Pic (1).PNG"))
    unnamed = dataclasses.replace(INIT, path=Path("/x/火.png"))

    assert image_filename(make_job(init_image=odd), 4).startswith("0003-unicode-pic-1-fire-")
    assert image_filename(make_job(init_image=unnamed), 4).startswith("0003-init-fire-")


# --- A1111 parameters ----------------------------------------------------------------------


def test_a1111_parameters_without_negative_prompt_is_prompt_then_settings() -> None:
    assert a1111_parameters(JOB, "tiny", "0123456789") == f"fire\n{SETTINGS}"


def test_a1111_parameters_with_negative_prompt_has_its_own_line() -> None:
    job = make_job(negative_prompt="blurry, low quality")

    assert a1111_parameters(job, "tiny", "0123456789") == (
        f"fire\nNegative prompt: blurry, low quality\n{SETTINGS}"
    )


def test_a1111_parameters_quote_settings_with_commas_or_colons_but_not_the_prompt() -> None:
    job = make_job(prompt="cheery open fire, photograph: 35mm", cfg=7)

    text = a1111_parameters(job, "sd: v1,5", "0123456789")

    assert text == (
        "cheery open fire, photograph: 35mm\n"
        "Steps: 10, Sampler: LMS, CFG scale: 7.0, Seed: 1592514025, Size: 384x384, "
        'Model hash: 0123456789, Model: "sd: v1,5", Denoising strength: 0.4, '
        f"Version: batchgen {__version__}"
    )


def test_a1111_steps_is_the_nominal_count_handed_to_the_scheduler() -> None:
    job = make_job(steps=20, steps_mode="effective", scheduler="k_euler_a")

    text = a1111_parameters(job, "tiny", "0123456789")

    assert "Steps: 50, Sampler: Euler a," in text


# --- PNG writing ---------------------------------------------------------------------------


def test_png_carries_a1111_parameters_readable_by_pillow(tmp_path: Path) -> None:
    job = make_job(prompt="火の鳥, photograph", negative_prompt="blurry")
    parameters = a1111_parameters(job, "tiny", "0123456789")
    path = tmp_path / "images" / image_filename(job, 4)

    write_image(gradient_image(), path, job, parameters)

    with Image.open(path) as image:
        texts = dict(image.text)  # type: ignore[attr-defined]
        assert image.size == (16, 16)
    assert texts["parameters"] == parameters
    record = json.loads(texts["batchgen"])
    assert record == job_record(job)
    assert record["id"] == job.id
    assert record["steps_taken"] == 4
    assert record["batchgen_version"] == __version__


def test_write_image_is_atomic_and_returns_the_file_sha256(tmp_path: Path) -> None:
    path = tmp_path / "images" / "0003-a.png"

    sha256 = write_image(gradient_image(), path, JOB, "fire")

    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(os.listdir(path.parent)) == ["0003-a.png"]


def test_pngs_are_compressed_at_zlibs_fastest_level(tmp_path: Path) -> None:
    # Encoding at Pillow's default level 6 took as long as a small model's render step.
    data = write_png_atomically(gradient_image(), tmp_path / "a.png")

    idat = data.index(b"IDAT") + len(b"IDAT")
    compression_method, flags = data[idat], data[idat + 1]
    assert compression_method == 0x78  # deflate, 32 KiB window
    assert flags >> 6 == 0, "FLEVEL 0: zlib's fastest levels (0-1)"


def test_same_image_and_parameters_give_identical_bytes(tmp_path: Path) -> None:
    first = tmp_path / "first.png"
    second = tmp_path / "second.png"

    assert write_image(gradient_image(), first, JOB, "fire") == write_image(
        gradient_image(), second, JOB, "fire"
    )
    assert first.read_bytes() == second.read_bytes()


def test_failed_image_write_leaves_neither_temp_nor_final_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    path = tmp_path / "images" / "0003-a.png"

    with pytest.raises(OSError, match="No space left"):
        write_image(gradient_image(), path, JOB, "fire")

    assert os.listdir(path.parent) == []


def test_rewriting_an_image_replaces_it_whole(tmp_path: Path) -> None:
    path = tmp_path / "0003-a.png"
    write_image(Image.new("RGB", (8, 8), "red"), path, JOB, "old")

    write_image(gradient_image(), path, JOB, "new")

    with Image.open(path) as image:
        assert image.text["parameters"] == "new"  # type: ignore[attr-defined]
    assert os.listdir(tmp_path) == ["0003-a.png"]


# --- the manifest --------------------------------------------------------------------------


def test_manifest_columns_are_in_the_documented_order() -> None:
    assert MANIFEST_COLUMNS == (
        "id", "status", "path", "index", "init_image", "init_image_sha256", "prompt",
        "negative_prompt", "prompt_2", "negative_prompt_2", "strength", "steps", "steps_mode",
        "steps_nominal", "steps_taken",
        "cfg", "seed", "scheduler", "clip_skip", "width", "height", "fit", "render_size", "model",
        "vae", "refiner", "refiner_switch",
        "model_hash", "dtype", "variation_seed", "variation_strength", "with_variations",
        "parent_id", "iteration", "mask", "mask_blur", "invert_mask",
        "device", "batch_size", "fast_paths", "seconds", "sha256", "error", "finished_at",
        "batchgen_version",
    )  # fmt: skip


def test_manifest_row_from_job_records_how_the_image_was_made() -> None:
    job = make_job(steps=20, steps_mode="effective")

    row = make_row(job)

    assert (row.id, row.index, row.init_image, row.init_image_sha256) == (
        job.id, 3, "pictures/fire-drawing.png", "ab" * 32,
    )  # fmt: skip
    assert (row.steps, row.steps_nominal, row.steps_taken) == (20, 50, 20)
    assert (row.model, row.model_hash, row.batchgen_version) == (
        "builtin:tiny@0123456789abcdef", "0123456789", __version__,
    )  # fmt: skip
    assert row.finished_at.endswith("+00:00")


def test_manifest_round_trip_preserves_types(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "run")
    done = make_row(make_job(prompt='cheery "open" fire,\nphotograph — «é»', strength=0.1 + 0.2))
    failed = make_row(
        make_job(seed=1, fit=False, cfg=7.0),
        status="failed", path="", sha256="", error="RuntimeError: CUDA out of memory, retry",
    )  # fmt: skip

    manifest.append(done)
    manifest.append(failed)

    assert Manifest(tmp_path / "run").rows() == [done, failed]
    header = (tmp_path / "run" / "manifest.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == ",".join(MANIFEST_COLUMNS)


def test_manifest_of_a_new_run_folder_has_no_rows(tmp_path: Path) -> None:
    assert Manifest(tmp_path).rows() == []
    (tmp_path / "manifest.csv").write_bytes(b"")
    assert Manifest(tmp_path).rows() == []


def test_every_manifest_append_is_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync

    def recording_fsync(descriptor: int) -> None:
        synced.append(descriptor)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    manifest = Manifest(tmp_path)

    manifest.append(make_row())
    manifest.append(make_row())

    assert len(synced) == 2


def test_latest_picks_the_last_row_per_job(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    first_try = make_row(status="failed", path="", sha256="", error="OSError: disk full")
    other = make_row(make_job(seed=2))
    redo = make_row()
    for row in (first_try, other, redo):
        manifest.append(row)

    latest = manifest.latest()

    assert latest == {JOB.id: redo, other.id: other}
    assert list(latest) == [JOB.id, other.id]


def _row_bytes(tmp_path: Path, row: ManifestRow) -> bytes:
    """The bytes append writes for `row` after the header."""
    scratch = Manifest(tmp_path / "scratch")
    scratch.append(row)
    header, _, record = scratch.path.read_bytes().partition(b"\r\n")
    return record


def test_manifest_survives_torn_last_line(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path / "run")
    first, second = make_row(make_job(seed=1)), make_row(make_job(seed=2))
    torn = make_row(make_job(seed=3, prompt="cheery open fire, photograph"))
    manifest.append(first)
    manifest.append(second)
    record = _row_bytes(tmp_path, torn)
    inside_the_quoted_prompt = record.index(b"open fire")
    with open(manifest.path, "ab") as file:  # a kill in the middle of writing the third row
        file.write(record[:inside_the_quoted_prompt])

    assert manifest.rows() == [first, second]
    assert manifest.latest() == {first.id: first, second.id: second}


def test_append_after_a_torn_line_keeps_every_row_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # hundreds of appends, kept fast
    first = make_row(make_job(seed=1))
    torn = make_row(make_job(seed=3, prompt='cheery "open" fire, photograph — «é»\r\nat night'))
    after = make_row(make_job(seed=4, prompt="fire, again"))
    record = _row_bytes(tmp_path, torn)
    for cut in range(1, len(record)):  # a kill after any byte of the row
        manifest = Manifest(tmp_path / f"cut-{cut}")
        manifest.append(first)
        with open(manifest.path, "ab") as file:
            file.write(record[:cut])
        assert manifest.rows() == [first], cut

        Manifest(manifest.run_dir).append(after)

        # The torn row never comes back, even torn just before its line end: its job is
        # made (or adopted) again, and a second row would record it twice.
        assert manifest.rows() == [first, after], cut


def test_torn_header_is_treated_as_an_empty_manifest(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.path.write_bytes(b"id,status,pa")
    row = make_row()

    assert manifest.rows() == []
    manifest.append(row)
    assert manifest.rows() == [row]


def test_foreign_manifest_header_raises_a_clear_error(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.path.write_text("file,prompt,seed\nx.png,fire,1\n", encoding="utf-8")

    with pytest.raises(ManifestError, match="manifest.csv.*missing id, status.*Move it aside"):
        manifest.rows()
    with pytest.raises(ManifestError):
        manifest.append(make_row())
    assert manifest.path.read_text(encoding="utf-8") == "file,prompt,seed\nx.png,fire,1\n"


def test_an_older_versions_manifest_is_read_and_upgraded_once_before_appending(
    tmp_path: Path,
) -> None:
    manifest = Manifest(tmp_path)
    old_row, new_row = make_row(make_job(seed=1)), make_row(make_job(seed=2))
    manifest.append(old_row)
    # batchgen 0.1's manifest: none of the columns added since.
    header, *records = list(csv.reader(io.StringIO(manifest.path.read_text(encoding="utf-8"))))
    kept = [k for k, column in enumerate(header) if column not in ADDED_COLUMNS]
    with manifest.path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file, lineterminator="\r\n").writerows(
            [[line[k] for k in kept] for line in (header, *records)]
        )

    (read,) = Manifest(tmp_path).rows()
    assert (read.batch_size, read.variation_seed, read.mask) == (0, -1, "")
    assert read == dataclasses.replace(old_row, batch_size=0, fast_paths="")

    Manifest(tmp_path).append(new_row)

    assert Manifest(tmp_path).rows() == [read, new_row]
    first_line = manifest.path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == ",".join(MANIFEST_COLUMNS)


def test_unreadable_value_in_a_complete_row_names_the_line(tmp_path: Path) -> None:
    manifest = Manifest(tmp_path)
    manifest.append(make_row())
    manifest.append(make_row(make_job(seed=2)))
    text = manifest.path.read_text(encoding="utf-8")
    manifest.path.write_text(text.replace(",1592514025,", ",seed?,"), encoding="utf-8")

    with pytest.raises(ManifestError, match=r"line 2: column seed: cannot read 'seed\?'"):
        manifest.rows()


# --- lock file and run.log -----------------------------------------------------------------


def test_lock_file_is_the_resolved_recipe_in_order(tmp_path: Path) -> None:
    resolved = {"name": "fire-sweep", "prompts": ["fire", "feu de joie, «photo»"], "a": 1}

    write_lock_file(tmp_path, resolved)
    write_lock_file(tmp_path, resolved)

    text = (tmp_path / "recipe.lock.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == resolved
    assert text.startswith("name: fire-sweep\nprompts:")
    assert os.listdir(tmp_path) == ["recipe.lock.yaml"]


def test_run_log_appends_timestamped_lines_across_runs(tmp_path: Path) -> None:
    with RunLog(tmp_path / "run") as log:
        log.line("job 1 images/0001-a.png (4 steps, 0.50s)")
        assert (tmp_path / "run" / "run.log").read_text().count("\n") == 1  # flushed
    with RunLog(tmp_path / "run") as log:
        log.line("1 made, 0 failed\ninterrupted with 2 left")

    lines = (tmp_path / "run" / "run.log").read_text(encoding="utf-8").splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d "
    assert [re.sub(stamp, "", line) for line in lines] == [
        "job 1 images/0001-a.png (4 steps, 0.50s)",
        "1 made, 0 failed",
        "interrupted with 2 left",
    ]
    assert all(re.match(stamp, line) for line in lines)


def test_store_imports_without_torch() -> None:
    code = "import sys, batchgen.store; assert 'torch' not in sys.modules, 'torch imported'"

    subprocess.run([sys.executable, "-c", code], check=True)


def test_a1111_parameters_name_the_karras_schedule_type() -> None:
    karras = dataclasses.replace(JOB, scheduler="k_dpmpp_2:karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5" in a1111_parameters(
        karras, "tiny", "0123456789"
    )


def test_a1111_parameters_write_clip_skip_only_above_one() -> None:
    assert "Clip skip" not in a1111_parameters(JOB, "tiny", "0123456789")
    skipping = dataclasses.replace(JOB, clip_skip=2)
    assert a1111_parameters(skipping, "tiny", "0123456789").endswith(
        "Denoising strength: 0.4, Clip skip: 2, Version: batchgen " + __version__
    )
