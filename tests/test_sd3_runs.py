"""Stable Diffusion 3 through the whole product (issue 19): recipes run on a tiny
SD3-architecture folder (tools/tiny_sd3.py) through the CLI — a batched sweep with per-job cfg
on the model's own flow-matching Euler, `prompt_2`, the A1111 `parameters` text, noise
variations and feedback chains, transparent-region inpainting by blending (flow matching's
`scale_noise` puts the kept latents back), intermediates with SD3's 16-channel latent→RGB
factors and exact VAE decodes, grids, the report, status, verify, resume, reruns and
`flow_heun`. tests/test_sd3.py checks the engine's pixels against diffusers' pipeline; this
file checks that everything built on the SD 1.x family holds for SD3 too.

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
from batchgen.engine.denoise import StepState
from batchgen.engine.images import PreparedImage, prepare
from batchgen.engine.img2img import Engine
from batchgen.jobs.job import Job
from batchgen.jobs.matrix import expand
from batchgen.models.source import ModelSource, resolve_model
from batchgen.recipe.load import load_recipe
from batchgen.views.intermediates import GAP, LABEL_HEIGHT, NOTE_HEIGHT, STRIP_TEXT_KEY
from tests.helpers import init_image, invoke, manifest, max_level_difference, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 prompts × 2 cfg × 2 seeds and no scheduler: the model's own flow-matching Euler (its shift
# of 3 included). `prompt_2` has a test of its own below.
SWEEP = """
init_images: [pictures/gradient.png]
prompts: [fire, "cheery open fire, photograph"]
negative_prompt: blurry
cfg: [4.0, 7.5]
seeds: [1, 2]
strength: 0.5
steps: 4
"""
SWEEP_JOBS = 8
MODEL_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# One job per seed: what the variations, feedback, intermediates and Heun tests build on.
ONE_PROMPT = "init_images: [pictures/gradient.png]\nprompts: [fire]\nstrength: 0.5\nsteps: 4\n"

# The inpainting pictures: a red frame around a transparent square with blue under it.
SIZE = 64
HOLE = (16, 16, 47, 47)  # inclusive box of the transparent square: latents 2..5 of 8
FRAME, HIDDEN = (200, 60, 40), (40, 80, 200)
MASK_BLUR = 2


# --- helpers --------------------------------------------------------------------------------


def sd3_recipe(folder: Path, model: Path, body: str, name: str = "small") -> Path:
    """`body` on the tiny SD3 at `model` as folder/<name>.yaml (tests.helpers.write_recipe:
    pictures/gradient.png beside it, output folder/out)."""
    return write_recipe(folder, f"model: {model}\n{body}", name)


def run(recipe: Path, *options: str) -> str:
    """`batchgen run RECIPE OPTIONS`, which must succeed; its output."""
    code, output = invoke("run", str(recipe), *options)
    assert code == 0, output
    return output


def rows_by_id(run_dir: Path) -> dict[str, dict[str, str]]:
    """manifest.csv's rows by job id."""
    with (run_dir / "manifest.csv").open(newline="") as file:
        return {row["id"]: row for row in csv.DictReader(file)}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def pixels_by_id(run_dir: Path) -> dict[str, np.ndarray]:
    return {job_id: pixels(run_dir / row["path"]) for job_id, row in rows_by_id(run_dir).items()}


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


def hole(image: np.ndarray) -> np.ndarray:
    left, top, right, bottom = HOLE
    return image[top : bottom + 1, left : right + 1]


def beyond_the_feathering(image: np.ndarray) -> np.ndarray:
    """The opaque pixels more than the blur's reach (3 × mask_blur) away from the hole."""
    keep = np.ones(image.shape[:2], dtype=bool)
    left, top, right, bottom = HOLE
    margin = 3 * MASK_BLUR
    keep[top - margin : bottom + margin + 1, left - margin : right + margin + 1] = False
    return image[keep]


# --- the model and the runs the tests share -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tools.tiny_sd3 import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def tiny_sd3(tiny_sd3_folder: Path) -> ModelSource:
    return resolve_model(str(tiny_sd3_folder), Path("."))


@pytest.fixture(scope="module")
def sd3_engine(one_torch_thread: None, tiny_sd3: ModelSource) -> Engine:
    return Engine(tiny_sd3, device="cpu")


@dataclass(frozen=True)
class Sweep:
    recipe: Path
    batched: Path  # --batch-size auto: the 8 jobs in one denoising loop
    single: Path  # --batch-size 1


@pytest.fixture(scope="module")
def sweep(
    one_torch_thread: None, tiny_sd3_folder: Path, tmp_path_factory: pytest.TempPathFactory
) -> Sweep:
    folder = tmp_path_factory.mktemp("sweep")
    recipe = sd3_recipe(folder, tiny_sd3_folder, SWEEP)
    run(recipe)
    run(recipe, "--batch-size", "1", "--output", str(folder / "single"))
    return Sweep(recipe, folder / "out", folder / "single")


# --- a batched sweep ------------------------------------------------------------------------


def test_a_sweep_with_per_job_cfg_runs_in_one_batch_on_the_models_scheduler(
    sweep: Sweep,
) -> None:
    rows = manifest(sweep.batched)

    assert len(rows) == SWEEP_JOBS and {row["status"] for row in rows} == {"done"}
    assert {(row["prompt"], row["cfg"], row["seed"]) for row in rows} == {
        (prompt, cfg, seed)
        for prompt in ("fire", "cheery open fire, photograph")
        for cfg in ("4.0", "7.5")
        for seed in ("1", "2")
    }
    assert {row["scheduler"] for row in rows} == {MODEL_SCHEDULER}  # no scheduler: the model's
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


def test_the_png_parameters_are_a1111s_infotext_with_flow_euler_as_euler(sweep: Sweep) -> None:
    row = next(row for row in manifest(sweep.batched) if row["cfg"] == "7.5")

    parameters = png_text(sweep.batched / row["path"], "parameters")

    # Forge's name for flow matching's Euler, what A1111-style readers show for SD3.
    assert parameters == (
        f"{row['prompt']}\nNegative prompt: blurry\n"
        f"Steps: 4, Sampler: Euler, CFG scale: 7.5, Seed: {row['seed']}, Size: 64x48, "
        f"Model hash: {row['model_hash']}, Model: tiny-sd3, Denoising strength: 0.5, "
        f"Version: batchgen {__version__}"
    )
    record = json.loads(png_text(sweep.batched / row["path"], "batchgen"))
    assert (record["id"], record["scheduler"]) == (row["id"], MODEL_SCHEDULER)


def test_prompt_2_runs_on_sd3_and_changes_the_image(
    tiny_sd3_folder: Path, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's "fire" jobs at cfg 4.0, with a second prompt for OpenCLIP bigG.
    body = SWEEP.replace('prompts: [fire, "cheery open fire, photograph"]', "prompts: [fire]")
    body = body.replace("cfg: [4.0, 7.5]", "cfg: 4.0") + "prompt_2: oil painting of a red square\n"
    run(sd3_recipe(tmp_path, tiny_sd3_folder, body))

    rows = manifest(tmp_path / "out")
    assert [row["status"] for row in rows] == ["done", "done"]
    assert {row["batch_size"] for row in rows} == {"2"}
    plain = {
        row["seed"]: row
        for row in manifest(sweep.batched)
        if (row["prompt"], row["cfg"]) == ("fire", "4.0")
    }
    for row in rows:
        assert row["prompt_2"] == "oil painting of a red square"
        record = json.loads(png_text(tmp_path / "out" / row["path"], "batchgen"))
        assert record["prompt_2"] == "oil painting of a red square"
        assert row["id"] != plain[row["seed"]]["id"]
        made = pixels(tmp_path / "out" / row["path"])
        assert np.abs(made - pixels(sweep.batched / plain[row["seed"]]["path"])).max() > 1


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
    (seeds,) = (sweep.batched / "grids").glob("seeds*.png")
    assert seeds.name == "seeds-cfg-7.5.png"
    record = json.loads(png_text(seeds, "batchgen-grid"))
    assert record["axes"] == {"x": [1, 2], "y": ["fire", "cheery open fire, photograph"]}
    assert sorted(record["jobs"]) == sorted(row["id"] for row in rows if row["cfg"] == "7.5")


def test_the_report_lists_every_job_with_its_image_and_parameters(sweep: Sweep) -> None:
    code, output = invoke("report", str(sweep.batched))
    assert code == 0, output

    page = (sweep.batched / "report.html").read_text(encoding="utf-8")
    data = re.search(r'<script[^>]* id="jobs-data"[^>]*>(.*?)</script>', page, re.DOTALL)
    assert data is not None
    jobs = json.loads(data[1])
    rows = manifest(sweep.batched)
    assert jobs.keys() == {row["id"] for row in rows}
    for row in rows:
        assert (jobs[row["id"]]["prompt"], jobs[row["id"]]["cfg"]) == (
            row["prompt"],
            float(row["cfg"]),
        )
        assert jobs[row["id"]]["image"] == row["path"]
        assert jobs[row["id"]]["parameters"] == png_text(sweep.batched / row["path"], "parameters")


def test_status_counts_the_finished_sweep(sweep: Sweep) -> None:
    code, output = invoke("status", str(sweep.batched))

    assert code == 0, output
    assert "out: 8 done, 0 failed" in output
    assert f"recipe {sweep.recipe}: 8 jobs, 8 done, 0 left" in output


# --- verify, resume, rerun ------------------------------------------------------------------


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


# --- variations and feedback ----------------------------------------------------------------


def test_noise_variations_are_distinct_recorded_and_kept_by_with_variations(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    body = ONE_PROMPT + "seeds: [7]\nvariations: {count: 2, amount: 0.5}\n"
    run(sd3_recipe(tmp_path, tiny_sd3_folder, body))

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
    run(sd3_recipe(kept, tiny_sd3_folder, kept_body))
    (row,) = manifest(kept / "out")
    assert row["id"] == variation["id"]
    assert np.array_equal(
        pixels(kept / "out" / row["path"]), pixels(tmp_path / "out" / variation["path"])
    )


def test_a_feedback_chain_starts_each_image_from_the_one_before(
    tiny_sd3_folder: Path, tmp_path: Path, sd3_engine: Engine
) -> None:
    body = ONE_PROMPT + (
        "seeds: [7, 8]\nvariations: {count: 2, mode: feedback}\ngrids: [{x: iteration, y: seed}]\n"
    )
    recipe = sd3_recipe(tmp_path, tiny_sd3_folder, body)
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
        alone = sd3_engine.render(jobs[rows[1]["id"]], PreparedImage(parent.convert("RGB"), None))
    with Image.open(run_dir / rows[1]["path"]) as made:
        assert max_level_difference(made.convert("RGB"), alone) <= 1


# --- inpainting by blending -----------------------------------------------------------------


def test_a_transparent_region_is_redrawn_by_blending_and_the_rest_kept(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    body = (
        "init_images: [pictures/hole.png]\nprompts: [a blue door]\nstrength: 0.75\nsteps: 4\n"
        f"seeds: [3]\nmask_blur: {MASK_BLUR}\n"
    )
    recipe = sd3_recipe(tmp_path, tiny_sd3_folder, body)
    path = holed_picture(tmp_path / "pictures" / "hole.png")
    run(recipe)

    (row,) = manifest(tmp_path / "out")
    original, made = pixels(path), pixels(tmp_path / "out" / row["path"])
    assert (row["status"], row["mask"], row["mask_blur"]) == ("done", "alpha", str(MASK_BLUR))
    assert row["scheduler"] == MODEL_SCHEDULER
    assert np.array_equal(beyond_the_feathering(made), beyond_the_feathering(original))
    assert np.abs(hole(made) - hole(original)).mean() > 5


@pytest.mark.parametrize("scheduler", ["flow_euler", "flow_heun"])
def test_kept_latents_are_put_back_at_flow_matchings_noise_level_of_the_next_step(
    sd3_engine: Engine,
    tiny_sd3: ModelSource,
    job: Job,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scheduler: str,
) -> None:
    """After each step the kept latents are σ·noise + (1 − σ)·clean at the σ of the step to
    come (scale_noise, not add_noise's √ᾱ mix), and clean after the last: what the model paints
    the hole to fit around."""
    path = holed_picture(tmp_path / "hole.png")
    holed = replace(
        job, model=tiny_sd3.identity, steps=4, strength=0.75, scheduler=scheduler, cfg=5.0,
        init_image=init_image(path), width=SIZE, height=SIZE, mask_blur=0,
    )  # fmt: skip
    drawn: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_prepare = sd3_engine.prepare_latents

    def prepare_latents(*args: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latents, noise, clean = real_prepare(*args)  # type: ignore[arg-type]
        drawn.append((noise, clean))
        return latents, noise, clean

    monkeypatch.setattr(sd3_engine, "prepare_latents", prepare_latents)
    states: list[StepState] = []
    sd3_engine.render(holed, prepare(path, (SIZE, SIZE)), states.append)

    ((noise, clean),) = drawn
    assert noise.shape == clean.shape == (1, 16, SIZE // 8, SIZE // 8)
    kept = torch.ones((SIZE // 8, SIZE // 8), dtype=torch.bool)
    kept[2:6, 2:6] = False  # the latents under the hole are redrawn
    steps = len(states) - 1
    assert steps == (3 if scheduler == "flow_euler" else 5)  # Heun: two calls a step but the last
    for state, following in zip(states[1:-1], states[2:], strict=True):
        sigma = following.timestep / 1000  # flow matching's timesteps are σ × 1000
        expected = sigma * noise + (1 - sigma) * clean
        assert torch.allclose(state.latents[:, :, kept], expected[:, :, kept], atol=1e-5)
        assert not torch.allclose(state.latents[:, :, ~kept], expected[:, :, ~kept], atol=1e-2)
    assert torch.equal(states[-1].latents[:, :, kept], clean[:, :, kept])


# --- intermediates --------------------------------------------------------------------------


def test_intermediates_are_strips_in_sd3_colours_and_change_no_pixel(
    tiny_sd3_folder: Path, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's jobs at cfg 4.0 for "fire": the same ids, made with strips this time.
    body = SWEEP.replace('prompts: [fire, "cheery open fire, photograph"]', "prompts: [fire]")
    body = body.replace("cfg: [4.0, 7.5]", "cfg: 4.0") + "intermediates: true\n"
    run(sd3_recipe(tmp_path, tiny_sd3_folder, body))

    run_dir = tmp_path / "out"
    rows = manifest(run_dir)
    assert len(rows) == 2 and {row["batch_size"] for row in rows} == {"1"}
    single = pixels_by_id(sweep.single)
    for row in rows:
        strip = run_dir / "intermediates" / Path(row["path"]).name
        record = json.loads(png_text(strip, STRIP_TEXT_KEY))
        assert record["job_id"] == row["id"]
        assert record["note"] == "approximate (linear latent->RGB, SD3 factors)"
        assert [step[0] for step in record["steps"]] == [0, 1, 2]  # the start and 2 steps
        assert pixels(strip)[NOTE_HEIGHT + LABEL_HEIGHT :].std() > 5  # 16 channels drawn
        assert np.array_equal(pixels(run_dir / row["path"]), single[row["id"]])


def test_exact_intermediates_decode_with_sd3s_scaling_and_shift(
    tiny_sd3_folder: Path, tmp_path: Path
) -> None:
    """Exact frames are VAE decodes with SD3's scaling and shift factors: the last is the
    image itself; the second row is flow matching's predicted x0 (x_t − σ·v)."""
    body = ONE_PROMPT + "seeds: [5]\nintermediates: {mode: exact, x0: true}\n"
    run(sd3_recipe(tmp_path, tiny_sd3_folder, body))

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
    below = strip.crop(
        (left, top + cell.height + GAP, left + cell.width, top + 2 * cell.height + GAP)
    )
    assert np.asarray(below).std() > 5


# --- the other flow scheduler ---------------------------------------------------------------


def test_flow_heun_runs_and_makes_other_images_than_flow_euler(
    tiny_sd3_folder: Path, tmp_path: Path, sweep: Sweep
) -> None:
    # The sweep's "fire" jobs at cfg 4.0, with Heun instead of the model's Euler.
    body = SWEEP.replace('prompts: [fire, "cheery open fire, photograph"]', "prompts: [fire]")
    body = body.replace("cfg: [4.0, 7.5]", "cfg: 4.0") + "scheduler: flow_heun\n"
    run(sd3_recipe(tmp_path, tiny_sd3_folder, body))

    rows = manifest(tmp_path / "out")
    assert [row["status"] for row in rows] == ["done", "done"]
    assert {row["scheduler"] for row in rows} == {"flow_heun"}
    assert {row["steps_taken"] for row in rows} == {"2"}
    euler = {
        row["seed"]: row
        for row in manifest(sweep.batched)
        if (row["prompt"], row["cfg"]) == ("fire", "4.0")
    }
    for row in rows:
        assert row["id"] != euler[row["seed"]]["id"]  # the scheduler is in the id
        heun = pixels(tmp_path / "out" / row["path"])
        assert np.abs(heun - pixels(sweep.batched / euler[row["seed"]]["path"])).mean() > 1
        assert "Sampler: Heun," in png_text(tmp_path / "out" / row["path"], "parameters")
