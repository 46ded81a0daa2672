"""sha256 of model files, remembered by path, size and modification time.

A job's id must name the model's exact weights, but rehashing gigabytes on every `plan` would
make it slow; so each file's digest is kept in a small JSON cache
(`$XDG_CACHE_HOME/batchgen/sha256.json`, or `$BATCHGEN_CACHE_DIR`) and recomputed only when
the file's size or mtime changes. The cache is only a cache: losing it costs one rehash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from batchgen.store.files import write_file_atomically

_CHUNK = 8 * 1024 * 1024


def cache_file() -> Path:
    folder = (
        os.environ.get("BATCHGEN_CACHE_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "batchgen"
    )
    return Path(folder) / "sha256.json"


def _load() -> dict[str, dict[str, object]]:
    try:
        loaded = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256s(paths: list[Path]) -> dict[Path, str]:
    """Each file's sha256, from the cache where its size and mtime still match."""
    cache = _load()
    changed = False
    digests = {}
    for path in paths:
        stat = path.stat()
        key = str(path.resolve())
        entry = cache.get(key)
        if (
            entry
            and entry.get("size") == stat.st_size
            and entry.get("mtime_ns") == (stat.st_mtime_ns)
        ):
            digests[path] = str(entry["sha256"])
            continue
        digests[path] = _hash(path)
        cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digests[path]}
        changed = True
    # A read-only home only means hashing again next time; it must not fail the run.
    if changed:
        with contextlib.suppress(OSError):
            write_file_atomically(cache_file(), json.dumps(cache, indent=0).encode("utf-8"))
    return digests


def folder_sha256(folder: Path) -> str:
    """One sha256 over every file of a model folder that can change pixels — weights,
    configs, tokenizer — by relative path; documentation and VCS files are left out."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() != ".md" and ".git" not in path.parts
    )
    digests = file_sha256s(files)
    combined = hashlib.sha256()
    for path in files:
        combined.update(f"{path.relative_to(folder).as_posix()}\0{digests[path]}\n".encode())
    return combined.hexdigest()
