"""How a comparison grid is drawn with Pillow: the sizes and positions of its title, labels and
cells (shrunk until the picture fits the limits), labels wrapped and shrunk to fit their room,
and the pixels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from batchgen.views.grid_plan import (
    AXIS_TITLES,
    Content,
    Grid,
    GridError,
    Table,
    axis_label,
    laid_out_axes,
)

# A grid never exceeds these; a larger one is drawn with smaller cells and says so in its
# title. 64 Mi pixels stays under Pillow's decompression-bomb warning (Image.MAX_IMAGE_PIXELS,
# 89,478,485 by default), so Pillow-based tools open every grid; 16,383 px a side is WebP's
# limit and within what browsers and image viewers display.
MAX_GRID_PIXELS = 64 * 1024 * 1024
MAX_GRID_SIDE = 16_383
MIN_CELL_SIDE = 16  # a grid that would need smaller cells to fit is refused: filter it
DEFAULT_CELL_SIDE = 256  # the longest side of a cell unless the spec says: images are capped

# DejaVu Sans (Latin, Greek, Cyrillic, punctuation, arrows, maths; licence in fonts/LICENSE).
FONT_FILE = Path(__file__).parent / "fonts" / "DejaVuSans.ttf"
MIN_FONT_SIZE = 11  # labels shrink to fit down to this size, then are cut with "…"
MAX_FONT_SIZE = 28

Colour = tuple[int, int, int]
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PLACEHOLDER_FILL = (234, 234, 234)
PLACEHOLDER_EDGE = (190, 190, 190)
PLACEHOLDER_INK = (90, 90, 90)
FAILED_INK = (165, 20, 20)
NOTE_INK = (170, 85, 0)


# ---------------------------------------------------------------------------------------------
# Layout: sizes and positions, shrunk until the grid fits the limits


@dataclass(frozen=True)
class _Style:
    cell: tuple[int, int]  # width, height
    margin: int
    font_size: int

    @property
    def padding(self) -> int:
        return max(2, self.font_size // 3)

    def scaled(self, factor: float) -> _Style:
        width, height = self.cell
        return _Style(
            (max(1, int(width * factor)), max(1, int(height * factor))),
            int(self.margin * factor),
            max(MIN_FONT_SIZE, int(self.font_size * factor)),
        )


def _style(grid: Grid) -> _Style:
    width, height = grid.image_size
    longest = grid.spec.cell or min(max(width, height), DEFAULT_CELL_SIDE)
    scale = longest / max(width, height)
    font_size = min(MAX_FONT_SIZE, max(MIN_FONT_SIZE, round(longest / 11)))
    return _Style((round(width * scale), round(height * scale)), grid.spec.margin, font_size)


@dataclass(frozen=True)
class _Text:
    lines: tuple[str, ...]
    size: int

    @property
    def height(self) -> int:
        return len(self.lines) * _line_height(self.size)


@dataclass(frozen=True)
class _TextItem:
    left: int
    top: int
    width: int  # lines are centred in it, or start at `left` when not `centred`
    text: _Text
    ink: Colour = INK
    centred: bool = True


@dataclass(frozen=True)
class _CellItem:
    box: tuple[int, int, int, int]  # left, top, width, height
    content: Content
    text: _Text  # the placeholder's, fitted to the box


@dataclass
class Layout:
    """Where every text and cell of a grid goes; `job_boxes` are the job cells' boxes, in cell
    order, as the grid's record lists them."""

    size: tuple[int, int]
    cells: list[_CellItem]
    texts: list[_TextItem]
    job_boxes: list[tuple[int, int, int, int]]


def fitting_layout(grid: Grid, tables: list[Table]) -> tuple[Layout, str]:
    """`grid` laid out at its natural size, or shrunk until it is within MAX_GRID_PIXELS and
    MAX_GRID_SIDE; and the note its title then shows ("" when it was not shrunk)."""
    natural = style = _style(grid)
    note = ""
    layout = _layout(grid, tables, style, note)
    while _over_limits(layout.size):
        width, height = layout.size
        factor = min(
            (MAX_GRID_PIXELS / (width * height)) ** 0.5, MAX_GRID_SIDE / max(width, height)
        )
        style = style.scaled(min(factor, 0.97))
        if min(style.cell) < MIN_CELL_SIDE:
            raise GridError(
                f"{grid.stem}: {len(grid.coordinates())} cells do not fit in {MAX_GRID_PIXELS:,} "
                f"pixels ({MAX_GRID_SIDE:,} px a side) even at {MIN_CELL_SIDE} px each; show "
                "fewer with `where`"
            )
        note = (
            f"downscaled: {style.cell[0]}×{style.cell[1]} px cells instead of "
            f"{natural.cell[0]}×{natural.cell[1]} to stay under {MAX_GRID_PIXELS:,} pixels "
            f"and {MAX_GRID_SIDE:,} px a side"
        )
        layout = _layout(grid, tables, style, note)
    return layout, note


def _over_limits(size: tuple[int, int]) -> bool:
    return size[0] * size[1] > MAX_GRID_PIXELS or max(size) > MAX_GRID_SIDE


def _layout(grid: Grid, tables: list[Table], style: _Style, note: str) -> Layout:
    """Title on top; under it the sub-grids side by side or stacked, whichever is closer to a
    screen's shape.
    Each sub-grid: its z label, column labels, then rows of [row label, cells]; `margin`
    around and between cells."""
    cell_width, cell_height = style.cell
    margin, pad, size = style.margin, style.padding, style.font_size
    line = _line_height(size)
    first = tables[0]
    column_texts = _fit_alike(first.column_labels, cell_width + margin - 2, 3 * line, size)
    column_strip = max(text.height for text in column_texts) + 2 * pad
    row_strip = 0
    if any(first.row_labels):
        widest = max(_font(size).getlength(label) for label in first.row_labels)
        row_strip = min(math.ceil(widest) + 2 * pad, max(cell_width, 10 * size))
    row_texts = _fit_alike(first.row_labels, row_strip - 2 * pad, cell_height, size)
    cells_left = margin + (row_strip + margin if row_strip else 0)
    columns, rows = len(first.column_labels), len(first.row_labels)
    table_width = cells_left + columns * (cell_width + margin)
    z_texts = _fit_alike(
        [table.title for table in tables], table_width - cells_left, 2 * line, size
    )
    z_strip = max(text.height for text in z_texts) + 2 * pad if first.title else 0
    cells_top = z_strip + column_strip + margin
    table_height = cells_top + rows * (cell_height + margin)

    gap = size
    count = len(tables)
    beside = (count * table_width + (count - 1) * gap, table_height)
    stacked = (table_width, count * table_height + (count - 1) * gap)
    side_by_side = _off_screen_shape(beside) <= _off_screen_shape(stacked)
    body_width, body_height = beside if side_by_side else stacked

    title_width = body_width - 2 * pad
    title = _title(grid, note, title_width, size)
    title_height = sum(text.height for text, _ in title) + 2 * pad

    layout = Layout((body_width, title_height + body_height), [], [], [])
    top = pad
    for text, ink in title:
        layout.texts.append(_TextItem(pad, top, title_width, text, ink, centred=False))
        top += text.height
    for number, (table, z_text) in enumerate(zip(tables, z_texts, strict=True)):
        left = number * (table_width + gap) if side_by_side else 0
        top = title_height + (0 if side_by_side else number * (table_height + gap))
        if table.title:  # centred over the cells
            cells_width = table_width - cells_left
            layout.texts.append(_TextItem(left + cells_left, top + pad, cells_width, z_text))
        for column, text in enumerate(column_texts):
            column_left = left + cells_left + column * (cell_width + margin)
            text_top = top + z_strip + (column_strip - text.height) // 2
            layout.texts.append(
                _TextItem(column_left - margin // 2, text_top, cell_width + margin, text)
            )
        for row, (text, contents) in enumerate(zip(row_texts, table.rows, strict=True)):
            row_top = top + cells_top + row * (cell_height + margin)
            if row_strip:
                text_top = row_top + (cell_height - text.height) // 2
                layout.texts.append(
                    _TextItem(left + margin + pad, text_top, row_strip - 2 * pad, text)
                )
            for column, content in enumerate(contents):
                box = (
                    left + cells_left + column * (cell_width + margin),
                    row_top,
                    cell_width,
                    cell_height,
                )
                placeholder = _fit(content.text, cell_width - 2 * pad, cell_height - 2 * pad, size)
                layout.cells.append(_CellItem(box, content, placeholder))
                if content.is_job_cell:
                    layout.job_boxes.append(box)
    return layout


def _title(grid: Grid, note: str, width: int, size: int) -> list[tuple[_Text, Colour]]:
    """The axes laid out, what every cell shares, and why the grid was downscaled."""
    line = _line_height(size)
    heading = " × ".join(AXIS_TITLES[axis] for axis in laid_out_axes(grid.spec))
    fixed = [axis_label(axis, value) for axis, value in grid.fixed.items()]
    title = [(_fit(heading, width, 2 * line, size), INK), (_pack(fixed, width, size), INK)]
    if note:
        title.append((_fit(note, width, 4 * line, size), NOTE_INK))
    return title


def _off_screen_shape(size: tuple[int, int]) -> float:
    """How far a picture's shape is from a 16:9 screen's (0 when it is 16:9)."""
    return abs(math.log(size[0] / max(1, size[1]) / (16 / 9)))


# ---------------------------------------------------------------------------------------------
# Drawing


def draw_grid(layout: Layout) -> Image.Image:
    """The picture `layout` describes; a cell whose image cannot be read says so."""
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for item in layout.cells:
        left, top, width, height = item.box
        picture = _picture(item.content.image, (width, height)) if item.content.image else None
        if picture is not None:
            offset = (left + (width - picture.width) // 2, top + (height - picture.height) // 2)
            canvas.paste(picture, offset)
            continue
        corner = (left + width - 1, top + height - 1)
        draw.rectangle((left, top, *corner), PLACEHOLDER_FILL, PLACEHOLDER_EDGE)
        text = item.text
        if item.content.image is not None:  # a file there but not an image Pillow can read
            text = _fit("cannot read the image", width - 4, height - 4, item.text.size)
        ink = FAILED_INK if item.content.failed else PLACEHOLDER_INK
        text_top = top + (height - text.height) // 2
        _draw_text(draw, _TextItem(left, text_top, width, text, ink))
    for text_item in layout.texts:
        _draw_text(draw, text_item)
    return canvas


def _picture(path: Path, box: tuple[int, int]) -> Image.Image | None:
    """The image at `path` scaled to fit `box`, or None when it cannot be read."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return ImageOps.contain(upright, box, Image.Resampling.LANCZOS)


def _draw_text(draw: ImageDraw.ImageDraw, item: _TextItem) -> None:
    font = _font(item.text.size)
    for number, line in enumerate(item.text.lines):
        indent = (item.width - font.getlength(line)) / 2 if item.centred else 0
        top = item.top + number * _line_height(item.text.size)
        draw.text((item.left + max(0, indent), top), line, font=font, fill=item.ink)


# ---------------------------------------------------------------------------------------------
# Text: the font, wrapping, shrinking to fit


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(FONT_FILE, size)
    except OSError:  # installed without its font file: Pillow's own (Latin letters only)
        font = ImageFont.load_default(size)
        assert isinstance(font, ImageFont.FreeTypeFont)
        return font


def _line_height(size: int) -> int:
    ascent, descent = _font(size).getmetrics()
    return ascent + descent


def _fit(text: str, width: int, height: int, size: int) -> _Text:
    """`text` wrapped to `width` at the largest size from `size` down to MIN_FONT_SIZE whose
    lines fit in `height` without breaking a word; at the smallest, cut short with "…"."""
    if not text:
        return _Text((), size)
    for candidate in range(size, MIN_FONT_SIZE - 1, -1):
        lines, broke_a_word = _wrap(text, _font(candidate), width)
        if not broke_a_word and len(lines) * _line_height(candidate) <= height:
            return _Text(tuple(lines), candidate)
    smallest = min(size, MIN_FONT_SIZE)
    font = _font(smallest)
    lines, _ = _wrap(text, font, width)
    room = height // _line_height(smallest)
    if len(lines) > room:
        lines = lines[:room]
        if lines:
            lines[-1] = _cut(lines[-1] + "…", font, width)
    return _Text(tuple(lines), smallest)


def _fit_alike(texts: list[str], width: int, height: int, size: int) -> list[_Text]:
    """Each of `texts` fitted, all at the size the longest needs: a strip of labels reads
    evenly."""
    size = min((_fit(text, width, height, size).size for text in texts), default=size)
    return [_fit(text, width, height, size) for text in texts]


def _pack(items: list[str], width: int, size: int) -> _Text:
    """`items` joined by " · ", with line breaks between items (inside one only if it is
    wider than a line)."""
    font = _font(size)
    lines: list[str] = []
    for item in items:
        if lines and font.getlength(f"{lines[-1]} · {item}") <= width:
            lines[-1] = f"{lines[-1]} · {item}"
        else:
            lines += _wrap(item, font, width)[0]
    return _Text(tuple(lines), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> tuple[list[str], bool]:
    """Greedy wrap at spaces and after "/" (paths); a word wider than `width` is broken.
    Also says whether one was."""
    lines: list[str] = []
    broke_a_word = False
    for paragraph in _shown(text).splitlines() or [""]:
        line = ""
        for piece in re.findall(r"\s+|[^\s/]*/|[^\s/]+", paragraph):
            if piece.isspace():
                line += " " if line else ""
            elif not line or font.getlength(line + piece) <= width:
                line += piece
            else:
                lines.append(line.rstrip())
                line = piece
            while len(line) > 1 and font.getlength(line) > width:  # one piece, too wide
                broke_a_word = True
                cut = max(1, len(_cut(line, font, width)))
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line.rstrip())
    return lines, broke_a_word


def _shown(text: str) -> str:
    """`text` with "□" for each character the font has no glyph for (it would draw nothing)."""
    return "".join(c if c.isspace() or _has_glyph(c) else "□" for c in text)


@lru_cache(maxsize=4096)
def _has_glyph(character: str) -> bool:
    font = _font(20)
    missing = font.getmask("\uffff")  # a non-character: the font's "no glyph" glyph
    drawn = font.getmask(character)
    return (drawn.size, bytes(drawn)) != (missing.size, bytes(missing))


def _cut(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The longest start of `text` that fits `width`, keeping a final "…" if it had one."""
    ending = "…" if text.endswith("…") else ""
    body = text.removesuffix(ending)
    while body and font.getlength(body + ending) > width:
        body = body[:-1]
    return body.rstrip() + ending
