"""Spreading a sweep over processes: disjoint, balanced, deterministic shards whose ledgers
read as one manifest, and that make exactly the images of a single run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from batchgen.cli import main
from batchgen.engine.devices import launcher_device, slurm_cpu_threads
from batchgen.errors import BatchgenError
from batchgen.jobs.batching import make_batches
from batchgen.jobs.matrix import expand
from batchgen.jobs.shard import (
    Shard,
    ShardError,
    assign,
    cost,
    parse_shard,
    shard_from_environment,
)
from batchgen.recipe.load import load_recipe
from batchgen.running.runner import RunResult, run
from batchgen.store.manifest import Manifest
from tests.helpers import RECIPE, gradient, invoke, write, write_recipe

SWEEP = """
init_images: pictures/red.png
prompts: [a, b, c]
strength: [0.3, 0.6, 0.9]
steps: [10, 20]
seeds: {start: 1, count: 8}
"""


def jobs(tmp_path: Path, text: str = SWEEP):
    return list(expand(load_recipe(write(tmp_path, text)), "float32"))


def test_shard_is_written_k_of_n_counting_from_one() -> None:
    assert parse_shard("2/4") == Shard(1, 4)
    assert str(Shard(1, 4)) == "2/4" and Shard(1, 4).ledger_name == "shard-2-of-4.csv"
    for bad in ("0/4", "5/4", "2", "a/b", "2/0"):
        with pytest.raises(ShardError):
            parse_shard(bad)


def test_launchers_and_slurm_arrays_give_the_shard() -> None:
    assert shard_from_environment({}) is None
    assert shard_from_environment({"RANK": "3", "WORLD_SIZE": "4"}) == Shard(3, 4)
    assert shard_from_environment({"RANK": "0", "WORLD_SIZE": "1"}) is None
    slurm = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    assert shard_from_environment(slurm) == Shard(2, 4)
    assert shard_from_environment(slurm_array([3], 3)) is None  # an array of one: the whole sweep
    assert launcher_device("cuda", {"LOCAL_RANK": "1"}) == "cuda:1"
    assert launcher_device("cuda:0", {"LOCAL_RANK": "1"}) == "cuda:0"
    assert launcher_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_complete_deterministic_and_balanced(tmp_path: Path, count: int):
    all_jobs = jobs(tmp_path)
    owners = assign(all_jobs, count, 4).owners
    assert owners == assign(all_jobs, count, 4).owners
    assert set(owners) == set(range(count))
    loads = [
        sum(cost(j) for j, o in zip(all_jobs, owners, strict=True) if o == s) for s in range(count)
    ]
    biggest_chunk = max(cost(j) for j in all_jobs) * 4  # a batch of the unit, 4
    assert max(loads) - min(loads) <= biggest_chunk


@pytest.mark.parametrize("unit", [4, 16])  # of 1, every batch is one job: nothing to check
def test_shards_own_whole_batches(tmp_path: Path, unit: int) -> None:
    all_jobs = jobs(tmp_path)
    owners = dict(zip((job.id for job in all_jobs), assign(all_jobs, 3, unit).owners, strict=True))
    for batch in make_batches(all_jobs, unit):
        assert len({owners[job.id] for job in batch}) == 1


def slurm_array(ids: list[int], task: int, step: int = 1) -> dict[str, str]:
    """The variables Slurm sets in task `task` of an array with these ids (`--array=4-10:2`:
    4, 6, 8, 10 with step 2; a `%` limit changes none of them)."""
    return {
        "SLURM_ARRAY_JOB_ID": "36",
        "SLURM_ARRAY_TASK_ID": str(task),
        "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
        "SLURM_ARRAY_TASK_MIN": str(min(ids)),
        "SLURM_ARRAY_TASK_MAX": str(max(ids)),
        "SLURM_ARRAY_TASK_STEP": str(step),
    }


@pytest.mark.parametrize(
    ("array", "ids", "step"),
    [
        ("0-3", [0, 1, 2, 3], 1),
        ("4-10:2", [4, 6, 8, 10], 2),
        ("1-7:3%2", [1, 4, 7], 3),
        ("1,3,5", [1, 3, 5], 2),
    ],
)
def test_each_task_of_an_evenly_spaced_array_is_its_own_shard(array: str, ids, step: int):
    shards = [shard_from_environment(slurm_array(ids, task, step)) for task in ids]
    assert shards == [Shard(index, len(ids)) for index in range(len(ids))], array


@pytest.mark.parametrize(
    ("ids", "step", "refused"),
    [([1, 2, 5], 1, [1, 2, 5]), ([1, 2, 5], 2, [2]), ([0, 1, 3, 4], 1, [0, 1, 3, 4])],
)
def test_a_task_of_an_array_whose_ids_are_not_evenly_spaced_is_refused(
    ids: list[int], step: int, refused: list[int]
) -> None:
    """A step that fits the lowest and highest id still places those on it (1 and 5 of 1, 3,
    5); a task off the step is refused, so no two tasks take one shard."""
    for task in refused:
        with pytest.raises(ShardError, match=r"not evenly spaced.*--shard K/N"):
            shard_from_environment(slurm_array(ids, task, step))


SLURM_SWEEP = """
name: array
init_images: [pictures/gradient.png]
prompts: [fire, smoke]
strength: [0.3, 0.6]
steps: 4
seeds: [1, 2, 3]
"""


@pytest.fixture
def slurm_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith(("SLURM_", "WORLD_SIZE", "RANK"))]:
        monkeypatch.delenv(name)
    return write_recipe(tmp_path, SLURM_SWEEP, name="array")


def run_array_tasks(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, ids: list[int], step: int
) -> list[RunResult | BatchgenError]:
    """Each task of the array in turn, in this process, as Slurm would start it."""
    outcomes: list[RunResult | BatchgenError] = []
    for task in ids:
        with monkeypatch.context() as patch:
            for name, value in slurm_array(ids, task, step).items():
                patch.setenv(name, value)
            try:
                outcomes.append(run(recipe, batch_size=1, quiet=True))
            except BatchgenError as refusal:
                assert refusal.exit_code == 2
                outcomes.append(refusal)
    return outcomes


def done_rows(run_dir: Path) -> Counter[str]:
    """How many `done` rows each job id has, over every ledger."""
    return Counter(row.id for row in Manifest(run_dir).rows() if row.status == "done")


@pytest.mark.parametrize(
    ("ids", "step"),
    [([0, 2], 2), ([1, 3], 2), ([5, 6, 7], 1), (list(range(16)), 1)],
    ids=["stepped 0-2:2", "list 1,3", "offset 5-7", "more tasks than batches 0-15%4"],
)
def test_an_array_of_any_shape_makes_every_job_once(
    slurm_recipe: Path, monkeypatch: pytest.MonkeyPatch, ids: list[int], step: int
) -> None:
    outcomes = run_array_tasks(slurm_recipe, monkeypatch, ids, step)
    assert all(isinstance(outcome, RunResult) and outcome.exit_code == 0 for outcome in outcomes)
    made = done_rows(slurm_recipe.parent / "out")
    assert len(made) == 12 and set(made.values()) == {1}
    assert sum(outcome.made for outcome in outcomes) == 12  # type: ignore[union-attr]
    ledgers = {p.name for p in (slurm_recipe.parent / "out" / "manifests").iterdir()}
    assert ledgers <= {f"shard-{k}-of-{len(ids)}.csv" for k in range(1, len(ids) + 1)}


def test_a_task_beyond_the_sweeps_batches_says_so(
    slurm_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_array_tasks(slurm_recipe, monkeypatch, list(range(16)), 1)
    log = (slurm_recipe.parent / "out" / "run-shard-14-of-16.log").read_text()
    assert "shard 14/16 has no batches (the sweep has 12)" in log
    assert "all 0 jobs are done" not in log


def test_an_unevenly_spaced_array_is_refused_with_exit_2_and_makes_nothing(
    slurm_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes = run_array_tasks(slurm_recipe, monkeypatch, [1, 2, 5], 1)
    assert all(isinstance(outcome, ShardError) for outcome in outcomes)
    assert "--shard K/N" in str(outcomes[0])
    assert not (slurm_recipe.parent / "out" / "manifests").exists()
    env = slurm_array([1, 2, 5], 2)
    result = CliRunner().invoke(main, ["run", str(slurm_recipe)], env=env)
    assert result.exit_code == 2 and "not evenly spaced" in result.output


def grid_pictures(run_dir: Path) -> dict[str, bytes]:
    pictures = {}
    for path in sorted((run_dir / "grids").glob("*.png")):
        with Image.open(path) as image:
            pictures[path.name] = image.convert("RGB").tobytes()
    return pictures


def test_the_views_of_a_sharded_run_are_those_of_a_single_run(
    slurm_recipe: Path, tmp_path: Path
) -> None:
    # In batches of 4 each shard makes one strength: the first shard's rows alone sweep
    # prompts and seeds only, and their default grid is another (seed-x-prompt).
    recipe = slurm_recipe.with_name("views.yaml")
    recipe.write_text(slurm_recipe.read_text().replace("seeds: [1, 2, 3]", "seeds: [1, 2]"))
    single = run(recipe, output=tmp_path / "single", batch_size=4, quiet=True)
    sharded = tmp_path / "sharded"
    first = run(recipe, output=sharded, shard=Shard(0, 2), batch_size=4, quiet=True)
    assert first.made == 4
    assert not (sharded / "grids").exists() and not (sharded / "report.html").exists()
    assert "wait for the last shard" in (sharded / "run-shard-1-of-2.log").read_text()
    # Someone draws the run's grids by hand while half of it is made: other axes look swept.
    code, _ = invoke("grid", str(sharded))
    assert code == 0 and grid_pictures(sharded).keys() != grid_pictures(tmp_path / "single").keys()

    run(recipe, output=sharded, shard=Shard(1, 2), batch_size=4, quiet=True)
    assert grid_pictures(sharded) == grid_pictures(single.output)
    assert (sharded / "report.html").exists()
    report = (sharded / "report.html").read_text()
    assert all(name in report for name in grid_pictures(single.output))


def test_a_cpu_run_under_slurm_takes_its_thread_count_from_the_allocation(
    slurm_recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert slurm_cpu_threads({"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert slurm_cpu_threads({"SLURM_CPUS_PER_TASK": "3", "OMP_NUM_THREADS": "1"}) is None
    assert slurm_cpu_threads({}) is None
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    threads = torch.get_num_threads()
    try:
        run(slurm_recipe, quiet=True)
    finally:
        torch.set_num_threads(threads)
    rows = Manifest(slurm_recipe.parent / "out").rows()
    assert {row.device for row in rows} == {"cpu (2 threads)"}
    assert (
        "2 CPU thread(s), as SLURM_CPUS_PER_TASK says"
        in (slurm_recipe.parent / "out" / "run.log").read_text()
    )


def test_two_processes_under_torchrun_make_exactly_the_images_of_one_run(tmp_path: Path):
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    recipe = tmp_path / "sweep.yaml"
    recipe.write_text(RECIPE.replace("seeds: [7]", "seeds: [1, 2, 3]").replace("0.0, ", "0.3, "))
    # CPU floats depend on the thread count; torchrun gives each process one thread.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    batchgen = [sys.executable, "-m", "batchgen", "run", str(recipe)]
    single = subprocess.run(
        [*batchgen, "-o", str(tmp_path / "single")], env=env, capture_output=True, text=True
    )
    assert single.returncode == 0, single.stderr
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "batchgen",
        "run",
        str(recipe),
        "-o",
        str(tmp_path / "sharded"),
    ]
    sharded = subprocess.run(torchrun, env=env, capture_output=True, text=True)
    assert sharded.returncode == 0, sharded.stdout + sharded.stderr

    ledgers = sorted(p.name for p in (tmp_path / "sharded" / "manifests").iterdir())
    assert ledgers == ["shard-1-of-2.csv", "shard-2-of-2.csv"]
    merged = Manifest(tmp_path / "sharded").latest()
    expected = Manifest(tmp_path / "single").latest()
    assert {i: r.sha256 for i, r in merged.items()} == {i: r.sha256 for i, r in expected.items()}
    assert {r.path for r in merged.values()} == {r.path for r in expected.values()}
    for row in merged.values():
        made = (tmp_path / "sharded" / row.path).read_bytes()
        assert made == (tmp_path / "single" / row.path).read_bytes()

    again = subprocess.run(
        [*batchgen, "-o", str(tmp_path / "sharded")], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0 and "nothing to do: all 12 jobs are done" in again.stdout
