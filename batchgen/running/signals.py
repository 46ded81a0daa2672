"""SIGINT and SIGTERM during a run: the loop stops after the current batch, keeping every image
made; a second Ctrl-C aborts at once. The exit codes say which signal stopped the run."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from batchgen.running.progress import Reporter

if TYPE_CHECKING:
    pass

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """Set by SIGINT/SIGTERM; the loop checks it between images. A second Ctrl-C aborts."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.signal: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.reporter.message(
            f"{signal.Signals(signum).name}: stopping after the current batch "
            "(press Ctrl-C again to abort it)"
        )


@contextmanager
def stop_on_signals(reporter: Reporter) -> Iterator[StopRequest]:
    request = StopRequest(reporter)
    if threading.current_thread() is not threading.main_thread():
        yield request  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in EXIT_INTERRUPTED}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
