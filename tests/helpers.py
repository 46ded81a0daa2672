"""Helpers and constants that more than one test file uses (shared fixtures are in conftest.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from batchgen.cli import main
from batchgen.engine.images import PreparedImage, read_header
from batchgen.engine.schedulers import scheduler_spec
from batchgen.jobs.job import InitImage, Job
from batchgen.store.images import image_filename
from batchgen.store.manifest import ManifestRow

# --- paths --------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
"""The repository's root folder, where a fresh interpreter finds the batchgen package."""

DATA = Path(__file__).parent / "data"
"""tests/data: bad recipes and the pictures the recipe tests copy."""

# --- running the CLI on builtin:tiny --------------------------------------------------------

RECIPE = """
name: small
init_images: [pictures/gradient.png]
prompts: [fire, "cheery open fire, photograph"]
strength: [0.0, 0.5]
steps: 4
seeds: [7]
"""
"""Four jobs on pictures/gradient.png, two of them at strength 0 (no denoising steps)."""

RESUME_RECIPE = """
name: resume
init_images: [pictures/gradient.png]
prompts: [fire, "cheery open fire, photograph"]
strength: [0.5, 0.75]
steps: 4
seeds: [7]
"""
"""Four jobs that all take denoising steps, so that each has an image of its own making."""


def gradient(path: Path, size: tuple[int, int] = (64, 48)) -> None:
    """Saves an RGB gradient picture of `size` at `path`, for a recipe's init image."""
    x = np.linspace(0, 255, size[0], dtype=np.uint8)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)
    rgb = np.stack(np.broadcast_arrays(x[None, :], y[:, None], (x[None, :] // 2 + 60)), axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)


def write_recipe(folder: Path, text: str, name: str = "small") -> Path:
    """`text` as folder/<name>.yaml, output to folder/out, with the gradient it names."""
    (folder / "pictures").mkdir()
    gradient(folder / "pictures" / "gradient.png")
    path = folder / f"{name}.yaml"
    path.write_text(text + f"output: {folder / 'out'}\n")
    return path


def invoke(*args: str) -> tuple[int, str]:
    """Runs `batchgen ARGS` in this process and gives its exit code and output."""
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def manifest(run_dir: Path) -> list[dict[str, str]]:
    """manifest.csv's rows in job order."""
    # They are written as batches finish, and a batch holds the jobs that share a denoising
    # loop (here: the same strength).
    with (run_dir / "manifest.csv").open(newline="") as file:
        return sorted(csv.DictReader(file), key=lambda row: int(row["index"]))


def fail_batches_with(monkeypatch: pytest.MonkeyPatch, index: int, message: str) -> None:
    """Makes rendering fail, as a GPU out of memory would, for the batch that holds job `index`."""
    # Run with --batch-size 1 to fail that job alone.
    from batchgen.engine.img2img import Engine

    real_render_batch = Engine.render_batch

    def render_batch(self, jobs, inits, on_step=None):  # type: ignore[no-untyped-def]
        if any(job.index == index for job in jobs):
            raise RuntimeError(message)
        return real_render_batch(self, jobs, inits, on_step)

    monkeypatch.setattr(Engine, "render_batch", render_batch)


def imported_modules(*args: str) -> set[str]:
    """The modules `batchgen ARGS` (which must succeed) imports, run in a fresh interpreter."""
    probe = (
        "import sys\nfrom batchgen.cli import main\n"
        f"try:\n    main({list(args)!r})\nexcept SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "print(' '.join(sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return set(result.stdout.strip().splitlines()[-1].split())


def imports_torch(*args: str) -> bool:
    """Whether `batchgen ARGS` (which must succeed) imports torch or diffusers, run afresh."""
    # The commands that only read files must answer without that second of wait.
    return bool({"torch", "diffusers"} & imported_modules(*args))


# --- recipes --------------------------------------------------------------------------------


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    """`text` as folder/<name> as it is, with tests/data's red.png and blue-wide.png beside it."""
    pictures = folder / "pictures"
    pictures.mkdir(exist_ok=True)
    for picture in (DATA / "pictures").glob("*.png"):
        if picture.stem in ("red", "blue-wide"):
            (pictures / picture.name).write_bytes(picture.read_bytes())
    path = folder / name
    path.write_text(text)
    return path


# --- images ---------------------------------------------------------------------------------

# Small, and not square, so that a transposition would show.
DRAWING_WIDTH, DRAWING_HEIGHT = 64, 96
"""The size of conftest's init drawing and of its `job`."""


def init_image(path: Path) -> InitImage:
    """The InitImage for the picture at `path`, named by its file name, with its alpha flag."""
    header = read_header(path)
    return InitImage(path, path.name, header.sha256, header.width, header.height, header.has_alpha)


# A job in a batch differs from the same job alone by at most this many 8-bit levels on the
# CPU: the UNet's and VAE's kernels sum in another order for another batch size. Measured
# on builtin:tiny at 64×96: at most 1 level with every scheduler we offer (batches of 4), and
# in batches of 8 on 0.04% of the values (float difference at most 1.2e-4).
BATCH_TOLERANCE_LEVELS = 2
"""How many 8-bit levels a job rendered in a batch may differ from the same job alone."""


def max_level_difference(first: Image.Image, second: Image.Image) -> int:
    """The largest difference, in 8-bit levels, between two images' pixels."""
    return int(np.abs(np.asarray(first, np.int16) - np.asarray(second, np.int16)).max())


# --- the run folder's jobs and rows, without a model ------------------------------------------

INIT = InitImage(
    path=Path("/recipes/pictures/fire-drawing.png"),
    label="pictures/fire-drawing.png",
    sha256="ab" * 32,
    width=512,
    height=512,
)
"""A 512×512 init image that exists nowhere, for jobs and rows that are never rendered."""

JOB = Job(
    index=3,
    init_image=INIT,
    prompt="fire",
    negative_prompt="",
    strength=0.4,
    steps=10,
    steps_mode="nominal",
    cfg=7.5,
    seed=1592514025,
    scheduler="k_lms",
    width=384,
    height=384,
    fit=True,
    model="builtin:tiny@0123456789abcdef",
    dtype="float32",
    model_name="tiny",
)
"""Job 3 on INIT: fire at strength 0.4, 10 k_lms steps, 384×384, on builtin:tiny."""


def make_job(**changes: object) -> Job:
    """JOB with `changes`."""
    return dataclasses.replace(JOB, **changes)  # type: ignore[arg-type]


def make_row(job: Job = JOB, **changes: object) -> ManifestRow:
    """A done manifest row for `job`, with `changes`."""
    row = ManifestRow.from_job(
        job,
        status="done",
        path=f"images/{image_filename(job, 4)}",
        model_hash="0123456789",
        device="cpu",
        seconds=1.25,
        sha256="cd" * 32,
        error="",
    )
    return dataclasses.replace(row, **changes)  # type: ignore[arg-type]


def gradient_image(size: int = 16) -> Image.Image:
    """A small RGB gradient image, `size` pixels square, to write as a job's image."""
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 16, y * 16, (x + y) * 8) for y in range(size) for x in range(size)])
    return image


# --- runs on a family's tiny model (tests/test_family_runs.py, test_sdxl_runs.py, test_sd3_runs.py)

# 2 prompts × 2 cfg × 2 seeds; each family adds its scheduler and second prompt (Family.sweep).
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
# One job per seed: what the variations, feedback and intermediates tests build on.
ONE_PROMPT = "init_images: [pictures/gradient.png]\nprompts: [fire]\nstrength: 0.5\nsteps: 4\n"
# The inpainting pictures: a red frame around a transparent square with blue under it.
SIZE = 64
HOLE = (16, 16, 47, 47)  # inclusive box of the transparent square: latents 2..5 of 8
FRAME, HIDDEN = (200, 60, 40), (40, 80, 200)
MASK_BLUR = 2


def run(recipe: Path, *options: str) -> str:
    """`batchgen run RECIPE OPTIONS`, which must succeed; its output."""
    code, output = invoke("run", str(recipe), *options)
    assert code == 0, output
    return output


def fire_at_cfg_4(body: str) -> str:
    """The sweep's `body` cut to its jobs for "fire" at cfg 4.0: the same ids as the sweep's."""
    body = body.replace('prompts: [fire, "cheery open fire, photograph"]', "prompts: [fire]")
    return body.replace("cfg: [4.0, 7.5]", "cfg: 4.0")


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


def inpainting_run(model: Path, folder: Path) -> tuple[dict[str, str], np.ndarray, np.ndarray]:
    """A transparent-hole picture run on `model`: its row, the init's and the image's pixels."""
    body = (
        "init_images: [pictures/hole.png]\nprompts: [a blue door]\nstrength: 0.75\nsteps: 4\n"
        f"seeds: [3]\nmask_blur: {MASK_BLUR}\n"
    )
    recipe = write_recipe(folder, f"model: {model}\n{body}")
    path = holed_picture(folder / "pictures" / "hole.png")
    run(recipe)
    (row,) = manifest(folder / "out")
    return row, pixels(path), pixels(folder / "out" / row["path"])


# --- diffusers' own pipelines, what a family's pixels are checked against -----------------------


def local_pipeline(class_name: str, folder: Path) -> Any:
    """diffusers' `class_name` pipeline from `folder`, quiet, remembering the model's scheduler
    config for `use_scheduler`."""
    import diffusers

    pipe = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)
    return pipe


def use_scheduler(pipe: Any, name: str) -> None:
    """The pipeline's scheduler as batchgen builds `name`: its class, from the model's config."""
    import diffusers

    spec = scheduler_spec(name)
    scheduler_class = getattr(diffusers, spec.class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.model_scheduler_config, **spec.config)


def pipeline_pixels(pipe: Any, job: Job, init: PreparedImage, **options: Any) -> np.ndarray:
    """The job through a two-prompt pipeline (SDXL's, SD 3's) with the generator batchgen
    matches; an empty negative prompt is None, as a user leaves it out."""
    import torch

    use_scheduler(pipe, job.scheduler)
    images = pipe(
        prompt=job.prompt,
        prompt_2=job.prompt_2 or None,
        negative_prompt=job.negative_prompt or None,
        negative_prompt_2=job.negative_prompt_2 or None,
        image=init.rgb,
        strength=job.strength,
        num_inference_steps=job.steps_nominal,
        guidance_scale=job.cfg,
        generator=torch.Generator("cpu").manual_seed(job.seed),
        output_type="np",
        **options,
    ).images
    return np.asarray(images[0])
