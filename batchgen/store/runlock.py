"""One `batchgen run` per ledger at a time: the run lock of a run folder.

The lock itself is filelock's (an OS lock, which the kernel releases when its process dies,
so a killed run never leaves a lock behind). Beside it, a small JSON file says who holds it —
pid, host, start time, command — for the message the second run prints. Where the OS lock is
unavailable filelock falls back to a lock file that outlives a killed process; such a stale
lock, left by a process of this host that no longer runs, is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from filelock import FileLock, Timeout

from batchgen.errors import EXIT_LOCKED, BatchgenError
from batchgen.store.files import write_file_atomically

LOCKS_DIR = ".locks"  # in a run folder: the run locks and who holds them


class RunLockedError(BatchgenError):
    """Another process is running the same ledger of this run folder."""

    exit_code = EXIT_LOCKED


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it runs
        return True
    return True


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}: {holder.get('command', '?')}"
    )


def _read_holder(holder_path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(holder_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _holder_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".json")


def _is_stale(holder: dict[str, Any]) -> bool:
    """Left by a process of this host that no longer runs."""
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _running(pid)


def holder_of(lock_path: Path) -> str | None:
    """Who holds the lock now, as the second run's message says it; None when nobody does
    (for `batchgen status`: it reads, never takes, the lock)."""
    holder = _read_holder(_holder_path(lock_path))
    return _holder_text(holder) if holder and not _is_stale(holder) else None


class RunLock:
    """Held for the whole run: `with RunLock(run_dir / ".locks" / "run.lock"): ...`.
    `took_over` names the holder of a stale lock that was taken over, for the run to report."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.holder_path = _holder_path(path)
        self._lock = FileLock(path, timeout=0)
        self.took_over: str | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous = _read_holder(self.holder_path)
        try:
            self._lock.acquire()
        except Timeout:
            if not _is_stale(previous):
                raise RunLockedError(
                    f"{self.path.parent} is being written by another batchgen run "
                    f"({_holder_text(previous) if previous else 'holder unknown'}). Wait for it "
                    "to finish, stop it, or use another --output."
                ) from None
            self.path.unlink(missing_ok=True)  # a lock file a killed process left
            self._lock.acquire()
        if previous and _is_stale(previous):
            self.took_over = _holder_text(previous)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
        }
        write_file_atomically(self.holder_path, json.dumps(holder).encode("utf-8"))

    def release(self) -> None:
        self.holder_path.unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
