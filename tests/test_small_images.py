"""IMG2IMG.md's warning about init images under 512 px, and `upscale_small`: such images
are scaled up to the model's native size before encoding, and back down with `keep_size`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from batchgen.engine.images import upscaled_size
from tests.helpers import invoke, manifest, write_recipe

RECIPE = """
init_images: [pictures/gradient.png]
prompts: [fire]
strength: 0.5
steps: 4
seeds: [1]
width: 32
height: 24
upscale_small: true
"""


@pytest.mark.parametrize(
    ("size", "native", "expected"),
    [((32, 24), 64, (88, 64)), ((100, 50), 512, (1024, 512)), ((600, 512), 512, (600, 512))],
)
def test_the_shorter_side_is_scaled_up_to_the_native_side(
    size: tuple[int, int], native: int, expected: tuple[int, int]
) -> None:
    assert upscaled_size(size, native) == expected


def test_a_small_image_renders_at_the_models_native_size(tmp_path: Path) -> None:
    code, output = invoke("run", str(write_recipe(tmp_path, RECIPE)))
    assert code == 0, output

    (row,) = manifest(tmp_path / "out")
    # builtin:tiny's UNet sample size is 8 latents: 64 px.
    assert (row["width"], row["height"], row["render_size"]) == ("88", "64", "")
    with Image.open(tmp_path / "out" / row["path"]) as image:
        assert image.size == (88, 64)
    assert "renders at 88x64" in output and "upscale_small" in output  # still a real model's


def test_keep_size_scales_the_image_back_down(tmp_path: Path) -> None:
    code, output = invoke("run", str(write_recipe(tmp_path, RECIPE + "keep_size: true\n")))
    assert code == 0, output

    (row,) = manifest(tmp_path / "out")
    assert (row["width"], row["height"], row["render_size"]) == ("32", "24", "88x64")
    with Image.open(tmp_path / "out" / row["path"]) as image:
        assert image.size == (32, 24)
