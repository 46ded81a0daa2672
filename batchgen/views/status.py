"""`batchgen status RUN_DIR`: where a run folder stands, from its manifest alone — counts,
failures with their errors, time spent, speed, and what is left of the recipe it was run
from. Torch-free: it answers at once, even while a run is writing the folder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from batchgen.engine.devices import default_dtype, guess_device
from batchgen.jobs.plan import PlanSummary, summarize_plan
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.store.files import LOCK_FILE_NAME, read_lock_file
from batchgen.store.manifest import Manifest, ManifestRow, require_run_folder
from batchgen.store.runlock import LOCKS_DIR, holder_of


@dataclass(frozen=True)
class RunStatus:
    run_dir: Path
    latest: tuple[ManifestRow, ...]  # each job's latest row, in job order
    plan: PlanSummary | None  # the recipe the folder was last run from, against the folder
    no_plan_reason: str  # why there is no plan, if there is none
    running: tuple[str, ...]  # who holds the folder's run locks now

    @property
    def done(self) -> list[ManifestRow]:
        return [row for row in self.latest if row.status == "done"]

    @property
    def failed(self) -> list[ManifestRow]:
        return [row for row in self.latest if row.status == "failed"]

    @property
    def seconds(self) -> float:
        """Time spent making the done images (model loading and idle time not counted)."""
        return sum(row.seconds for row in self.done)

    @property
    def span(self) -> tuple[datetime, datetime] | None:
        """When the first and the last job of the folder finished."""
        if not self.latest:
            return None
        times = sorted(datetime.fromisoformat(row.finished_at) for row in self.latest)
        return times[0], times[-1]


def run_status(run_dir: Path) -> RunStatus:
    """Read `run_dir`; raises NotARunFolderError when it holds no manifest or lock file,
    store.ManifestError when its manifest cannot be read."""
    require_run_folder(run_dir)
    latest = sorted(Manifest(run_dir).latest().values(), key=lambda row: row.index)
    plan, reason = _plan_of_last_recipe(run_dir, latest)
    running = tuple(
        text for lock in sorted((run_dir / LOCKS_DIR).glob("*.lock")) if (text := holder_of(lock))
    )
    return RunStatus(run_dir, tuple(latest), plan, reason, running)


def _plan_of_last_recipe(run_dir: Path, rows: list[ManifestRow]) -> tuple[PlanSummary | None, str]:
    """The plan of the recipe recipe.lock.yaml names, run into this folder; or why not."""
    recipe_path = read_lock_file(run_dir).get("recipe")
    if not recipe_path:
        return None, f"{LOCK_FILE_NAME} names no recipe"
    try:
        recipe = load_recipe(recipe_path, run_dir)
    except RecipeError as error:
        return None, f"its recipe {recipe_path} cannot be read now ({error.problems[0]})"
    dtypes = Counter(row.dtype for row in rows)
    dtype = (
        dtypes.most_common(1)[0][0] if dtypes else default_dtype(recipe.dtype, guess_device("auto"))
    )
    return summarize_plan(recipe, dtype, keep=0), ""


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def describe(status: RunStatus, max_failures: int = 20) -> str:
    """The status as the text `batchgen status` prints."""
    lines = [f"{status.run_dir}: {len(status.done)} done, {len(status.failed)} failed"]
    for holder in status.running:
        lines.append(f"running now: {holder}")
    if status.done:
        speed = len(status.done) / status.seconds if status.seconds else 0.0
        lines.append(f"time making images: {_duration(status.seconds)} ({speed:.2f} images/s)")
    if span := status.span:
        lines.append(
            f"first job finished {span[0]:%Y-%m-%d %H:%M:%S}, last {span[1]:%Y-%m-%d %H:%M:%S} UTC"
        )
    if status.plan is None:
        lines.append(f"left to do: unknown — {status.no_plan_reason}")
    else:
        plan = status.plan
        left = plan.to_run
        lines.append(
            f"recipe {plan.recipe.path}: {plan.total} jobs, {plan.count('done')} done, "
            f"{left} left ({plan.steps_to_run} denoising steps)"
        )
        if left and status.done and status.seconds:
            lines.append(
                f"at that speed, about {_duration(left * status.seconds / len(status.done))} to go"
            )
        if plan.outside:
            lines.append(
                f"{len(plan.outside)} job(s) in the manifest are not in the current recipe "
                "(kept on disk and in the manifest)"
            )
    for row in status.failed[:max_failures]:
        lines.append(
            f"failed: job {row.index} {row.id[:8]} ({row.prompt!r}, seed {row.seed}): {row.error}"
        )
    if len(status.failed) > max_failures:
        lines.append(f"… and {len(status.failed) - max_failures} more failures (see manifest.csv)")
    return "\n".join(lines)
