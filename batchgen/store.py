"""Everything that touches a run's output folder: image names, PNGs with their parameters
written atomically, the append-only manifest.csv ledger, recipe.lock.yaml and run.log.

Torch-free, so `plan`, `status` and `verify` read a run folder without loading a model.
A kill at any moment leaves no half-written image under its final name and at most a torn
last line in the manifest, which reading ignores and the next append cuts off.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self, get_args, get_origin, get_type_hints

import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from batchgen import __version__
from batchgen.job import Job
from batchgen.schedulers import scheduler_spec

MANIFEST_NAME = "manifest.csv"
SHARD_LEDGER_DIR = "manifests"  # per-shard ledgers of sharded runs
LOCK_FILE_NAME = "recipe.lock.yaml"
RUN_LOG_NAME = "run.log"
IMAGES_DIR = "images"

SLUG_MAX_LENGTH = 40

# ---------------------------------------------------------------------------------------------
# Files written atomically


def write_file_atomically(path: Path, data: bytes) -> None:
    """Write `data` so that `path` is either absent/old or complete, never partial.

    The bytes go to a hidden `.<name>.<random>.tmp` beside `path` (same filesystem, so the
    rename is atomic, and never matching `*.png`), are fsynced, renamed over `path`, and the
    folder is fsynced so the rename itself survives a power cut.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:  # Ctrl-C included: never leave a temp file behind
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


# zlib level 1, as InvokeAI writes its PNGs: 3× faster to encode than Pillow's default 6 (256 px
# images: 8 against 28 ms; a 1564×636 grid: 70 against 230 ms, on a 2-core EPYC) for files
# 15–20% larger. Lossless at every level, and `verify` compares pixels, not bytes.
PNG_COMPRESS_LEVEL = 1
PNG_COMPRESS_LEVELS = range(10)  # zlib's: 0 stores, 9 packs tightest


def write_png_atomically(
    image: Image.Image,
    path: Path,
    info: PngInfo | None = None,
    compress_level: int = PNG_COMPRESS_LEVEL,
) -> bytes:
    """Encode `image` as a PNG with the text chunks in `info`, write it with
    `write_file_atomically` and return the file's bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    data = buffer.getvalue()
    write_file_atomically(path, data)
    return data


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # Windows cannot open a folder to fsync it
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_lock_file(run_dir: Path, resolved: dict[str, Any]) -> None:
    """recipe.lock.yaml: the recipe as resolved, keys in the order given."""
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    write_file_atomically(run_dir / LOCK_FILE_NAME, text.encode("utf-8"))


def read_lock_file(run_dir: Path) -> dict[str, Any]:
    """recipe.lock.yaml, or {} when it is missing or unreadable: the manifest alone suffices."""
    try:
        lock = yaml.safe_load((run_dir / LOCK_FILE_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return lock if isinstance(lock, dict) else {}


# ---------------------------------------------------------------------------------------------
# Images: names, metadata, writing


@functools.lru_cache(maxsize=4096)  # a sweep repeats a few prompts and init names many times
def _slug(text: str) -> str:
    """Lowercase ASCII words joined by '-', whole words up to SLUG_MAX_LENGTH; may be ''."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    words = re.findall(r"[a-z0-9]+", ascii_text.lower())
    if not words:
        return ""
    slug = words[0][:SLUG_MAX_LENGTH]
    for word in words[1:]:
        if len(slug) + 1 + len(word) > SLUG_MAX_LENGTH:
            break
        slug += f"-{word}"
    return slug


def image_filename(job: Job, index_width: int) -> str:
    """`<index>-<init>-<prompt-slug>-f<strength>-s<steps>-S<seed>[-V<variation seed>]
    [-n<iteration>].png`, e.g.
    `0003-fire-drawing-cheery-open-fire-photograph-f0.40-s10-S1592514025.png`.

    Only `[a-zA-Z0-9.-]`. The zero-padded index makes the name unique within a run; the rest is
    there for people browsing the folder.
    """
    init = _slug(job.init_image.path.stem) or "init"
    prompt = _slug(job.prompt) or ("prompt" if job.prompt.strip() else "empty")
    variation = f"-V{job.variation_seed}" if job.variation_seed is not None else ""
    iteration = f"-n{job.iteration}" if job.iteration else ""
    return (
        f"{job.index:0{index_width}d}-{init}-{prompt}"
        f"-f{job.strength:.2f}-s{job.steps}-S{job.seed}{variation}{iteration}.png"
    )


def _a1111_quote(value: object) -> str:
    """AUTOMATIC1111's `quote()`: JSON-quote a value only when it would break the line."""
    text = str(value)
    if any(special in text for special in (",", ":", "\n")):
        return json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(
    job: Job, model_name: str, model_hash: str, vae_name: str = "", vae_hash: str = ""
) -> str:
    """The `parameters` text AUTOMATIC1111 writes into its PNGs (its `create_infotext`).

    Prompt line, `Negative prompt:` line when there is one, then the settings in A1111's key
    order. `Steps` is the count handed to the scheduler, as in A1111 img2img (which also runs
    only `steps × strength` of them). Empty names and hashes (no `vae:` override: the model's
    own VAE) are left out, as A1111 leaves out settings it does not have.
    """
    scheduler = scheduler_spec(job.scheduler)
    settings: dict[str, object] = {
        "Steps": job.steps_nominal,
        "Sampler": scheduler.a1111_name,
        "Schedule type": scheduler.schedule_type,
        "CFG scale": float(job.cfg),
        "Seed": int(job.seed),
        "Size": f"{job.width}x{job.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,
        "VAE": vae_name,
        "Variation seed": job.variation_seed if job.variation_seed is not None else "",
        "Variation seed strength": job.variation_amount if job.variation_seed is not None else "",
        "Denoising strength": float(job.strength),
        "Clip skip": job.clip_skip if job.clip_skip > 1 else "",
        "Version": f"batchgen {__version__}",
    }
    settings_line = ", ".join(
        f"{key}: {_a1111_quote(value)}" for key, value in settings.items() if value != ""
    )
    negative = f"\nNegative prompt: {job.negative_prompt}" if job.negative_prompt else ""
    return f"{job.prompt}{negative}\n{settings_line}".strip()


def job_record(job: Job) -> dict[str, Any]:
    """The job as flat JSON-able data: what the PNG's `batchgen` chunk holds, and the
    job's share of its manifest row (the keys named like manifest columns)."""
    return {
        "id": job.id,
        "index": job.index,
        "init_image": job.init_image.label,
        "init_image_sha256": job.init_image.sha256,
        "init_image_width": job.init_image.width,
        "init_image_height": job.init_image.height,
        "prompt": job.prompt,
        "negative_prompt": job.negative_prompt,
        "strength": float(job.strength),
        "steps": job.steps,
        "steps_mode": job.steps_mode,
        "steps_nominal": job.steps_nominal,
        "steps_taken": job.steps_taken,
        "cfg": float(job.cfg),
        "seed": int(job.seed),
        "scheduler": job.scheduler,
        "clip_skip": job.clip_skip,
        "width": (job.final_size or (job.width, job.height))[0],  # the image's size
        "height": (job.final_size or (job.width, job.height))[1],
        "fit": job.fit,
        "render_size": f"{job.width}x{job.height}" if job.final_size else "",
        "model": job.model,
        "vae": job.vae,
        "model_name": job.model_name,
        "dtype": job.dtype,
        "variation_seed": job.variation_seed if job.variation_seed is not None else -1,
        "variation_strength": float(job.variation_amount),
        "with_variations": format_variations(job.with_variations),
        "parent_id": job.parent_id,
        "iteration": job.iteration,
        "mask": mask_label(job),
        "mask_blur": job.mask_blur if job.inpaints else 0,
        "invert_mask": job.invert_mask if job.inpaints else False,
        "batchgen_version": __version__,
    }


def format_variations(pairs: tuple[tuple[int, float], ...]) -> str:
    """InvokeAI's -V text: `seed:amount,seed:amount`."""
    return ",".join(f"{seed}:{amount:g}" for seed, amount in pairs)


def mask_label(job: Job) -> str:
    """The mask file as the recipe names it, `alpha` for the init image's transparency, or
    "" when nothing is masked."""
    if job.mask is not None:
        return job.mask.label
    return "alpha" if job.init_image.has_alpha else ""


def write_image(
    image: Image.Image,
    path: Path,
    job: Job,
    parameters: str,
    made_with: Mapping[str, object] | None = None,
    compress_level: int = PNG_COMPRESS_LEVEL,
) -> str:
    """Write `image` as a PNG carrying `parameters` (A1111) and `batchgen` (the job record,
    plus `made_with`: the device and batch size, which a run adopting the image after a kill
    reads back) text chunks, atomically; return the sha256 of the file's bytes.

    Deterministic: the same pixels and texts give the same bytes (no timestamp chunk).
    Text that is not Latin-1 goes into an iTXt chunk (Pillow's choice), which A1111 reads too.
    """
    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("batchgen", json.dumps(job_record(job) | dict(made_with or {})))
    return hashlib.sha256(write_png_atomically(image, path, info, compress_level)).hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest ledger

RowStatus = Literal["done", "failed"]


class ManifestError(ValueError):
    """manifest.csv cannot be read as batchgen's ledger; the message says what to do."""


@dataclass(frozen=True)
class ManifestRow:
    """One line of manifest.csv; the field order is the column order."""

    id: str
    status: RowStatus
    path: str  # the image, relative to the run folder, POSIX separators; "" when failed
    index: int
    init_image: str  # the init image's label, as the recipe names it
    init_image_sha256: str
    prompt: str
    negative_prompt: str
    strength: float
    steps: int  # as written in the recipe
    steps_mode: str
    steps_nominal: int  # handed to the scheduler
    steps_taken: int  # denoising steps actually run
    cfg: float
    seed: int
    scheduler: str
    clip_skip: int  # A1111's convention
    width: int
    height: int
    fit: bool
    render_size: str  # upscale_small + keep_size: "WxH" rendered before scaling down; else ""
    model: str  # model identity
    vae: str  # identity of the VAE that replaced the model's own; "" for the model's
    model_hash: str
    dtype: str
    variation_seed: int  # A1111's "Variation seed"; -1: none
    variation_strength: float  # A1111's "Variation seed strength"
    with_variations: str  # the (seed:amount,…) pairs applied before it (InvokeAI -V)
    parent_id: str  # feedback: the job whose image was the init image; "" for none
    iteration: int  # feedback: 0 for a chain's first job
    mask: str  # a mask file's label, "alpha" (the init's transparency), or "" (no mask)
    mask_blur: int
    invert_mask: bool
    device: str
    batch_size: int  # jobs in its denoising loop (pixels move within a level with it); 0: unknown
    fast_paths: str  # the speed-ups that were on (devices.FastPaths), comma-separated
    seconds: float
    sha256: str  # of the image file; "" when failed
    error: str  # "ExceptionType: message" when failed
    finished_at: str  # ISO 8601, UTC
    batchgen_version: str

    @classmethod
    def from_job(
        cls,
        job: Job,
        *,
        status: RowStatus,
        path: str,
        model_hash: str,
        device: str,
        seconds: float,
        sha256: str,
        error: str,
        batch_size: int = 1,
        fast_paths: str = "",
    ) -> ManifestRow:
        record = job_record(job)
        return cls(
            **{name: record[name] for name in MANIFEST_COLUMNS if name in record},
            status=status,
            path=path,
            model_hash=model_hash,
            device=device,
            batch_size=batch_size,
            fast_paths=fast_paths,
            seconds=seconds,
            sha256=sha256,
            error=error,
            finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )


MANIFEST_COLUMNS: tuple[str, ...] = tuple(column.name for column in fields(ManifestRow))
_COLUMN_TYPES: dict[str, Any] = get_type_hints(ManifestRow)

# The excel dialect ends lines with \r\n and so quotes any value containing \r or \n: a
# physical line break outside quotes always ends a row.
_LINE_END = "\r\n"
_HEADER_LINE = ",".join(MANIFEST_COLUMNS) + _LINE_END


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)  # str(float) is the shortest text that reads back to the same float


def _parse_value(column: str, text: str) -> object:
    kind = _COLUMN_TYPES[column]
    if kind is bool:
        if text not in ("true", "false"):
            raise ValueError("expected true or false")
        return text == "true"
    if kind in (int, float):
        return kind(text)
    if get_origin(kind) is Literal and text not in get_args(kind):
        raise ValueError(f"expected one of {', '.join(get_args(kind))}")
    return text


def _is_torn(data: bytes) -> bool:
    """Whether `data` ends inside a row that a kill tore.

    Every quote character the csv module writes is one of a pair, so an odd count means the
    torn row stopped inside a quoted value (which may hold line breaks); otherwise a complete
    ledger ends with a line break.
    """
    return data.count(b'"') % 2 == 1 or not data.endswith(b"\n")


def _end_of_complete_rows(data: bytes) -> int:
    """The offset just past the last line break outside quotes: where the rows end that a
    kill did not tear."""
    end = position = quotes = 0
    while (line_break := data.find(b"\n", position)) != -1:
        quotes += data.count(b'"', position, line_break)
        if quotes % 2 == 0:
            end = line_break + 1
        position = line_break + 1
    return end


# Columns added since batchgen 0.1, with the value they have in effect for rows written
# before them. An older version's manifest is read with these, and rewritten once with them
# (atomically) before this version appends to it.
ADDED_COLUMNS: dict[str, object] = {
    "batch_size": 0,
    "fast_paths": "",
    "render_size": "",
    "variation_seed": -1,
    "variation_strength": 0.0,
    "with_variations": "",
    "parent_id": "",
    "iteration": 0,
    "mask": "",
    "mask_blur": 0,
    "invert_mask": False,
}


class Ledger:
    """One manifest CSV file: one row per finished job, appended and fsynced row by row,
    never rewritten (but once, atomically, to add the columns of a newer version). A job
    failed then redone has two rows; the latest wins."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # The file's size after our last append: while it has not changed, the file ends
        # between rows and need not be read again.
        self._size_after_append: int | None = None

    def append(self, row: ManifestRow) -> None:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator=_LINE_END).writerow(
            [_format_value(getattr(row, column)) for column in MANIFEST_COLUMNS]
        )
        record = buffer.getvalue().encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._size_after_append is None:  # this process's first append
            self._upgrade_older_version()
        with open(self.path, "a+b") as file:
            if file.seek(0, os.SEEK_END) == self._size_after_append:
                prefix = b""
            else:
                prefix = self._prefix_before_append(file)
            self._size_after_append = None
            file.write(prefix + record)  # one write: a kill tears at most this row
            file.flush()
            os.fsync(file.fileno())
            self._size_after_append = file.tell()

    def _prefix_before_append(self, file: io.BufferedRandom) -> bytes:
        """What must precede the next row: the header for a new file. A row torn by a kill
        is cut off first: it was never recorded, and closing it instead could make it whole
        again (a kill just before its line end) and record its job twice."""
        file.seek(0)
        data = file.read()
        header = _HEADER_LINE.encode("utf-8")
        if header.startswith(data):  # empty, or only a header torn by a kill: start over
            file.truncate(0)
            return header
        first_line = data.split(b"\n", 1)[0].decode("utf-8", "replace")
        self._check_header(next(csv.reader([first_line])))
        if _is_torn(data):
            file.truncate(_end_of_complete_rows(data))
            file.seek(0, os.SEEK_END)
        return b""

    def _upgrade_older_version(self) -> None:
        """Rewrite an older version's manifest with this version's header, its rows with the
        added columns' values (a torn last row is cut off, as an append would)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        if _HEADER_LINE.encode("utf-8").startswith(data):
            return  # empty, or a header torn by a kill: the append starts the file over
        first_line = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r")
        if next(csv.reader([first_line])) == list(MANIFEST_COLUMNS):
            return
        rows = self.rows()  # a header of no batchgen version raises ManifestError here
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator=_LINE_END)
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow([_format_value(getattr(row, column)) for column in MANIFEST_COLUMNS])
        write_file_atomically(self.path, buffer.getvalue().encode("utf-8"))

    def rows(self) -> list[ManifestRow]:
        """Every complete row, in file order; rows torn by a kill are skipped."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        # A kill can tear a multi-byte character; only torn rows hold invalid UTF-8.
        text = data.decode("utf-8", "replace")
        if _HEADER_LINE.startswith(text):  # empty, or a header torn by a kill
            return []
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader)
        self._check_header(header)
        row_start = reader.line_num + 1
        records = []  # (first line of the row, its values)
        for record in reader:
            records.append((row_start, record))
            row_start = reader.line_num + 1
        if _is_torn(data):
            records = records[:-1]  # the last row was being written when the run was killed
        # batchgen 0.1 closed a torn row rather than cutting it off: such a row has too few
        # values.
        return [
            self._parse_row(line, header, record)
            for line, record in records
            if len(record) == len(header)
        ]

    def _check_header(self, header: list[str]) -> None:
        """This version's header, or an older version's (this one's but for added columns)."""
        missing = [column for column in MANIFEST_COLUMNS if column not in header]
        unexpected = [column for column in header if column not in MANIFEST_COLUMNS]
        in_order = [column for column in MANIFEST_COLUMNS if column in header] == header
        if not unexpected and in_order and all(column in ADDED_COLUMNS for column in missing):
            return
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unexpected {', '.join(unexpected)}"] if unexpected else []
        raise ManifestError(
            f"{self.path}: the first line is not batchgen {__version__}'s manifest header "
            f"({'; '.join(problems) or 'columns in another order'}). It was written by another "
            "program or batchgen version, or edited. Move it aside (the run will then redo "
            "every image) or use another output folder."
        )

    def _parse_row(self, line: int, header: list[str], record: list[str]) -> ManifestRow:
        values: dict[str, object] = dict(ADDED_COLUMNS)  # overwritten by the file's columns
        for column, text in zip(header, record, strict=True):
            try:
                values[column] = _parse_value(column, text)
            except ValueError as error:
                raise ManifestError(
                    f"{self.path}, line {line}: column {column}: cannot read {text!r} "
                    f"({error}). Fix or delete that line; a re-run redoes a deleted job."
                ) from None
        return ManifestRow(**values)  # type: ignore[arg-type]


class Manifest:
    """A run folder's ledgers read as one: `manifest.csv` and, from sharded runs, the
    per-shard `manifests/shard-K-of-N.csv`. Appends go to this process's own ledger only, so
    shards on several machines never write the same file."""

    def __init__(self, run_dir: Path, ledger_name: str | None = None) -> None:
        self.run_dir = run_dir
        self.ledger = Ledger(
            run_dir / SHARD_LEDGER_DIR / ledger_name if ledger_name else run_dir / MANIFEST_NAME
        )
        self.path = self.ledger.path

    def append(self, row: ManifestRow) -> None:
        self.ledger.append(row)

    def ledgers(self) -> list[Ledger]:
        shard_ledgers = sorted((self.run_dir / SHARD_LEDGER_DIR).glob("*.csv"))
        paths = [self.run_dir / MANIFEST_NAME, *shard_ledgers]
        return [self.ledger if path == self.path else Ledger(path) for path in paths]

    def rows(self) -> list[ManifestRow]:
        """Every complete row of every ledger, each ledger in file order."""
        return [row for ledger in self.ledgers() for row in ledger.rows()]

    def latest(self) -> dict[str, ManifestRow]:
        """Job id → the last row written for it: the last in its ledger, and across ledgers
        (a job retried later by another shard or run) the one that finished last."""
        return _latest(ledger.rows() for ledger in self.ledgers())

    def rows_and_latest(self) -> tuple[list[ManifestRow], dict[str, ManifestRow]]:
        """`rows()` and `latest()` from one read of each ledger."""
        by_ledger = [ledger.rows() for ledger in self.ledgers()]
        return [row for rows in by_ledger for row in rows], _latest(by_ledger)


def _latest(by_ledger: Iterable[list[ManifestRow]]) -> dict[str, ManifestRow]:
    latest: dict[str, ManifestRow] = {}
    for rows in by_ledger:
        for row in {row.id: row for row in rows}.values():
            if row.id not in latest or row.finished_at >= latest[row.id].finished_at:
                latest[row.id] = row
    return latest


# ---------------------------------------------------------------------------------------------
# run.log


class RunLog:
    """run.log in a run folder: the plain progress lines, timestamped, for reading later."""

    def __init__(self, run_dir: Path, name: str = RUN_LOG_NAME) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / name
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 — closed by close()

    def line(self, text: str) -> None:
        """Append `text`; each of its lines gets the local time with its UTC offset. The log
        only repeats what the screen shows: a full disk stops the log, not the run."""
        if self._file.closed:
            return
        stamp = datetime.now().astimezone().isoformat(timespec="seconds")
        try:
            for part in text.splitlines() or [""]:
                self._file.write(f"{stamp} {part}\n")
            self._file.flush()
        except OSError:
            with contextlib.suppress(OSError):  # closing flushes, which fails again
                self._file.close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
