"""Init images as the engine takes them: decoded, oriented and resized once per file and size,
and the next batch's made on a background thread while the current batch renders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from batchgen.batching import MAX_BATCH_SIZE
from batchgen.images import PreparedImage, prepare
from batchgen.job import Job

ImageKey = tuple[Path, tuple[int, int]]  # the file and the size it is rendered at


# The batch being rendered and the next one, which `--batch-size auto` keeps to at most
# MAX_BATCH_SIZE init images each (with more, an image pushed out is only read again).
@lru_cache(maxsize=2 * MAX_BATCH_SIZE)
def prepared(path: Path, size: tuple[int, int]) -> PreparedImage:
    return prepare(path, size)


class InitImagePrefetcher:
    """Prepares the init images of the batch after the current one on a single background
    thread: Pillow decodes and resizes without holding the GIL, so a sweep over many large
    photographs does not wait for them between batches. A failure here is dropped; the job
    that needs the image meets it again, with its message, when it asks for it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgen-init-images")

    def ahead(self, jobs: Iterable[Job]) -> Future[None]:
        keys = dict.fromkeys((job.init_image.path, (job.width, job.height)) for job in jobs)
        return self._pool.submit(_prepare_all, list(keys))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _prepare_all(keys: list[ImageKey]) -> None:
    for path, size in keys:
        with contextlib.suppress(Exception):
            prepared(path, size)
