"""Init images as a user hands them over: phone photos with EXIF rotation, transparency,
grayscale, palettes; sizes chosen from width/height/fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batchgen.engine.images import InitImageError, output_size, prepare, read_header


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 24), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 24))  # a red band on the stored image's left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=100)

    header = read_header(path)
    assert (header.width, header.height) == (24, 40)
    prepared = prepare(path, (24, 40)).rgb
    assert prepared.size == (24, 40)
    top_row = np.asarray(prepared)[0]
    assert top_row[:, 0].mean() > 200 and top_row[:, 2].mean() < 60  # the band is now on top


def test_rgba_keeps_the_colour_under_transparent_pixels_and_the_alpha(tmp_path: Path) -> None:
    image = Image.new("RGBA", (16, 16), (200, 100, 50, 255))
    image.putpixel((3, 3), (10, 220, 30, 0))  # transparent, but its colour must survive
    image.save(tmp_path / "holes.png")

    prepared = prepare(tmp_path / "holes.png", (16, 16))
    assert prepared.rgb.mode == "RGB"
    assert prepared.rgb.getpixel((3, 3)) == (10, 220, 30)
    assert prepared.alpha is not None and prepared.alpha.getpixel((3, 3)) == 0


def test_opaque_rgba_grayscale_and_palette_become_plain_rgb(tmp_path: Path) -> None:
    Image.new("RGBA", (16, 16), (1, 2, 3, 255)).save(tmp_path / "opaque.png")
    Image.new("L", (16, 16), 128).save(tmp_path / "gray.png")
    Image.new("P", (16, 16), 5).save(tmp_path / "palette.png")
    for name in ("opaque.png", "gray.png", "palette.png"):
        prepared = prepare(tmp_path / name, (16, 16))
        assert prepared.rgb.mode == "RGB" and prepared.alpha is None, name
    assert prepare(tmp_path / "gray.png", (16, 16)).rgb.getpixel((0, 0)) == (128, 128, 128)


def test_prepare_resizes_to_the_job_size(tmp_path: Path) -> None:
    Image.new("RGB", (100, 60), (9, 9, 9)).save(tmp_path / "big.png")
    assert prepare(tmp_path / "big.png", (48, 32)).rgb.size == (48, 32)


@pytest.mark.parametrize(
    ("source", "width", "height", "fit", "expected"),
    [
        ((250, 130), None, None, False, (248, 128)),  # own size, rounded down to /8
        ((200, 100), 96, None, False, (96, 48)),  # one side given: aspect kept
        ((200, 100), None, 64, False, (128, 64)),
        ((200, 100), 64, 64, False, (64, 64)),  # both: exactly that, stretched
        ((200, 100), 64, 64, True, (64, 32)),  # fit: inside the box, aspect kept
        ((40, 24), 64, 64, True, (40, 24)),  # fit never upscales
    ],
)
def test_output_size(source, width, height, fit, expected) -> None:  # type: ignore[no-untyped-def]
    assert output_size(source, width, height, fit) == expected


def test_a_file_that_is_not_an_image_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(InitImageError, match="not an image Pillow can read"):
        read_header(tmp_path / "notes.png")
