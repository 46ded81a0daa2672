"""manifest.csv: the append-only ledger of finished jobs, one per run or per shard, read as one.

A kill at any moment leaves at most a torn last line, which reading ignores and the next
append cuts off.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from batchgen import __version__
from batchgen.errors import BatchgenError
from batchgen.jobs.job import Job
from batchgen.jobs.parameters import OLDER_MANIFESTS_MEAN
from batchgen.store.files import (
    LOCK_FILE_NAME,
    MANIFEST_NAME,
    SHARD_LEDGER_DIR,
    write_file_atomically,
)
from batchgen.store.images import job_record

# ---------------------------------------------------------------------------------------------
# The manifest ledger

RowStatus = Literal["done", "failed"]


class ManifestError(BatchgenError):
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
    prompt_2: str  # SDXL's second text encoder's prompt; "": the same as prompt
    negative_prompt_2: str
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
    refiner: str  # identity of SDXL's refiner; "" for none
    refiner_switch: float  # where the refiner took over (a fraction of the schedule); 0: none
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


# Columns that an older version's manifest may lack (0.1's has none of them), with the value they
# have in effect for its rows. Such a manifest is read with these, and rewritten once with them
# (atomically) before this version appends to it.
ADDED_COLUMNS: dict[str, object] = {"batch_size": 0, "fast_paths": "", **OLDER_MANIFESTS_MEAN}


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
        # A manifest of batchgen 0.1 may hold a torn row closed rather than cut off: such a row
        # has too few values, and is skipped.
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


class NotARunFolderError(BatchgenError):
    """A folder given as a run folder that no batchgen run wrote."""


def has_ledger(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file() or any((folder / SHARD_LEDGER_DIR).glob("*.csv"))


def require_run_folder(folder: Path, role: str = "", *, ledger: bool = False) -> None:
    """Raises NotARunFolderError unless a batchgen run wrote `folder`: it has a ledger or, unless
    `ledger` is asked for, at least recipe.lock.yaml (a run stopped before its first image).
    `role` names the folder in the message (`run`, `reference`)."""
    if has_ledger(folder) or (not ledger and (folder / LOCK_FILE_NAME).is_file()):
        return
    marks = f"{MANIFEST_NAME} or {SHARD_LEDGER_DIR}/*.csv" + (
        "" if ledger else f" or {LOCK_FILE_NAME}"
    )
    problem = (
        f"is not a batchgen run folder: it has no {marks}" if folder.exists() else "does not exist"
    )
    raise NotARunFolderError(
        f"{role + ' ' if role else ''}{folder} {problem}",
        hint="give the folder `batchgen run` wrote (the recipe's `output`, or its --output)",
    )


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
