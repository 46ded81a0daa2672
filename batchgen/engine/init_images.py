"""Init images as the engine takes them: decoded, oriented and resized once per image and size,
and the next batch's made on a background thread while the current batch renders.

The cache is keyed by the image's content hash, not only its path: a process that runs a
recipe again after an init image was edited (a notebook, a service) gets the new pixels, as
the new job ids (which hold the hash) promise."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

from batchgen.engine.images import PreparedImage, prepare
from batchgen.jobs.batching import MAX_BATCH_SIZE
from batchgen.jobs.job import InitImage, Job

ImageKey = tuple[InitImage, tuple[int, int]]  # the image and the size it is rendered at


# The batch being rendered and the next one, which `--batch-size auto` keeps to at most
# MAX_BATCH_SIZE init images each (with more, an image pushed out is only read again).
@lru_cache(maxsize=2 * MAX_BATCH_SIZE)
def prepared(image: InitImage, size: tuple[int, int]) -> PreparedImage:
    return prepare(image.path, size)


class InitImagePrefetcher:
    """Prepares the init images of the batch after the current one on a single background
    thread: Pillow decodes and resizes without holding the GIL, so a sweep over many large
    photographs does not wait for them between batches. A failure here is dropped; the job
    that needs the image meets it again, with its message, when it asks for it."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batchgen-init-images")

    def ahead(self, jobs: Iterable[Job]) -> Future[None]:
        keys = dict.fromkeys((job.init_image, (job.width, job.height)) for job in jobs)
        return self._pool.submit(_prepare_all, list(keys))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _prepare_all(keys: list[ImageKey]) -> None:
    for image, size in keys:
        with contextlib.suppress(Exception):
            prepared(image, size)
