"""Fixtures shared by the tests that run builtin:tiny in-process: one model load, one init
drawing and IMG2IMG.md's job for the whole session; and the resume recipe, before and after
a complete run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchgen.engine.images import PreparedImage, prepare, read_header
from batchgen.jobs.job import InitImage, Job
from batchgen.models.source import ModelSource, resolve_model
from tests.helpers import DRAWING_HEIGHT, DRAWING_WIDTH, RESUME_RECIPE, invoke, write_recipe


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """The tiny model is as fast on one thread, and several threads per process slow to a
    crawl when other test processes share the cores (spinning OpenMP workers)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny() -> ModelSource:
    return resolve_model("builtin:tiny", Path("."))


@pytest.fixture(scope="session")
def engine(tiny: ModelSource):  # type: ignore[no-untyped-def]  # torch loads only when asked
    from batchgen.engine.img2img import Engine

    return Engine(tiny, device="cpu")


@pytest.fixture(scope="session")
def init_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A drawing with edges and gradients, so that the VAE has something to encode."""
    y, x = np.mgrid[0:DRAWING_HEIGHT, 0:DRAWING_WIDTH]
    pixels = np.stack([x * 4 % 256, y * 2 % 256, (x + y) * 3 % 256], axis=-1)
    path = tmp_path_factory.mktemp("init") / "fire-drawing.png"
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="session")
def init(init_path: Path) -> PreparedImage:
    return prepare(init_path, (DRAWING_WIDTH, DRAWING_HEIGHT))


@pytest.fixture(scope="session")
def job(init_path: Path, tiny: ModelSource) -> Job:
    """IMG2IMG.md's example, at a tiny size: 10 steps at strength 0.7 with k_lms."""
    header = read_header(init_path)
    return Job(
        index=0,
        init_image=InitImage(init_path, init_path.name, header.sha256, header.width, header.height),
        prompt="cheery open fire, photograph",
        negative_prompt="",
        strength=0.7,
        steps=10,
        steps_mode="nominal",
        cfg=7.5,
        seed=1592514025,
        scheduler="k_lms",
        width=DRAWING_WIDTH,
        height=DRAWING_HEIGHT,
        fit=False,
        model=tiny.identity,
        dtype="float32",
    )


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """RESUME_RECIPE as tmp_path/resume.yaml, with its gradient (test_cli.py has its own)."""
    return write_recipe(tmp_path, RESUME_RECIPE, "resume")


@pytest.fixture
def done(recipe: Path) -> Path:
    """The run folder after a complete run of `recipe`."""
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    return recipe.parent / "out"


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL-architecture model with seeded random weights (tools/tiny_sdxl.py)."""
    from tools.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_refiner_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL's refiner: the second text encoder only, aesthetic-score time ids."""
    from tools.tiny_sdxl import write_tiny_sdxl

    return write_tiny_sdxl(tmp_path_factory.mktemp("refiner") / "tiny-refiner", refiner=True)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable-Diffusion-3-architecture model with seeded random weights
    (tools/tiny_sd3.py)."""
    from tools.tiny_sd3 import write_tiny_sd3

    return write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3(tiny_sd3_folder: Path) -> ModelSource:
    return resolve_model(str(tiny_sd3_folder), Path("."))


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_folder: Path) -> ModelSource:
    return resolve_model(str(tiny_sdxl_folder), Path("."))
