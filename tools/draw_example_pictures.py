"""Draws recipes/pictures/fire-drawing.png: a child's drawing of a fireplace, after the seed
doc's example (the original is not ours to ship). Re-running writes the same pixels."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "recipes" / "pictures" / "fire-drawing.png"


def draw() -> Image.Image:
    image = Image.new("RGB", (256, 256), (236, 230, 214))
    pen = ImageDraw.Draw(image)
    pen.rectangle((28, 60, 228, 236), fill=(150, 70, 50), outline=(60, 30, 20), width=4)
    for row, y in enumerate(range(60, 236, 22)):  # bricks
        pen.line((28, y, 228, y), fill=(95, 45, 30), width=2)
        for x in range(28 + (row % 2) * 20, 228, 40):
            pen.line((x, y, x, y + 22), fill=(95, 45, 30), width=2)
    pen.rectangle((18, 44, 238, 64), fill=(110, 80, 60), outline=(60, 30, 20), width=3)
    pen.rectangle((72, 120, 184, 236), fill=(30, 25, 25), outline=(60, 30, 20), width=4)
    pen.polygon(
        [(84, 228), (100, 150), (116, 190), (128, 128), (142, 186), (158, 146), (172, 228)],
        fill=(235, 90, 30),
    )
    pen.polygon([(104, 228), (116, 180), (128, 160), (140, 182), (152, 228)], fill=(250, 200, 60))
    pen.rectangle((80, 224, 176, 236), fill=(90, 55, 30))
    return image


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    draw().save(OUT)
    print(f"wrote {OUT}")
