"""SDXL through the whole product (issue 18): recipes run on a tiny SDXL-architecture folder
(tools/tiny_sdxl.py) through the CLI — batched sweeps with per-job cfg and `prompt_2`, the
prompt cache's pooled embeddings, noise variations and feedback chains, transparent-region
inpainting by blending and with a 9-channel SDXL inpainting UNet, intermediates with SDXL's
latent→RGB factors, the A1111 `parameters` text, grids, the report, status, verify, resume,
shards and `--fast`. tests/test_sdxl.py checks the engine's pixels against diffusers' pipeline;
this file checks that everything built on the SD 1.x family holds for SDXL too.

The runs are small (64×48 or 64×64, 2 denoising steps) and shared by the tests of a module."""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from batchgen import __version__
from batchgen.engine.families.base import PromptText
from batchgen.engine.images import PreparedImage, prepare
from batchgen.engine.img2img import BoundedCache, Engine
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import expand
from batchgen.models.source import ModelSource, resolve_model
from batchgen.recipe.load import load_recipe
from batchgen.views.intermediates import GAP, LABEL_HEIGHT, NOTE_HEIGHT, STRIP_TEXT_KEY
from tests.helpers import init_image, invoke, manifest, max_level_difference, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 prompts × 2 cfg × 2 seeds, a second prompt for the second encoder, an ancestral sampler
# (it draws from each job's generator at every step: batching must keep the streams apart).
SWEEP = """
init_images: [pictures/gradient.png]
prompts: [fire, "cheery open fire, photograph"]
prompt_2: oil painting of a hearth
negative_prompt: blurry
cfg: [4.0, 7.5]
seeds: [1, 2]
strength: 0.5
steps: 4
scheduler: k_euler_a
"""
SWEEP_JOBS = 8
# One job per seed: what the variations, feedback and intermediates tests build on.
ONE_PROMPT = "init_images: [pictures/gradient.png]\nprompts: [fire]\nstrength: 0.5\nsteps: 4\n"

# The inpainting pictures: a red frame around a transparent square with blue under it.
SIZE = 64
HOLE = (16, 16, 47, 47)  # inclusive box of the transparent square
FRAME, HIDDEN = (200, 60, 40), (40, 80, 200)
MASK_BLUR = 2


# --- helpers --------------------------------------------------------------------------------


def sdxl_recipe(folder: Path, model: Path, body: str, name: str = "small") -> Path:
    """`body` on the tiny SDXL at `model` as folder/<name>.yaml (tests.helpers.write_recipe:
    pictures/gradient.png beside it, output folder/out)."""
    return write_recipe(folder, f"model: {model}\n{body}", name)


def run(recipe: Path, *options: str) -> str:
    """`batchgen run RECIPE OPTIONS`, which must succeed; its output."""
    code, output = invoke("run", str(recipe), *options)
    assert code == 0, output
    return output


def ledger_rows(ledger: Path) -> dict[str, dict[str, str]]:
    """One ledger's rows by job id."""
    with ledger.open(newline="") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def rows_by_id(run_dir: Path) -> dict[str, dict[str, str]]:
    """Every ledger's rows (manifest.csv and manifests/*.csv), by job id."""
    rows = {}
    for ledger in [run_dir / "manifest.csv", *sorted((run_dir / "manifests").glob("*.csv"))]:
        if ledger.exists():
            rows.update(ledger_rows(ledger))
    return rows


def pixels_by_id(run_dir: Path) -> dict[str, np.ndarray]:
    return {
        job_id: np.asarray(Image.open(run_dir / row["path"]).convert("RGB"), dtype=np.int16)
        for job_id, row in rows_by_id(run_dir).items()
    }


def image_bytes(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted((run_dir / "images").glob("*.png"))}


def png_text(path: Path, key: str) -> str:
    with Image.open(path) as image:
        text: str = image.text[key]  # type: ignore[attr-defined]
    return text


def grid_jobs(path: Path) -> list[str]:
    jobs: list[str] = json.loads(png_text(path, "batchgen-grid"))["jobs"]
    return jobs


def holed_picture(path: Path) -> Path:
    """A red picture whose middle square is transparent, blue kept under it (IMG2IMG.md)."""
    image = Image.new("RGBA", (SIZE, SIZE), (*FRAME, 255))
    ImageDraw.Draw(image).rectangle(HOLE, fill=(*HIDDEN, 0))
    image.save(path)
    return path


def hole(pixels: np.ndarray) -> np.ndarray:
    left, top, right, bottom = HOLE
    return pixels[top : bottom + 1, left : right + 1]


def beyond_the_feathering(pixels: np.ndarray) -> np.ndarray:
    """The opaque pixels more than the blur's reach (3 × mask_blur) away from the hole."""
    keep = np.ones(pixels.shape[:2], dtype=bool)
    left, top, right, bottom = HOLE
    margin = 3 * MASK_BLUR
    keep[top - margin : bottom + margin + 1, left - margin : right + margin + 1] = False
    return pixels[keep]


def sdxl_job(job: Job, model: ModelSource, **changes: object) -> Job:
    """conftest's `job` (64×96, k_lms) on `model`, at 4 steps (2 taken at strength 0.5)."""
    return replace(job, model=model.identity, steps=4, strength=0.5, **changes)  # type: ignore[arg-type]


# --- the runs the tests share ---------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    recipe: Path
    batched: Path  # --batch-size auto: the 8 jobs in one denoising loop
    single: Path  # --batch-size 1


@pytest.fixture(scope="module")
def sweep(
    one_torch_thread: None, tiny_sdxl_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Sweep:
    folder = tmp_path_factory.mktemp("sweep")
    recipe = sdxl_recipe(folder, tiny_sdxl_folder, SWEEP)
    run(recipe)
    run(recipe, "--batch-size", "1", "--output", str(folder / "single"))
    return Sweep(recipe, folder / "out", folder / "single")


@pytest.fixture(scope="module")
def sdxl_engine(one_torch_thread: None, tiny_sdxl: ModelSource) -> Engine:
    return Engine(tiny_sdxl, device="cpu")


@pytest.fixture(scope="module")
def tiny_sdxl_inpainting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL with a 9-channel UNet (SDXL inpainting's), random weights."""
    from tools.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(
        tmp_path_factory.mktemp("sdxl-inpainting") / "tiny-sdxl-inpainting", inpainting=True
    )


# --- a batched sweep ------------------------------------------------------------------------


def test_a_sweep_with_prompt_2_and_per_job_cfg_runs_in_one_batch(sweep: Sweep) -> None:
    rows = manifest(sweep.batched)

    assert len(rows) == SWEEP_JOBS and {row["status"] for row in rows} == {"done"}
    assert {(row["prompt"], row["cfg"], row["seed"]) for row in rows} == {
        (prompt, cfg, seed)
        for prompt in ("fire", "cheery open fire, photograph")
        for cfg in ("4.0", "7.5")
        for seed in ("1", "2")
    }
    assert {row["prompt_2"] for row in rows} == {"oil painting of a hearth"}
    assert {row["steps_taken"] for row in rows} == {"2"}
    assert {row["batch_size"] for row in rows} == {str(SWEEP_JOBS)}  # prompts and cfg batch
    assert len({row["sha256"] for row in rows}) == SWEEP_JOBS
    single = rows_by_id(sweep.single)
    assert single.keys() == {row["id"] for row in rows}  # ids do not depend on the batch size
    assert {row["batch_size"] for row in single.values()} == {"1"}


def test_batched_images_are_the_batch_of_one_images_within_one_level(sweep: Sweep) -> None:
    batched, single = pixels_by_id(sweep.batched), pixels_by_id(sweep.single)

    assert batched.keys() == single.keys()
    for job_id, pixels in batched.items():
        assert pixels.shape == (48, 64, 3)
        assert np.abs(pixels - single[job_id]).max() <= 1, job_id


def test_prompt_2_changes_the_image(
    sdxl_engine: Engine, job: Job, tiny_sdxl: ModelSource, init: PreparedImage
) -> None:
    plain = sdxl_job(job, tiny_sdxl)
    second = replace(plain, prompt_2="oil painting of a hearth")
    assert plain.id != second.id
    assert max_level_difference(sdxl_engine.render(plain, init), sdxl_engine.render(second, init))


def test_the_png_parameters_are_a1111s_infotext_for_the_sdxl_model(sweep: Sweep) -> None:
    row = next(row for row in manifest(sweep.batched) if row["cfg"] == "7.5")

    parameters = png_text(sweep.batched / row["path"], "parameters")

    assert parameters == (
        f"{row['prompt']}\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: {row['seed']}, Size: 64x48, "
        f"Model hash: {row['model_hash']}, Model: tiny-sdxl, Denoising strength: 0.5, "
        f"Version: batchgen {__version__}"
    )
    record = json.loads(png_text(sweep.batched / row["path"], "batchgen"))
    assert (record["id"], record["prompt_2"]) == (row["id"], "oil painting of a hearth")


def test_the_prompt_cache_serves_repeats_with_their_pooled_embedding(
    tiny_sdxl: ModelSource, job: Job, init: PreparedImage
) -> None:
    engine = Engine(tiny_sdxl, device="cpu")  # its own: counts from zero
    first = sdxl_job(job, tiny_sdxl, prompt="red square", negative_prompt="smoke", seed=1)
    again = replace(first, seed=2, cfg=4.0)  # the same prompts
    other_2 = replace(first, prompt_2="blue circle")

    engine.render(first, init)
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (0, 2)  # prompt, negative
    cached = engine.render(again, init)
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (2, 2)
    assert engine.posterior_cache.hits == 1  # the same init image at the same size
    engine.render(other_2, init)  # another second prompt is another embedding
    assert (engine.prompt_cache.hits, engine.prompt_cache.misses) == (3, 3)

    embedding = engine.prompt_embeddings(PromptText("red square"))
    assert engine.prompt_cache.hits == 4
    assert embedding.pooled is not None and embedding.pooled.shape == (1, 48)
    uncached = engine.family.encode_prompt(PromptText("red square"), 1)
    assert uncached.pooled is not None and torch.equal(embedding.pooled, uncached.pooled)
    engine.prompt_cache = BoundedCache(0)  # off: every job encodes its prompts
    assert np.array_equal(np.asarray(engine.render(again, init)), np.asarray(cached))


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


def test_the_report_lists_every_job_with_its_prompt_2_and_parameters(sweep: Sweep) -> None:
    code, output = invoke("report", str(sweep.batched))
    assert code == 0, output

    page = (sweep.batched / "report.html").read_text(encoding="utf-8")
    data = re.search(r'<script[^>]* id="jobs-data"[^>]*>(.*?)</script>', page, re.DOTALL)
    assert data is not None
    jobs = json.loads(data[1])
    rows = manifest(sweep.batched)
    assert jobs.keys() == {row["id"] for row in rows}
    for row in rows:
        assert jobs[row["id"]]["prompt_2"] == "oil painting of a hearth"
        assert jobs[row["id"]]["image"] == row["path"]
        assert jobs[row["id"]]["parameters"] == png_text(sweep.batched / row["path"], "parameters")


def test_status_counts_the_finished_sweep(sweep: Sweep) -> None:
    code, output = invoke("status", str(sweep.batched))

    assert code == 0, output
    assert "out: 8 done, 0 failed" in output
    assert f"recipe {sweep.recipe}: 8 jobs, 8 done, 0 left" in output


# --- verify, resume, shards -----------------------------------------------------------------


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
    pixels = np.asarray(Image.open(copy / row["path"]).convert("RGB")).copy()
    pixels[5, 7, 1] ^= 1  # one level in one channel of one pixel
    Image.fromarray(pixels).save(copy / row["path"])
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


def test_fast_paths_run_sdxl_within_two_levels_and_are_recorded(
    sweep: Sweep, tmp_path: Path
) -> None:
    fast = tmp_path / "fast"
    options = ["--fast", "channels_last", "--fast", "vae_tiling", "--fast", "vae_slicing"]

    run(sweep.recipe, *options, "--output", str(fast))

    rows = rows_by_id(fast)
    assert {row["fast_paths"] for row in rows.values()} == {"channels_last,vae_tiling,vae_slicing"}
    plain = pixels_by_id(sweep.batched)
    assert rows.keys() == plain.keys()  # the same jobs: fast paths are not in the id
    for job_id, pixels in pixels_by_id(fast).items():
        assert np.abs(pixels - plain[job_id]).max() <= 2, job_id


# --- variations and feedback ----------------------------------------------------------------


def test_noise_variations_are_distinct_recorded_and_kept_by_with_variations(
    tiny_sdxl_folder: Path, tmp_path: Path
) -> None:
    body = ONE_PROMPT + "seeds: [7]\nvariations: {count: 2, amount: 0.5}\n"
    recipe = sdxl_recipe(tmp_path, tiny_sdxl_folder, body)
    run(recipe)

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
    recipe = sdxl_recipe(
        kept,
        tiny_sdxl_folder,
        body.replace(
            "variations: {count: 2, amount: 0.5}", f"with_variations: [[{seeds[0]}, 0.5]]"
        ),
    )
    run(recipe)
    (row,) = manifest(kept / "out")
    assert row["id"] == variation["id"]
    assert (
        max_level_difference(
            Image.open(kept / "out" / row["path"]), Image.open(tmp_path / "out" / variation["path"])
        )
        == 0
    )


def test_a_feedback_chain_starts_each_image_from_the_one_before(
    tiny_sdxl_folder: Path, tmp_path: Path, sdxl_engine: Engine
) -> None:
    body = ONE_PROMPT + (
        "seeds: [7, 8]\nvariations: {count: 2, mode: feedback}\ngrids: [{x: iteration, y: seed}]\n"
    )
    recipe = sdxl_recipe(tmp_path, tiny_sdxl_folder, body)
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
        alone = sdxl_engine.render(jobs[rows[1]["id"]], PreparedImage(parent.convert("RGB"), None))
    with Image.open(run_dir / rows[1]["path"]) as made:
        assert max_level_difference(made.convert("RGB"), alone) <= 1


# --- inpainting -----------------------------------------------------------------------------


def inpainting_run(model: Path, folder: Path) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """A transparent-hole picture run on `model`: its row, the init's and the image's pixels."""
    body = (
        "init_images: [pictures/hole.png]\nprompts: [a blue door]\nstrength: 0.75\nsteps: 4\n"
        f"seeds: [3]\nmask_blur: {MASK_BLUR}\n"
    )
    recipe = sdxl_recipe(folder, model, body)
    path = holed_picture(folder / "pictures" / "hole.png")
    run(recipe)
    (row,) = manifest(folder / "out")
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    made = np.asarray(Image.open(folder / "out" / row["path"]).convert("RGB"), dtype=np.int16)
    return row, original, made


def test_a_transparent_region_is_redrawn_by_blending_and_the_rest_kept(
    tiny_sdxl_folder: Path, tmp_path: Path
) -> None:
    row, original, made = inpainting_run(tiny_sdxl_folder, tmp_path)

    assert (row["status"], row["mask"], row["mask_blur"]) == ("done", "alpha", str(MASK_BLUR))
    assert np.array_equal(beyond_the_feathering(made), beyond_the_feathering(original))
    assert np.abs(hole(made) - hole(original)).mean() > 5


def test_an_sdxl_inpainting_unet_runs_and_keeps_the_opaque_part(
    tiny_sdxl_inpainting: Path, tmp_path: Path
) -> None:
    row, original, made = inpainting_run(tiny_sdxl_inpainting, tmp_path)

    assert (row["status"], row["mask"]) == ("done", "alpha")
    assert np.array_equal(beyond_the_feathering(made), beyond_the_feathering(original))
    assert np.abs(hole(made) - hole(original)).mean() > 5


def test_an_sdxl_inpainting_unet_is_given_the_mask_and_the_kept_image(
    tiny_sdxl_inpainting: Path, tmp_path: Path, job: Job
) -> None:
    model = resolve_model(str(tiny_sdxl_inpainting), Path("."))
    engine = Engine(model, device="cpu")
    assert engine.family.inpainting
    seen: list[torch.Tensor] = []
    engine.family.denoiser.conv_in.register_forward_hook(
        lambda _, inputs, __: seen.append(inputs[0])
    )
    path = holed_picture(tmp_path / "hole.png")
    holed = sdxl_job(job, model, init_image=init_image(path), width=SIZE, height=SIZE, mask_blur=0)

    engine.render(holed, prepare(path, (SIZE, SIZE)))

    first = seen[0]  # guided: unconditional and conditional halves, 4 + 1 + 4 channels
    assert first.shape == (2, 9, SIZE // 8, SIZE // 8)
    mask = first[0, 4]
    assert mask[0, 0] == 0 and mask[4, 4] == 1  # a corner is kept, the hole's middle redrawn
    assert first[0, 5:].abs().sum() > 0  # the kept image's latents


# --- intermediates --------------------------------------------------------------------------


def test_intermediates_are_strips_in_sdxl_colours_and_change_no_pixel(
    tiny_sdxl_folder: Path, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's jobs at cfg 4.0 for "fire": the same ids, made with strips this time.
    body = SWEEP.replace('prompts: [fire, "cheery open fire, photograph"]', "prompts: [fire]")
    body = body.replace("cfg: [4.0, 7.5]", "cfg: 4.0") + "intermediates: true\n"
    run(sdxl_recipe(tmp_path, tiny_sdxl_folder, body))

    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    assert len(rows) == 2 and {row["batch_size"] for row in rows} == {"1"}
    single = pixels_by_id(sweep.single)
    for row in rows:
        strip = run_dir / "intermediates" / Path(row["path"]).name
        record = json.loads(png_text(strip, STRIP_TEXT_KEY))
        assert record["job_id"] == row["id"]
        assert record["note"] == "approximate (linear latent->RGB, SDXL factors)"
        assert [step[0] for step in record["steps"]] == [0, 1, 2]  # the start and 2 steps
        made = np.asarray(Image.open(run_dir / row["path"]).convert("RGB"), dtype=np.int16)
        assert np.array_equal(made, single[row["id"]])


def test_exact_intermediates_decode_with_sdxls_vae_scaling(
    tiny_sdxl_folder: Path, tmp_path: Path
) -> None:
    """Exact frames are VAE decodes at SDXL's scaling factor: the last is the image itself."""
    body = ONE_PROMPT + "seeds: [5]\nintermediates: {mode: exact, x0: true}\n"
    run(sdxl_recipe(tmp_path, tiny_sdxl_folder, body))

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
