"""`batchgen verify`: a run checked against a reference run, job by job, pixel by pixel.

Run folders are written through batchgen.store without a model, except in the one test that
runs builtin:tiny twice end to end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from batchgen import __version__
from batchgen.cli import main
from batchgen.jobs.job import InitImage, Job
from batchgen.store.files import IMAGES_DIR
from batchgen.store.images import a1111_parameters, image_filename, write_image
from batchgen.store.manifest import Manifest, ManifestRow
from batchgen.views.verify import Tolerance, verify_run
from tests.helpers import imports_torch

ROOT = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 32, 24
INIT = InitImage(
    path=Path("/recipes/pictures/fire-drawing.png"),
    label="pictures/fire-drawing.png",
    sha256="ab" * 32,
    width=WIDTH,
    height=HEIGHT,
)
MODEL_HASH = "0123456789"
CHANGED_PIXEL = (5, 7)  # row, column


def make_job(index: int) -> Job:
    """Job `index` of a seed sweep: each index has its own id."""
    return Job(
        index=index,
        init_image=INIT,
        prompt="fire",
        negative_prompt="",
        strength=0.5,
        steps=4,
        steps_mode="nominal",
        cfg=7.5,
        seed=100 + index,
        scheduler="k_lms",
        width=WIDTH,
        height=HEIGHT,
        fit=False,
        model="builtin:tiny@0123456789abcdef",
        dtype="float32",
        model_name="tiny",
    )


def picture(index: int) -> np.ndarray:
    """Pixels of job `index`: a gradient of its own, so that swapped images would show."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([x * 7 + index * 40, y * 9, (x + y) * 3 + index], axis=-1).astype(np.uint8)


def one_level_off(pixels: np.ndarray) -> np.ndarray:
    changed = pixels.copy()
    changed[CHANGED_PIXEL][1] += 1
    return changed


def write_run(
    run_dir: Path,
    indexes: tuple[int, ...] = (0, 1, 2),
    pictures: dict[int, np.ndarray] | None = None,
    model_hash: str = MODEL_HASH,
    ledger_name: str | None = None,
) -> dict[int, ManifestRow]:
    """A run folder as `batchgen run` leaves it: a PNG and a `done` row per job."""
    manifest = Manifest(run_dir, ledger_name)
    rows = {}
    for index in indexes:
        job = make_job(index)
        pixels = (pictures or {}).get(index, picture(index))
        path = f"{IMAGES_DIR}/{image_filename(job, 4)}"
        parameters = a1111_parameters(job, "tiny", model_hash)
        sha256 = write_image(Image.fromarray(pixels), run_dir / path, job, parameters)
        rows[index] = ManifestRow.from_job(
            job,
            status="done",
            path=path,
            model_hash=model_hash,
            device="cpu (1 threads)",
            seconds=0.5,
            sha256=sha256,
            error="",
        )
        manifest.append(rows[index])
    return rows


@pytest.fixture
def reference(tmp_path: Path) -> Path:
    write_run(tmp_path / "reference")
    return tmp_path / "reference"


def invoke(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def line_of(output: str, job_id: str) -> str:
    """The report's table line for a job, found by its short id."""
    lines = [line for line in output.splitlines() if job_id[:8] in line]
    assert len(lines) == 1, output
    return lines[0]


# --- matching ------------------------------------------------------------------------------


def test_identical_runs_verify(reference: Path, tmp_path: Path) -> None:
    write_run(tmp_path / "run")

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 0, output
    assert output.splitlines() == ["verified: 3 reference jobs, all matching (exact)"]


def test_one_level_in_one_pixel_fails_until_max_diff_allows_it(
    reference: Path, tmp_path: Path
) -> None:
    rows = write_run(tmp_path / "run", pictures={1: one_level_off(picture(1))})

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 1
    line = line_of(output, rows[1].id).split()
    assert line[:6] == ["1", rows[1].id[:8], rows[1].path, "mismatch", "1", "81.8"]
    assert "NOT verified: 1 mismatched and 0 missing of 3 reference jobs (exact)" in output
    assert "largest difference 1 level, lowest PSNR 81.8 dB" in output
    assert rows[0].id[:8] not in output and rows[2].id[:8] not in output

    code, output = invoke("verify", tmp_path / "run", "--against", reference, "--max-diff", "1")
    assert code == 0, output
    assert "all matching (max diff ≤ 1)" in output


def test_psnr_threshold_alone_or_with_max_diff(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    write_run(run_dir, pictures={1: one_level_off(picture(1))})  # PSNR 81.8 dB
    against = ("verify", run_dir, "--against", reference)

    assert invoke(*against, "--min-psnr", "80")[0] == 0
    assert invoke(*against, "--min-psnr", "90")[0] == 1
    assert invoke(*against, "--min-psnr", "80", "--max-diff", "0")[0] == 1  # both must hold


def test_library_reports_distances_and_identical_images_have_infinite_psnr(
    reference: Path, tmp_path: Path
) -> None:
    write_run(tmp_path / "run", pictures={2: one_level_off(picture(2))})

    verification = verify_run(tmp_path / "run", reference, Tolerance(max_diff=0))

    assert not verification.ok
    assert [comparison.row.index for comparison in verification.matched] == [0, 1]
    assert all(math.isinf(comparison.psnr or 0) for comparison in verification.matched)
    [mismatch] = verification.mismatched
    assert mismatch.max_diff == 1
    assert mismatch.psnr == pytest.approx(10 * math.log10(255**2 * WIDTH * HEIGHT * 3))


def test_a_job_missing_from_the_run_fails(reference: Path, tmp_path: Path) -> None:
    write_run(tmp_path / "run", indexes=(0, 2))

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 1
    assert "missing" in line_of(output, make_job(1).id)
    assert "0 mismatched and 1 missing of 3 reference jobs" in output


def test_extra_jobs_are_listed_but_do_not_fail(reference: Path, tmp_path: Path) -> None:
    rows = write_run(tmp_path / "run", indexes=(0, 1, 2, 3))

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 0, output
    assert "extra" in line_of(output, rows[3].id)
    assert "1 extra job in the run, not in the reference: not checked, not a failure" in output


def test_a_failed_row_in_the_run_counts_as_missing(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    rows = write_run(run_dir)
    failed = ManifestRow.from_job(
        make_job(1),
        status="failed",
        path="",
        model_hash=MODEL_HASH,
        device="cpu (1 threads)",
        seconds=0.1,
        sha256="",
        error="RuntimeError: out of memory",
    )
    Manifest(run_dir).append(failed)  # a later row of the same job wins

    code, output = invoke("verify", run_dir, "--against", reference)

    assert code == 1
    assert "missing" in line_of(output, rows[1].id)


# --- notes ---------------------------------------------------------------------------------


def test_a_changed_model_hash_is_noted(reference: Path, tmp_path: Path) -> None:
    rows = write_run(tmp_path / "run", model_hash="9876543210")

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 0, output  # the pixels still match
    assert "model changed: hash 0123456789 → 9876543210" in line_of(output, rows[0].id)


def test_same_pixels_in_other_bytes_match_with_a_note(reference: Path, tmp_path: Path) -> None:
    rows = write_run(tmp_path / "run")
    image_path = tmp_path / "run" / rows[1].path
    Image.fromarray(picture(1)).save(image_path, compress_level=1)  # no text chunks either

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 0, output
    line = line_of(output, rows[1].id)
    assert "match" in line and "file changed since the run" in line


def test_an_opaque_rgba_image_matches_its_rgb_twin(reference: Path, tmp_path: Path) -> None:
    opaque = np.dstack([picture(0), np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)])
    write_run(tmp_path / "run", pictures={0: opaque})

    assert verify_run(tmp_path / "run", reference).ok


@pytest.mark.parametrize(
    ("damage", "note"),
    [
        (lambda path: path.unlink(), "image missing: images/"),
        (lambda path: path.write_bytes(b"not a png"), "image unreadable"),
        (
            lambda path: Image.fromarray(picture(1)[:16]).save(path),
            f"size {WIDTH}x16, reference {WIDTH}x{HEIGHT}",
        ),
    ],
    ids=["missing file", "unreadable file", "other size"],
)
def test_a_broken_image_is_a_mismatch_with_a_note(
    reference: Path, tmp_path: Path, damage: Callable[[Path], object], note: str
) -> None:
    rows = write_run(tmp_path / "run")
    damage(tmp_path / "run" / rows[1].path)

    code, output = invoke("verify", tmp_path / "run", "--against", reference)

    assert code == 1
    line = line_of(output, rows[1].id)
    assert "mismatch" in line and note in line


def test_diff_writes_reference_run_and_stretched_difference(
    reference: Path, tmp_path: Path
) -> None:
    rows = write_run(tmp_path / "run", pictures={1: one_level_off(picture(1))})
    diff_dir = tmp_path / "diff"

    code, output = invoke("verify", tmp_path / "run", "--against", reference, "--diff", diff_dir)

    assert code == 1
    assert f"1 difference image (reference | run | difference) in {diff_dir}" in output
    [written] = diff_dir.iterdir()
    assert written.name == f"0001-{rows[1].id[:8]}.png"
    with Image.open(written) as image:
        pixels = np.asarray(image.convert("RGB"))
    panels = pixels[pixels.shape[0] - HEIGHT :]  # below the labels
    assert np.array_equal(panels[:, :WIDTH], picture(1))  # the reference, first
    [(row, column)] = np.argwhere((panels == 255).all(axis=-1))  # one level, stretched to white
    assert row == CHANGED_PIXEL[0] and column > 2 * WIDTH  # in the last panel


# --- what REF may be, and bad input ----------------------------------------------------------


@pytest.mark.parametrize("ledger_name", [None, "shard-1-of-2.csv"])
def test_against_a_manifest_file(tmp_path: Path, ledger_name: str | None) -> None:
    write_run(tmp_path / "reference", ledger_name=ledger_name)
    write_run(tmp_path / "run")
    ledger = Manifest(tmp_path / "reference", ledger_name).path

    code, output = invoke("verify", tmp_path / "run", "--against", ledger)

    assert code == 0, output
    assert "3 reference jobs, all matching" in output


def test_against_one_ledger_compares_only_its_jobs(tmp_path: Path) -> None:
    write_run(tmp_path / "reference", indexes=(0,), ledger_name="shard-1-of-2.csv")
    write_run(tmp_path / "reference", indexes=(1,), ledger_name="shard-2-of-2.csv")
    write_run(tmp_path / "run", indexes=(0,))

    shard = tmp_path / "reference" / "manifests" / "shard-1-of-2.csv"
    assert verify_run(tmp_path / "run", shard).ok
    assert [row.index for row in verify_run(tmp_path / "run", shard.parent.parent).missing] == [1]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: path.mkdir(), "is not a batchgen run folder: it has no manifest.csv"),
        (lambda path: None, "does not exist"),
        (
            lambda path: (path.mkdir(), (path / "manifest.csv").write_text("name,size\n")),
            f"is not batchgen {__version__}'s manifest header",
        ),
        (
            lambda path: (path.mkdir(), (path / "manifest.csv").write_text("")),
            "has no finished image to compare with",
        ),
    ],
    ids=["empty folder", "no folder", "foreign csv", "no finished job"],
)
def test_a_reference_that_is_no_run_is_bad_input(
    tmp_path: Path, make: Callable[[Path], object], message: str, reference: Path
) -> None:
    not_a_run = tmp_path / "elsewhere"
    make(not_a_run)

    code, output = invoke("verify", reference, "--against", not_a_run)

    assert code == 2
    assert message in output and "Traceback" not in output


def test_a_run_folder_that_is_no_run_is_bad_input(reference: Path, tmp_path: Path) -> None:
    code, output = invoke("verify", tmp_path, "--against", reference)

    assert code == 2
    assert f"run {tmp_path} is not a batchgen run folder" in output


def test_help_says_what_passes_with_an_example() -> None:
    code, output = invoke("verify", "--help")

    assert code == 0 and "Example:" in output
    assert "--max-diff N" in output and "--min-psnr DB" in output


def test_verify_does_not_import_torch(reference: Path) -> None:
    assert not imports_torch("verify", str(reference), "--against", str(reference))


# --- end to end ----------------------------------------------------------------------------


def tiny_recipe(folder: Path, seeds: str) -> Path:
    """A recipe of a few 64 px jobs on builtin:tiny, in `folder`."""
    (folder / "pictures").mkdir()
    Image.fromarray(picture(0)).resize((64, 64)).save(folder / "pictures" / "drawing.png")
    recipe = folder / "tiny.yaml"
    recipe.write_text(
        "init_images: [pictures/drawing.png]\nprompts: [fire]\nstrength: 0.5\nsteps: 4\n"
        f"seeds: {seeds}\n"
    )
    return recipe


@pytest.mark.usefixtures("one_torch_thread")
def test_two_cpu_runs_of_a_recipe_verify_exactly(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "[7, 8]")
    for name in ("first", "second"):
        code, output = invoke("run", recipe, "--output", tmp_path / name, "--quiet")
        assert code == 0, output

    code, output = invoke("verify", tmp_path / "second", "--against", tmp_path / "first")

    assert code == 0, output
    assert "verified: 2 reference jobs, all matching (exact)" in output


@pytest.mark.usefixtures("one_torch_thread")
def test_run_verify_against_checks_the_run_it_just_made(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "[7]")
    assert invoke("run", recipe, "--output", tmp_path / "reference", "--quiet")[0] == 0

    code, output = invoke(
        "run", recipe, "--output", tmp_path / "ci", "--verify-against", tmp_path / "reference"
    )
    assert code == 0, output
    assert "verified: 1 reference job, all matching (exact)" in output

    image = next((tmp_path / "reference" / "images").glob("*.png"))
    Image.fromarray(one_level_off(np.asarray(Image.open(image)))).save(image)
    code, output = invoke(
        "run", recipe, "--output", tmp_path / "ci", "--verify-against", tmp_path / "reference"
    )
    assert code == 1 and "NOT verified" in output
