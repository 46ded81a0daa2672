"""Comparing a run's images with a reference run's, job by job: the check a CI reproduction
job runs (`batchgen verify RUN_DIR --against REF`).

Jobs are matched by id, which covers everything that determines the pixels, and images are
compared as decoded pixels, not file bytes: a PNG re-saved with other text chunks or another
compression still matches. Torch-free, so checking two run folders loads no model.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from rich import box
from rich.console import Console
from rich.table import Table

from batchgen.errors import BatchgenError
from batchgen.store.files import SHARD_LEDGER_DIR, write_png_atomically
from batchgen.store.manifest import Ledger, Manifest, ManifestRow, require_run_folder

MAX_LEVEL = 255  # 8-bit pixels: differences and PSNR are in these levels
EXTRA_JOBS_SHOWN = 20  # a reference that is a small sample of a big run lists no more

# The difference images: reference | run | difference, on a dark band with labels on top.
PANEL_GAP = 4
LABEL_BAND = 16
LABEL_FONT_SIZE = 11
PANEL_BACKGROUND = (40, 40, 40)
LABEL_INK = (235, 235, 235)

# Pillow's ways of saying a file is no image it can decode.
_UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class VerifyError(BatchgenError):
    """The run or the reference cannot be read as a batchgen run; the message says what to do."""


@dataclass(frozen=True)
class Tolerance:
    """How far a run's pixels may be from the reference's and still match.

    `max_diff` is the largest absolute difference allowed in any channel of any pixel, in
    8-bit levels (0 = identical, the CPU guarantee; 255 = no limit). `min_psnr` (dB over all
    channels) is a second, optional bar. A pair matches when it clears both. GPU runs need
    room: fp16 kernels change the last bits with the batch size.
    """

    max_diff: int = 0
    min_psnr: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.max_diff <= MAX_LEVEL:
            raise ValueError(f"max_diff is in 8-bit levels, 0 to {MAX_LEVEL}: {self.max_diff}")

    @classmethod
    def from_options(cls, max_diff: int | None, min_psnr: float | None) -> Tolerance:
        """The tolerance a user means by the thresholds they gave: only those apply, and none
        at all means exact. (`--min-psnr 40` alone must not also demand a max diff of 0.)"""
        if max_diff is None:
            max_diff = 0 if min_psnr is None else MAX_LEVEL
        return cls(max_diff, min_psnr)

    def allows(self, max_diff: int, psnr: float) -> bool:
        return max_diff <= self.max_diff and (self.min_psnr is None or psnr >= self.min_psnr)

    def __str__(self) -> str:
        if self.max_diff == 0:
            return "exact"
        limits = [f"max diff ≤ {self.max_diff}"] if self.max_diff < MAX_LEVEL else []
        if self.min_psnr is not None:
            limits.append(f"PSNR ≥ {self.min_psnr:g} dB")
        return ", ".join(limits) or "any pixels, same size"


@dataclass(frozen=True)
class Comparison:
    """A reference job, the same job in the run, and how far apart their pixels are."""

    reference: ManifestRow
    row: ManifestRow  # the run's
    max_diff: int | None  # None when the pixels could not be compared: see `notes`
    psnr: float | None  # dB; inf for identical pixels
    passed: bool
    notes: tuple[str, ...] = ()
    diff_image: Path | None = None  # reference | run | difference, when one was written


@dataclass(frozen=True)
class Verification:
    """The outcome of `verify_run`: every finished reference job, found in the run or not.

    Missing and mismatched jobs fail a verification; extra jobs (finished in the run, absent
    from the reference) do not, so a reference may be a small sample of a bigger sweep.
    """

    run_dir: Path
    reference_dir: Path
    tolerance: Tolerance
    comparisons: tuple[Comparison, ...]  # in the reference's job order
    missing: tuple[ManifestRow, ...]  # reference rows with no finished job in the run
    extra: tuple[ManifestRow, ...]  # run rows with no finished job in the reference
    diff_dir: Path | None

    @property
    def matched(self) -> list[Comparison]:
        return [comparison for comparison in self.comparisons if comparison.passed]

    @property
    def mismatched(self) -> list[Comparison]:
        return [comparison for comparison in self.comparisons if not comparison.passed]

    @property
    def ok(self) -> bool:
        return not self.mismatched and not self.missing


def verify_run(
    run_dir: Path,
    reference: Path,
    tolerance: Tolerance = Tolerance(),
    diff_dir: Path | None = None,
) -> Verification:
    """Compare every finished job of `reference` with the same job (by id) in `run_dir`.

    Each of the two is a run folder (all its ledgers read as one) or one manifest CSV file of
    a run (that ledger alone; the run folder is its folder, or the one above `manifests/`).
    Only `done` rows count. With `diff_dir`, a difference image is written there for each
    mismatch whose pixels could be read, named `<index>-<id[:8]>.png`.

    Raises VerifyError when either is not a run or the reference has no finished job, and
    store.ManifestError when a manifest is not batchgen's.
    """
    run_dir, run_rows = _finished_rows(Path(run_dir), "run")
    reference_dir, reference_rows = _finished_rows(Path(reference), "reference")
    if not reference_rows:
        raise VerifyError(
            f"reference {reference} has no finished image to compare with: finish its run "
            "(run its recipe again) or give another reference."
        )
    if diff_dir is not None:
        _make_folder(diff_dir)
    comparisons = tuple(
        _compare(run_dir, run_rows[job_id], reference_dir, row, tolerance, diff_dir)
        for job_id, row in reference_rows.items()
        if job_id in run_rows
    )
    return Verification(
        run_dir=run_dir,
        reference_dir=reference_dir,
        tolerance=tolerance,
        comparisons=comparisons,
        missing=tuple(row for job_id, row in reference_rows.items() if job_id not in run_rows),
        extra=tuple(row for job_id, row in run_rows.items() if job_id not in reference_rows),
        diff_dir=diff_dir,
    )


# ---------------------------------------------------------------------------------------------
# Reading the two runs


def _finished_rows(path: Path, role: str) -> tuple[Path, dict[str, ManifestRow]]:
    """The run folder `path` names and its latest `done` row of each job, in job order."""
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == SHARD_LEDGER_DIR else path.parent
        latest = {row.id: row for row in Ledger(path).rows()}  # the last row of an id wins
    else:
        require_run_folder(path, role, ledger=True)
        run_dir = path
        latest = Manifest(path).latest()
    done = sorted(
        (row for row in latest.values() if row.status == "done"),
        key=lambda row: (row.index, row.id),
    )
    return run_dir, {row.id: row for row in done}


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise VerifyError(
            f"cannot write difference images to {folder}: {error.strerror}. Give another folder."
        ) from None


def _read_pixels(
    run_dir: Path, row: ManifestRow, *, of_reference: bool
) -> tuple[np.ndarray | None, list[str]]:
    """The image's decoded pixels (H×W×3, or ×4 when it has transparency) and notes on what
    is wrong with its file; no pixels when it is missing or unreadable, which makes a mismatch
    rather than a crash, so the other jobs are still checked."""
    whose, its = ("reference ", "its") if of_reference else ("", "the")
    try:
        data = (run_dir / row.path).read_bytes()
    except FileNotFoundError:
        return None, [f"{whose}image missing: {row.path}"]
    except OSError as error:
        return None, [f"{whose}image unreadable: {error.strerror}"]
    notes = []
    if hashlib.sha256(data).hexdigest() != row.sha256:
        notes.append(f"{whose}file changed since {its} run")
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGBA" if image.has_transparency_data else "RGB"))
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        return None, [*notes, f"{whose}image unreadable: not an image file"]
    except _UNREADABLE_IMAGE as error:
        return None, [*notes, f"{whose}image unreadable: {error}"]
    return pixels, notes


# ---------------------------------------------------------------------------------------------
# Comparing one job


def _compare(
    run_dir: Path,
    row: ManifestRow,
    reference_dir: Path,
    reference: ManifestRow,
    tolerance: Tolerance,
    diff_dir: Path | None,
) -> Comparison:
    expected, reference_notes = _read_pixels(reference_dir, reference, of_reference=True)
    actual, notes = _read_pixels(run_dir, row, of_reference=False)
    notes = reference_notes + notes
    if row.model_hash != reference.model_hash:
        notes.append(f"model changed: hash {reference.model_hash or '?'} → {row.model_hash or '?'}")
    max_diff = psnr = None
    if expected is not None and actual is not None:
        expected, actual = _same_channels(expected, actual)
        if expected.shape == actual.shape:
            max_diff, psnr = _distance(expected, actual)
        else:
            notes.append(f"size {_size(actual)}, reference {_size(expected)}")
    passed = max_diff is not None and psnr is not None and tolerance.allows(max_diff, psnr)
    diff_image = None
    if not passed:
        if row.device != reference.device:  # e.g. another CPU thread count: the last bits move
            notes.append(f"device {row.device}, reference {reference.device}")
        if diff_dir is not None and expected is not None and actual is not None:
            diff_image = diff_dir / f"{row.index:04d}-{row.id[:8]}.png"
            _write_difference(diff_image, expected, actual)
    return Comparison(reference, row, max_diff, psnr, passed, tuple(notes), diff_image)


def _same_channels(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both RGBA when one has transparency: an opaque RGBA image equals its RGB twin."""
    if first.shape[-1] == second.shape[-1]:
        return first, second
    return _opaque(first), _opaque(second)


def _opaque(pixels: np.ndarray) -> np.ndarray:
    if pixels.shape[-1] == 4:
        return pixels
    alpha = np.full((*pixels.shape[:-1], 1), MAX_LEVEL, dtype=pixels.dtype)
    return np.concatenate([pixels, alpha], axis=-1)


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[1]}x{pixels.shape[0]}"


def _distance(expected: np.ndarray, actual: np.ndarray) -> tuple[int, float]:
    """The largest absolute difference of any channel of any pixel, and the PSNR in dB."""
    difference = np.abs(expected.astype(np.int16) - actual.astype(np.int16))
    mean_square = float(np.mean(np.square(difference, dtype=np.float64)))
    psnr = math.inf if mean_square == 0 else 10 * math.log10(MAX_LEVEL**2 / mean_square)
    return int(difference.max()), psnr


def _write_difference(path: Path, expected: np.ndarray, actual: np.ndarray) -> None:
    """reference | run | difference side by side (the last only when the sizes agree).

    The difference is each pixel's largest channel difference, stretched so the largest in
    the image is white: a one-level difference, invisible by eye, shows as plainly as a big
    one. The label gives the stretch factor.
    """
    panels = [("reference", Image.fromarray(expected)), ("run", Image.fromarray(actual))]
    if expected.shape == actual.shape:
        difference = np.abs(expected.astype(np.int16) - actual.astype(np.int16)).max(axis=-1)
        largest = max(int(difference.max()), 1)
        stretched = (difference * (MAX_LEVEL / largest)).round().astype(np.uint8)
        panels.append((f"diff x{MAX_LEVEL / largest:.3g}", Image.fromarray(stretched)))
    font = ImageFont.load_default(LABEL_FONT_SIZE)
    # Small images get wider slots, so that the labels do not run into each other.
    slots = [
        max(image.width, math.ceil(font.getlength(label)) + PANEL_GAP) for label, image in panels
    ]
    width = sum(slots) + PANEL_GAP * (len(panels) - 1)
    height = LABEL_BAND + max(image.height for _, image in panels)
    canvas = Image.new("RGB", (width, height), PANEL_BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left = 0
    for (label, image), slot in zip(panels, slots, strict=True):
        draw.text((left, 2), label, fill=LABEL_INK, font=font)
        canvas.paste(image.convert("RGB"), (left, LABEL_BAND))
        left += slot + PANEL_GAP
    write_png_atomically(canvas, path)


# ---------------------------------------------------------------------------------------------
# The report


def print_report(verification: Verification, console: Console) -> None:
    """Print what needs a look — mismatched, missing, extra jobs and matches with a note — as
    a table, then a summary that says whether the run is verified and where the difference
    images are. Prints no table when every job matches without a note."""
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("id", no_wrap=True)
    table.add_column("image", overflow="fold")
    table.add_column("result", no_wrap=True)
    table.add_column("max diff", justify="right", no_wrap=True)
    table.add_column("PSNR", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    for comparison in verification.mismatched:
        table.add_row(*_comparison_cells(comparison, "mismatch"), style="red")
    for row in verification.missing:
        table.add_row(*_row_cells(row, "missing", "not done in the run"), style="red")
    for comparison in verification.matched:
        if comparison.notes:
            table.add_row(*_comparison_cells(comparison, "match"), style="yellow")
    for row in verification.extra[:EXTRA_JOBS_SHOWN]:
        table.add_row(*_row_cells(row, "extra", "not in the reference"), style="dim")
    if table.row_count:
        console.print(table)
    for line in _summary(verification):
        console.print(line, markup=False, highlight=False)


def _comparison_cells(comparison: Comparison, result: str) -> tuple[str, ...]:
    row = comparison.row
    return (
        str(row.index),
        row.id[:8],
        row.path,
        result,
        "—" if comparison.max_diff is None else str(comparison.max_diff),
        _psnr_text(comparison.psnr),
        "; ".join(comparison.notes),
    )


def _row_cells(row: ManifestRow, result: str, note: str) -> tuple[str, ...]:
    return (str(row.index), row.id[:8], row.path, result, "—", "—", note)


def _psnr_text(psnr: float | None) -> str:
    if psnr is None:
        return "—"
    return "inf" if math.isinf(psnr) else f"{psnr:.1f} dB"


def _summary(verification: Verification) -> list[str]:
    total = len(verification.comparisons) + len(verification.missing)
    tolerance = verification.tolerance
    if verification.ok:
        lines = [f"verified: {_count(total, 'reference job')}, all matching ({tolerance})"]
    else:
        lines = [
            f"NOT verified: {len(verification.mismatched)} mismatched and "
            f"{len(verification.missing)} missing of {_count(total, 'reference job')} ({tolerance})"
        ]
    if not verification.comparisons:
        lines.append(
            "no job of the reference is in the run: job ids cover the model, dtype, init images "
            "and every parameter, so the two were made from different recipes, models or dtypes."
        )
    distances = [
        (comparison.max_diff, comparison.psnr)
        for comparison in verification.mismatched
        if comparison.max_diff is not None and comparison.psnr is not None
    ]
    if distances:
        largest = max(max_diff for max_diff, _ in distances)
        lowest = min(psnr for _, psnr in distances)
        lines.append(
            f"pixel mismatches: largest difference {_count(largest, 'level')}, "
            f"lowest PSNR {_psnr_text(lowest)}"
        )
    if verification.extra:
        hidden = len(verification.extra) - EXTRA_JOBS_SHOWN
        more = f", {hidden} of them not listed" if hidden > 0 else ""
        extra = _count(len(verification.extra), "extra job")
        lines.append(f"{extra} in the run, not in the reference{more}: not checked, not a failure")
    written = sum(comparison.diff_image is not None for comparison in verification.mismatched)
    if written:
        lines.append(
            f"{_count(written, 'difference image')} (reference | run | difference) in "
            f"{verification.diff_dir}"
        )
    return lines


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'' if number == 1 else 's'}"
