"""Init images are prepared once per file and size, the next batch's ahead of time."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image, UnidentifiedImageError

from batchgen.engine import init_images
from batchgen.engine.images import PreparedImage
from batchgen.jobs.job import InitImage
from tests.helpers import gradient, init_image, invoke, manifest, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Three init images, one job each, in batches of one: each batch's image is the next one's.
RECIPE = """
init_images: [pictures/gradient.png, pictures/wide.png, pictures/tall.png]
prompts: [fire]
strength: 0.5
steps: 4
seeds: [7]
"""


def test_the_next_batchs_init_images_are_prepared_while_a_batch_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = write_recipe(tmp_path, RECIPE)
    gradient(tmp_path / "pictures" / "wide.png", (80, 48))
    gradient(tmp_path / "pictures" / "tall.png", (48, 80))
    prepared_on: dict[str, list[str]] = {}
    prepare = init_images.prepare

    def recording(path: Path, size: tuple[int, int]) -> PreparedImage:
        prepared_on.setdefault(path.name, []).append(threading.current_thread().name)
        return prepare(path, size)

    monkeypatch.setattr(init_images, "prepare", recording)
    init_images.prepared.cache_clear()

    code, output = invoke("run", str(recipe), "--batch-size", "1")

    assert code == 0, output
    assert [row["status"] for row in manifest(tmp_path / "out")] == ["done"] * 3
    # The first batch's image is read when it starts; each later one was read, once, on the
    # prefetch thread while the batch before it rendered.
    assert prepared_on["gradient.png"] == ["MainThread"]
    for name in ("wide.png", "tall.png"):
        assert [thread.split("_")[0] for thread in prepared_on[name]] == ["batchgen-init-images"]


def test_a_prefetch_that_fails_is_dropped_and_the_job_meets_the_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    image = InitImage(broken, "broken.png", "0" * 64, 64, 64)
    job = SimpleNamespace(init_image=image, width=64, height=64)
    prefetcher = init_images.InitImagePrefetcher()
    try:
        assert prefetcher.ahead([job]).result() is None  # type: ignore[list-item]
    finally:
        prefetcher.close()
    with pytest.raises(UnidentifiedImageError):
        init_images.prepared(image, (64, 64))


def test_an_init_image_edited_between_two_runs_of_one_process_gives_its_new_pixels(
    tmp_path: Path,
) -> None:
    """The cache is keyed by the image's content, as job ids are: a notebook that edits an
    init image and runs the recipe again renders from the new pixels, not the cached ones."""
    path = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "red").save(path)
    before = init_image(path)
    assert init_images.prepared(before, (64, 64)).rgb.getpixel((0, 0)) == (255, 0, 0)

    Image.new("RGB", (64, 64), "blue").save(path)
    after = init_image(path)

    assert init_images.prepared(after, (64, 64)).rgb.getpixel((0, 0)) == (0, 0, 255)
