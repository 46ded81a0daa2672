"""SDXL (issue 18) and Stable Diffusion 3 (issue 19) through the whole product: the same recipes
run on a tiny model folder of each family (tools/tiny_sdxl.py, tools/tiny_sd3.py) through the
CLI — batched sweeps with per-job cfg on the family's scheduler, `prompt_2`, the A1111
`parameters` text, grids, the report, status, verify, resume, reruns, noise variations and
feedback chains, transparent-region inpainting by blending, and intermediates with the family's
latent→RGB factors and exact VAE decodes; shards and `--fast` on SDXL. tests/test_sdxl.py
and tests/test_sd3.py check the engine's pixels against diffusers' pipelines; this file checks
that everything built on the SD 1.x family holds for both. What only one family has (SDXL's
inpainting UNet and pooled prompt cache, SD3's flow schedulers) is in tests/test_sdxl_runs.py
and tests/test_sd3_runs.py; the helpers they share are in tests/helpers.py.

Every test runs once per family (`family`, module-scoped: one model folder, one engine and one
shared sweep per family). The runs are small (64×48 or 64×64, 2 denoising steps)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchgen import __version__
from batchgen.engine.images import PreparedImage
from batchgen.engine.img2img import Engine
from batchgen.jobs.matrix import expand
from batchgen.models.source import ModelSource
from batchgen.recipe.load import load_recipe
from batchgen.views.intermediates import GAP, LABEL_HEIGHT, NOTE_HEIGHT, STRIP_TEXT_KEY
from tests.helpers import (
    MASK_BLUR,
    ONE_PROMPT,
    SWEEP,
    SWEEP_JOBS,
    beyond_the_feathering,
    fire_at_cfg_4,
    grid_jobs,
    hole,
    image_bytes,
    inpainting_run,
    invoke,
    ledger_rows,
    manifest,
    max_level_difference,
    pixels,
    pixels_by_id,
    png_text,
    rows_by_id,
    run,
    write_recipe,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The scheduler a flow-matching model's recipe gets where it names none: the model's own.
SD3_SCHEDULER = "FlowMatchEulerDiscreteScheduler"


# --- the families ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """A family's tiny model and the facts about it that the checks of its runs differ in."""

    folder: Path  # the tiny model's diffusers folder; its name is A1111's `Model:`
    model: ModelSource
    sweep_scheduler: str  # the sweep's `scheduler:`; "" for none
    sweep_prompt_2: str  # the sweep's `prompt_2:`; "" for none
    sampler: str  # A1111's `Sampler:` for the sweep's scheduler
    default_scheduler: str  # the manifest's scheduler where a recipe names none
    latent_factors: str  # what the approximate intermediates' note calls its factors

    @property
    def scheduler(self) -> str:
        """The sweep's manifest scheduler column."""
        return self.sweep_scheduler or self.default_scheduler

    def sweep(self, prompt_2: str | None = None) -> str:
        """The sweep's recipe body on this family; `prompt_2` in place of its own."""
        prompt_2 = self.sweep_prompt_2 if prompt_2 is None else prompt_2
        return (
            SWEEP
            + (f"scheduler: {self.sweep_scheduler}\n" if self.sweep_scheduler else "")
            + (f"prompt_2: {prompt_2}\n" if prompt_2 else "")
        )

    def recipe(self, folder: Path, body: str, name: str = "small") -> Path:
        """`body` on this family's tiny model as folder/<name>.yaml (tests.helpers.write_recipe:
        pictures/gradient.png beside it, output folder/out)."""
        return write_recipe(folder, f"model: {self.folder}\n{body}", name)


@pytest.fixture(scope="module", params=["sdxl", "sd3"])
def family(request: pytest.FixtureRequest) -> Family:
    """Each family's tiny model and facts: conftest's tiny_sdxl and tiny_sd3, which the
    session's other tests share."""
    if request.param == "sdxl":
        folder: Path = request.getfixturevalue("tiny_sdxl_folder")
        # A second prompt for the second encoder, and an ancestral sampler: it draws from each
        # job's generator at every step, so batching must keep the streams apart.
        return Family(
            folder, request.getfixturevalue("tiny_sdxl"),
            sweep_scheduler="k_euler_a", sweep_prompt_2="oil painting of a hearth",
            sampler="Euler a", default_scheduler="k_lms", latent_factors="SDXL factors",
        )  # fmt: skip
    folder = request.getfixturevalue("tiny_sd3_folder")
    # No scheduler: the model's own flow-matching Euler (its shift of 3 included), which
    # A1111-style readers know by Forge's name, Euler. No second prompt either (OpenCLIP
    # bigG's): test_prompt_2_changes_the_id_and_the_image gives it one.
    return Family(
        folder, request.getfixturevalue("tiny_sd3"),
        sweep_scheduler="", sweep_prompt_2="", sampler="Euler", default_scheduler=SD3_SCHEDULER,
        latent_factors="SD3 factors",
    )  # fmt: skip


@pytest.fixture(scope="module")
def family_engine(one_torch_thread: None, family: Family) -> Engine:
    return Engine(family.model, device="cpu")


@dataclass(frozen=True)
class Sweep:
    recipe: Path
    batched: Path  # --batch-size auto: the 8 jobs in one denoising loop
    single: Path  # --batch-size 1


@pytest.fixture(scope="module")
def sweep(
    one_torch_thread: None, family: Family, tmp_path_factory: pytest.TempPathFactory
) -> Sweep:
    folder = tmp_path_factory.mktemp("sweep")
    recipe = family.recipe(folder, family.sweep())
    run(recipe)
    run(recipe, "--batch-size", "1", "--output", str(folder / "single"))
    return Sweep(recipe, folder / "out", folder / "single")


# --- a batched sweep ------------------------------------------------------------------------


def test_a_sweep_with_per_job_cfg_runs_in_one_batch_on_its_scheduler(
    family: Family, sweep: Sweep
) -> None:
    rows = manifest(sweep.batched)

    assert len(rows) == SWEEP_JOBS and {row["status"] for row in rows} == {"done"}
    assert {(row["prompt"], row["cfg"], row["seed"]) for row in rows} == {
        (prompt, cfg, seed)
        for prompt in ("fire", "cheery open fire, photograph")
        for cfg in ("4.0", "7.5")
        for seed in ("1", "2")
    }
    assert {row["prompt_2"] for row in rows} == {family.sweep_prompt_2}
    assert {row["scheduler"] for row in rows} == {family.scheduler}  # SD3: none, the model's
    assert {row["steps_taken"] for row in rows} == {"2"}
    assert {row["batch_size"] for row in rows} == {str(SWEEP_JOBS)}  # prompts and cfg batch
    assert len({row["sha256"] for row in rows}) == SWEEP_JOBS
    single = rows_by_id(sweep.single)
    assert single.keys() == {row["id"] for row in rows}  # ids do not depend on the batch size
    assert {row["batch_size"] for row in single.values()} == {"1"}


def test_batched_images_are_the_batch_of_one_images_within_one_level(sweep: Sweep) -> None:
    batched, single = pixels_by_id(sweep.batched), pixels_by_id(sweep.single)

    assert batched.keys() == single.keys()
    for job_id, image in batched.items():
        assert image.shape == (48, 64, 3)
        assert np.abs(image - single[job_id]).max() <= 1, job_id


def test_the_png_parameters_are_a1111s_infotext_for_the_model(family: Family, sweep: Sweep) -> None:
    row = next(row for row in manifest(sweep.batched) if row["cfg"] == "7.5")

    parameters = png_text(sweep.batched / row["path"], "parameters")

    assert parameters == (
        f"{row['prompt']}\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: {family.sampler}, CFG scale: 7.5, Seed: {row['seed']}, "
        f"Size: 64x48, Model hash: {row['model_hash']}, Model: {family.folder.name}, "
        f"Denoising strength: 0.5, Version: batchgen {__version__}"
    )
    record = json.loads(png_text(sweep.batched / row["path"], "batchgen"))
    assert (record["id"], record["prompt_2"], record["scheduler"]) == (
        row["id"],
        family.sweep_prompt_2,
        family.scheduler,
    )


def test_prompt_2_changes_the_id_and_the_image(
    family: Family, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's "fire" jobs at cfg 4.0, but without the sweep's second prompt where it has
    # one (SDXL's), and with one where it has none (SD3's, for OpenCLIP bigG).
    prompt_2 = "" if family.sweep_prompt_2 else "oil painting of a red square"
    run(family.recipe(tmp_path, fire_at_cfg_4(family.sweep(prompt_2))))

    rows = manifest(tmp_path / "out")
    assert [row["status"] for row in rows] == ["done", "done"]
    assert {row["batch_size"] for row in rows} == {"2"}
    swept = {
        row["seed"]: row
        for row in manifest(sweep.batched)
        if (row["prompt"], row["cfg"]) == ("fire", "4.0")
    }
    for row in rows:
        assert row["prompt_2"] == prompt_2
        record = json.loads(png_text(tmp_path / "out" / row["path"], "batchgen"))
        assert record["prompt_2"] == prompt_2
        assert row["id"] != swept[row["seed"]]["id"]
        made = pixels(tmp_path / "out" / row["path"])
        assert np.abs(made - pixels(sweep.batched / swept[row["seed"]]["path"])).max() > 1


# --- views: grids, report, status -----------------------------------------------------------


def test_the_runs_grids_show_every_job_and_grid_draws_one_on_demand(sweep: Sweep) -> None:
    rows = manifest(sweep.batched)
    grids = sorted((sweep.batched / "grids").glob("*.png"))
    assert grids and sorted(job_id for grid in grids for job_id in grid_jobs(grid)) == sorted(
        row["id"] for row in rows
    )

    code, output = invoke(
        "grid", str(sweep.batched), "--x", "seed", "--y", "prompt", "--where", "cfg=7.5",
        "--name", "seeds",
    )  # fmt: skip

    assert code == 0, output
    # One grid per value of the run's other swept axes, named after the one it shows.
    (seeds,) = (sweep.batched / "grids").glob("seeds*.png")
    assert seeds.name == "seeds-cfg-7.5.png"
    record = json.loads(png_text(seeds, "batchgen-grid"))
    assert record["axes"] == {"x": [1, 2], "y": ["fire", "cheery open fire, photograph"]}
    assert sorted(record["jobs"]) == sorted(row["id"] for row in rows if row["cfg"] == "7.5")


def test_the_report_lists_every_job_with_its_prompts_image_and_parameters(
    family: Family, sweep: Sweep
) -> None:
    code, output = invoke("report", str(sweep.batched))
    assert code == 0, output

    page = (sweep.batched / "report.html").read_text(encoding="utf-8")
    data = re.search(r'<script[^>]* id="jobs-data"[^>]*>(.*?)</script>', page, re.DOTALL)
    assert data is not None
    jobs = json.loads(data[1])
    rows = manifest(sweep.batched)
    assert jobs.keys() == {row["id"] for row in rows}
    for row in rows:
        listed = jobs[row["id"]]
        assert (listed["prompt"], listed["cfg"]) == (row["prompt"], float(row["cfg"]))
        assert listed["prompt_2"] == family.sweep_prompt_2
        assert listed["image"] == row["path"]
        assert listed["parameters"] == png_text(sweep.batched / row["path"], "parameters")


def test_status_counts_the_finished_sweep(sweep: Sweep) -> None:
    code, output = invoke("status", str(sweep.batched))

    assert code == 0, output
    assert "out: 8 done, 0 failed" in output
    assert f"recipe {sweep.recipe}: 8 jobs, 8 done, 0 left" in output


# --- verify, resume, rerun, shards ----------------------------------------------------------


def test_verify_passes_a_reproduction_and_catches_a_tampered_image(
    sweep: Sweep, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(sweep.batched, copy)
    assert invoke("verify", str(copy), "--against", str(sweep.batched))[0] == 0
    # Another batch size: within the documented level, which --max-diff states.
    code, output = invoke(
        "verify", str(sweep.single), "--against", str(sweep.batched), "--max-diff", "1"
    )
    assert code == 0, output

    row = manifest(copy)[3]
    tampered = np.asarray(Image.open(copy / row["path"]).convert("RGB")).copy()
    tampered[5, 7, 1] ^= 1  # one level in one channel of one pixel
    Image.fromarray(tampered).save(copy / row["path"])
    code, output = invoke("verify", str(copy), "--against", str(sweep.batched))

    assert code == 1
    assert "NOT verified: 1 mismatched" in output and row["id"][:8] in output


def test_a_rerun_of_a_finished_sweep_does_nothing_and_keeps_every_byte(sweep: Sweep) -> None:
    before = image_bytes(sweep.batched), (sweep.batched / "manifest.csv").read_bytes()

    output = run(sweep.recipe)

    assert "nothing to do: all 8 jobs are done" in output
    assert "loaded" not in output  # answered from the run folder, no model
    assert (image_bytes(sweep.batched), (sweep.batched / "manifest.csv").read_bytes()) == before


def test_an_interrupted_sweep_finishes_with_the_uninterrupted_runs_bytes(
    sweep: Sweep, tmp_path: Path
) -> None:
    """Killed while its one batch was being written: 3 rows and images of 8 are there."""
    broken = tmp_path / "broken"
    shutil.copytree(sweep.batched, broken)
    ledger = broken / "manifest.csv"
    header, *lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(header + "".join(lines[:3]))
    for line in lines[3:]:
        (broken / next(csv.DictReader([header, line]))["path"]).unlink()

    code, output = invoke("plan", str(sweep.recipe), "--output", str(broken))
    assert code == 0 and "8 jobs: 3 done, 0 failed, 5 to do" in output
    output = run(sweep.recipe, "--output", str(broken))

    assert "5 made, 0 failed, 3 already done" in output
    assert image_bytes(broken) == image_bytes(sweep.batched)  # the batch was made whole again
    assert {row["batch_size"] for row in manifest(broken)} == {str(SWEEP_JOBS)}


# SDXL's alone, as they were before this file: on SD3 they pass too, but each is another run of
# the whole sweep (about 0.6 s a family).
@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_two_shards_make_the_single_runs_images(sweep: Sweep, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    for shard in ("1/2", "2/2"):
        run(sweep.recipe, "--batch-size", "1", "--shard", shard, "--output", str(sharded))

    ledgers = [ledger_rows(sharded / "manifests" / f"shard-{k}-of-2.csv") for k in (1, 2)]
    assert all(ledgers) and not ledgers[0].keys() & ledgers[1].keys()
    assert ledgers[0].keys() | ledgers[1].keys() == rows_by_id(sweep.single).keys()
    code, output = invoke("verify", str(sharded), "--against", str(sweep.single))
    assert code == 0, output  # exact: the same batches of one as the one-process run
    assert sorted(job for grid in (sharded / "grids").glob("*.png") for job in grid_jobs(grid)) == (
        sorted(rows_by_id(sweep.single))
    )  # drawn by the last shard, over both


# --- --fast ---------------------------------------------------------------------------------


# SDXL's alone, as they were before this file: on SD3 they pass too, but each is another run of
# the whole sweep (about 0.6 s a family).
@pytest.mark.parametrize("family", ["sdxl"], indirect=True)
def test_fast_paths_run_within_two_levels_and_are_recorded(sweep: Sweep, tmp_path: Path) -> None:
    fast = tmp_path / "fast"
    options = ["--fast", "channels_last", "--fast", "vae_tiling", "--fast", "vae_slicing"]

    run(sweep.recipe, *options, "--output", str(fast))

    rows = rows_by_id(fast)
    assert {row["fast_paths"] for row in rows.values()} == {"channels_last,vae_tiling,vae_slicing"}
    plain = pixels_by_id(sweep.batched)
    assert rows.keys() == plain.keys()  # the same jobs: fast paths are not in the id
    for job_id, image in pixels_by_id(fast).items():
        assert np.abs(image - plain[job_id]).max() <= 2, job_id


# --- variations and feedback ----------------------------------------------------------------


def test_noise_variations_are_distinct_recorded_and_kept_by_with_variations(
    family: Family, tmp_path: Path
) -> None:
    body = ONE_PROMPT + "seeds: [7]\nvariations: {count: 2, amount: 0.5}\n"
    # Batches of one here and below: the kept job is then rendered as its variation was
    # (batched, they may differ by a level: the kernels sum in another order).
    run(family.recipe(tmp_path, body), "--batch-size", "1")

    rows = manifest(tmp_path / "out")
    assert [row["variation_strength"] for row in rows] == ["0.0", "0.5", "0.5"]
    assert rows[0]["variation_seed"] == "-1"
    seeds = [int(row["variation_seed"]) for row in rows[1:]]
    assert len(set(seeds)) == 2 and min(seeds) >= 0
    assert len({row["sha256"] for row in rows}) == 3
    variation = rows[1]
    assert f"-V{variation['variation_seed']}.png" in variation["path"]
    assert (
        f"Variation seed: {variation['variation_seed']}, Variation seed strength: 0.5"
        in png_text(tmp_path / "out" / variation["path"], "parameters")
    )

    # Kept: the same job, id and pixels, as a job of its own.
    kept = tmp_path / "kept"
    kept.mkdir()
    kept_body = body.replace(
        "variations: {count: 2, amount: 0.5}", f"with_variations: [[{seeds[0]}, 0.5]]"
    )
    run(family.recipe(kept, kept_body), "--batch-size", "1")
    (row,) = manifest(kept / "out")
    assert row["id"] == variation["id"]
    assert np.array_equal(
        pixels(kept / "out" / row["path"]), pixels(tmp_path / "out" / variation["path"])
    )


def test_a_feedback_chain_starts_each_image_from_the_one_before(
    family: Family, tmp_path: Path, family_engine: Engine
) -> None:
    body = ONE_PROMPT + (
        "seeds: [7, 8]\nvariations: {count: 2, mode: feedback}\ngrids: [{x: iteration, y: seed}]\n"
    )
    recipe = family.recipe(tmp_path, body)
    run(recipe)

    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    assert [(row["seed"], row["iteration"]) for row in rows] == [
        ("7", "0"), ("7", "1"), ("7", "2"), ("8", "0"), ("8", "1"), ("8", "2")
    ]  # fmt: skip
    for chain in (rows[:3], rows[3:]):
        assert [row["parent_id"] for row in chain] == ["", chain[0]["id"], chain[1]["id"]]
    assert {row["batch_size"] for row in rows} == {"2"}  # the chains batch together
    assert len({row["sha256"] for row in rows}) == 6
    assert sorted(grid_jobs(run_dir / "grids" / "iteration-x-seed.png")) == sorted(
        row["id"] for row in rows
    )

    # The second iteration, made alone from its parent's file: the same image.
    jobs = {job.id: job for job in expand(load_recipe(recipe), "float32")}
    with Image.open(run_dir / rows[0]["path"]) as parent:
        child = jobs[rows[1]["id"]]
        alone = family_engine.render(child, PreparedImage(parent.convert("RGB"), None))
    with Image.open(run_dir / rows[1]["path"]) as made:
        assert max_level_difference(made.convert("RGB"), alone) <= 1


# --- inpainting by blending -----------------------------------------------------------------


def test_a_transparent_region_is_redrawn_by_blending_and_the_rest_kept(
    family: Family, tmp_path: Path
) -> None:
    """SD3 puts the kept latents back with flow matching's `scale_noise`
    (tests/test_sd3_runs.py follows them step by step)."""
    row, original, made = inpainting_run(family.folder, tmp_path)

    assert (row["status"], row["mask"], row["mask_blur"]) == ("done", "alpha", str(MASK_BLUR))
    assert row["scheduler"] == family.default_scheduler
    assert np.array_equal(beyond_the_feathering(made), beyond_the_feathering(original))
    assert np.abs(hole(made) - hole(original)).mean() > 5


# --- intermediates --------------------------------------------------------------------------


def test_intermediates_are_strips_in_the_familys_colours_and_change_no_pixel(
    family: Family, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's jobs at cfg 4.0 for "fire": the same ids, made with strips this time.
    run(family.recipe(tmp_path, fire_at_cfg_4(family.sweep()) + "intermediates: true\n"))

    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    assert len(rows) == 2 and {row["batch_size"] for row in rows} == {"1"}
    single = pixels_by_id(sweep.single)
    for row in rows:
        strip = run_dir / "intermediates" / Path(row["path"]).name
        record = json.loads(png_text(strip, STRIP_TEXT_KEY))
        assert record["job_id"] == row["id"]
        assert record["note"] == f"approximate (linear latent->RGB, {family.latent_factors})"
        assert [step[0] for step in record["steps"]] == [0, 1, 2]  # the start and 2 steps
        assert pixels(strip)[NOTE_HEIGHT + LABEL_HEIGHT :].std() > 5  # every channel drawn
        assert np.array_equal(pixels(run_dir / row["path"]), single[row["id"]])


def test_exact_intermediates_decode_with_the_familys_vae_factors(
    family: Family, tmp_path: Path
) -> None:
    """Exact frames are VAE decodes at the family's scaling factor (SD3's shift factor too):
    the last is the image itself; the second row is the predicted x0 (flow matching's:
    x_t − σ·v)."""
    body = ONE_PROMPT + "seeds: [5]\nintermediates: {mode: exact, x0: true}\n"
    run(family.recipe(tmp_path, body))

    (row,) = manifest(tmp_path / "out")
    strip_path = tmp_path / "out" / "intermediates" / Path(row["path"]).name
    record = json.loads(png_text(strip_path, STRIP_TEXT_KEY))
    assert record["note"] == "exact (VAE decode)"
    frames = len(record["steps"])
    assert frames == 3
    image = Image.open(tmp_path / "out" / row["path"]).convert("RGB")
    cell = image.resize((2 * image.width, 2 * image.height), Image.Resampling.NEAREST)  # 128 px
    strip = Image.open(strip_path).convert("RGB")
    left, top = (frames - 1) * (cell.width + GAP), NOTE_HEIGHT + LABEL_HEIGHT
    last = strip.crop((left, top, left + cell.width, top + cell.height))
    assert max_level_difference(last, cell) == 0
    # The second row, predicted x0, is drawn for every step taken.
    below = strip.crop(
        (left, top + cell.height + GAP, left + cell.width, top + 2 * cell.height + GAP)
    )
    assert np.asarray(below).std() > 5
