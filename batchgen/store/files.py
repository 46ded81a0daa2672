"""The run folder's layout and the files written whole: every file lands atomically under its
final name (a kill leaves no half-written file), recipe.lock.yaml, and run.log.

Torch-free, so `plan`, `status` and `verify` read a run folder without loading a model.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

MANIFEST_NAME = "manifest.csv"
SHARD_LEDGER_DIR = "manifests"  # per-shard ledgers of sharded runs
LOCK_FILE_NAME = "recipe.lock.yaml"
RUN_LOG_NAME = "run.log"
IMAGES_DIR = "images"


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


# zlib level 1, as InvokeAI writes its PNGs: several times faster to encode than Pillow's
# default 6, for somewhat larger files. Lossless at every level, and `verify` compares pixels,
# not bytes.
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
