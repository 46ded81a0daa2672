"""Transparent regions (IMG2IMG.md): only they are redrawn, starting from the colour under
them; the opaque rest stays the original. A mask file does the same for any init image."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from batchgen.engine.images import PreparedImage, prepare
from batchgen.engine.img2img import Engine
from batchgen.engine.masks import latent_mask, redraw_mask
from batchgen.jobs.job import Job
from batchgen.models.source import ModelSource, resolve_model
from tests.helpers import init_image, invoke, manifest, write_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
HOLE = (16, 16, 47, 47)  # inclusive box of the transparent square
FRAME = (200, 60, 40)
HIDDEN_BLUE, HIDDEN_GREEN = (40, 80, 200), (40, 190, 60)


def holed_picture(path: Path, hidden: tuple[int, int, int], alpha_in_hole: int = 0) -> Path:
    """A red picture whose middle square is transparent, `hidden` colour under it."""
    image = Image.new("RGBA", (SIZE, SIZE), (*FRAME, 255))
    ImageDraw.Draw(image).rectangle(HOLE, fill=(*hidden, alpha_in_hole))
    image.save(path)
    return path


def on(job: Job, path: Path, **changes: object) -> Job:
    return replace(job, init_image=init_image(path), width=SIZE, height=SIZE, **changes)  # type: ignore[arg-type]


def render(engine: Engine, job: Job) -> np.ndarray:
    init = prepare(job.init_image.path, (job.width, job.height))
    return np.asarray(engine.render(job, init), dtype=np.int16)


def inside(pixels: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return pixels[top : bottom + 1, left : right + 1]


def opaque_ring(pixels: np.ndarray, margin: int) -> np.ndarray:
    """The pixels at least `margin` px outside the hole."""
    keep = np.ones(pixels.shape[:2], dtype=bool)
    left, top, right, bottom = HOLE
    keep[max(0, top - margin) : bottom + margin + 1, max(0, left - margin) : right + margin + 1] = (
        False
    )
    return pixels[keep]


def test_a_mask_file_edited_between_runs_of_one_process_is_read_again(
    tmp_path: Path, job: Job
) -> None:
    """Masks are cached by content, as init images are (see test_init_images.py)."""
    path = tmp_path / "mask.png"
    init = PreparedImage(Image.new("RGB", (64, 64)), None)
    masks = []
    for colour in ("white", "black"):  # redraw everything, then nothing
        Image.new("L", (64, 64), colour).save(path)
        masks.append(redraw_mask(replace(job, mask=init_image(path), mask_blur=0), init))
    assert masks[0] is not None and masks[1] is not None
    assert masks[0].min() == 1.0 and masks[1].max() == 0.0


def test_only_the_transparent_region_is_redrawn(tmp_path: Path, engine: Engine, job: Job) -> None:
    path = holed_picture(tmp_path / "hole.png", HIDDEN_BLUE)
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    made = render(engine, on(job, path, mask_blur=2))

    # Beyond the feathered edge the original comes back exactly; the hole is redrawn.
    assert np.array_equal(opaque_ring(made, margin=3 * 2), opaque_ring(original, margin=3 * 2))
    assert np.abs(inside(made, HOLE) - inside(original, HOLE)).mean() > 5


def test_the_colour_under_transparent_pixels_is_the_starting_point(
    tmp_path: Path, engine: Engine, job: Job
) -> None:
    blue = render(engine, on(job, holed_picture(tmp_path / "blue.png", HIDDEN_BLUE), strength=0.4))
    green = render(
        engine, on(job, holed_picture(tmp_path / "green.png", HIDDEN_GREEN), strength=0.4)
    )

    blue_mean = inside(blue, (24, 24, 39, 39)).reshape(-1, 3).mean(0)
    green_mean = inside(green, (24, 24, 39, 39)).reshape(-1, 3).mean(0)
    assert blue_mean[2] > green_mean[2] + 30 and green_mean[1] > blue_mean[1] + 30


def test_a_fully_opaque_image_renders_as_plain_img2img(
    tmp_path: Path, engine: Engine, job: Job
) -> None:
    opaque = holed_picture(tmp_path / "opaque.png", HIDDEN_BLUE, alpha_in_hole=255)
    plain = tmp_path / "plain.png"
    Image.open(opaque).convert("RGB").save(plain)

    assert np.array_equal(render(engine, on(job, opaque)), render(engine, on(job, plain)))


def test_a_mask_file_redraws_its_white_and_invert_mask_swaps_the_regions(
    tmp_path: Path, engine: Engine, job: Job
) -> None:
    plain = tmp_path / "plain.png"
    Image.open(holed_picture(tmp_path / "hole.png", HIDDEN_BLUE)).convert("RGB").save(plain)
    mask_path = tmp_path / "mask.png"
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle(HOLE, fill=255)
    mask.save(mask_path)
    original = np.asarray(Image.open(plain), dtype=np.int16)
    masked = on(job, plain, mask=init_image(mask_path), mask_blur=0)

    made = render(engine, masked)
    inverted = render(engine, replace(masked, invert_mask=True))

    assert np.array_equal(opaque_ring(made, margin=1), opaque_ring(original, margin=1))
    assert np.abs(inside(made, HOLE) - inside(original, HOLE)).mean() > 5
    assert np.array_equal(inside(inverted, (17, 17, 46, 46)), inside(original, (17, 17, 46, 46)))
    assert np.abs(opaque_ring(inverted, 1) - opaque_ring(original, 1)).mean() > 5


def test_mask_blur_feathers_the_edge(tmp_path: Path, job: Job) -> None:
    path = holed_picture(tmp_path / "hole.png", HIDDEN_BLUE)
    init = prepare(path, (SIZE, SIZE))

    sharp = redraw_mask(on(job, path, mask_blur=0), init)
    soft = redraw_mask(on(job, path, mask_blur=4), init)

    assert sharp is not None and soft is not None
    assert set(np.unique(sharp)) == {0.0, 1.0}
    row = soft[32]  # across the hole's middle: rises from 0 to 1 over a few pixels
    assert row[5] == 0 and row[32] == 1 and 0 < row[16] < 1 and 0 < row[13] < row[18]


def test_a_latent_is_redrawn_where_any_pixel_under_it_is() -> None:
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[9, 9] = 0.5

    latent = latent_mask(mask, (2, 2))

    assert latent.shape == (1, 1, 2, 2) and latent[0, 0, 1, 1] == 0.5 and latent.sum() == 0.5


def test_a_run_records_the_mask_and_inpainting_changes_the_job_id(tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "init_images: [pictures/hole.png]\nprompts: [fire]\nstrength: 0.5\nsteps: 4\n"
        "seeds: [1]\nmask_blur: [2]\n".replace("mask_blur: [2]", "mask_blur: 2"),
    )
    holed_picture(tmp_path / "pictures" / "hole.png", HIDDEN_BLUE)
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    (row,) = manifest(tmp_path / "out")
    assert (row["mask"], row["mask_blur"], row["invert_mask"]) == ("alpha", "2", "false")

    recipe.write_text(recipe.read_text().replace("mask_blur: 2", "mask_blur: 3"))
    code, output = invoke("run", str(recipe))
    assert code == 0 and "1 made" in output  # another blur is another image


@pytest.fixture(scope="module")
def inpainting_model(tmp_path_factory: pytest.TempPathFactory, tiny: ModelSource) -> ModelSource:
    """builtin:tiny with its UNet widened to SD inpainting's 9 input channels (random
    weights: this checks what the UNet is given, not what it paints)."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("inpainting") / "tiny-inpainting"
    shutil.copytree(tiny.path, folder)
    config = dict(UNet2DConditionModel.load_config(folder / "unet"))
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(folder / "unet")
    return resolve_model(str(folder), folder.parent)


def test_an_inpainting_unet_is_given_the_mask_and_the_kept_image(
    tmp_path: Path, inpainting_model: ModelSource, job: Job
) -> None:
    engine = Engine(inpainting_model, device="cpu")
    seen: list[torch.Tensor] = []
    engine.family.unet.conv_in.register_forward_hook(lambda _, inputs, __: seen.append(inputs[0]))
    path = holed_picture(tmp_path / "hole.png", HIDDEN_BLUE)
    original = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    holed = on(job, path, model=inpainting_model.identity, mask_blur=0)

    made = render(engine, holed)

    first = seen[0]  # guided: unconditional and conditional halves, 4 + 1 + 4 channels
    assert first.shape == (2, 9, SIZE // 8, SIZE // 8)
    mask = first[0, 4]
    assert mask[0, 0] == 0 and mask[4, 4] == 1  # a corner is kept, the hole's middle redrawn
    assert np.array_equal(opaque_ring(made, margin=1), opaque_ring(original, margin=1))
    plain = tmp_path / "plain.png"
    Image.open(path).convert("RGB").save(plain)
    render(engine, on(job, plain, model=inpainting_model.identity))  # no mask: all redrawn
    assert bool((seen[-1][:, 4] == 1).all())
