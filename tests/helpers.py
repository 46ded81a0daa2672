"""Helpers and constants that more than one test file uses (shared fixtures are in conftest.py)."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from batchgen.cli import main
from batchgen.engine.images import read_header
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
