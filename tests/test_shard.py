"""Spreading a sweep over processes: disjoint, balanced, deterministic shards whose ledgers
read as one manifest, and that make exactly the images of a single run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchgen.batching import make_batches
from batchgen.matrix import expand
from batchgen.recipe import load_recipe
from batchgen.shard import (
    Shard,
    ShardError,
    assign,
    cost,
    launcher_device,
    parse_shard,
    shard_from_environment,
)
from batchgen.store import Manifest
from tests.test_cli import RECIPE, gradient

SWEEP = """
init_images: pictures/red.png
prompts: [a, b, c]
strength: [0.3, 0.6, 0.9]
steps: [10, 20]
seeds: {start: 1, count: 8}
"""


def jobs(tmp_path: Path, text: str = SWEEP):
    from tests.test_recipe import write

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
    assert launcher_device("cuda", {"LOCAL_RANK": "1"}) == "cuda:1"
    assert launcher_device("cuda:0", {"LOCAL_RANK": "1"}) == "cuda:0"
    assert launcher_device("cpu", {"LOCAL_RANK": "1"}) == "cpu"


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_complete_deterministic_and_balanced(tmp_path: Path, count: int):
    all_jobs = jobs(tmp_path)
    owners = assign(all_jobs, count, 4)
    assert owners == assign(all_jobs, count, 4)
    assert set(owners) == set(range(count))
    loads = [
        sum(cost(j) for j, o in zip(all_jobs, owners, strict=True) if o == s) for s in range(count)
    ]
    biggest_chunk = max(cost(j) for j in all_jobs) * 4  # a batch of the unit, 4
    assert max(loads) - min(loads) <= biggest_chunk


@pytest.mark.parametrize("unit", [4, 16])  # of 1, every batch is one job: nothing to check
def test_shards_own_whole_batches(tmp_path: Path, unit: int) -> None:
    all_jobs = jobs(tmp_path)
    owners = dict(zip((job.id for job in all_jobs), assign(all_jobs, 3, unit), strict=True))
    for batch in make_batches(all_jobs, unit):
        assert len({owners[job.id] for job in batch}) == 1


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
