"""A run folder made by batchgen 0.3 (tests/data/run-0.3, with the commit and CPU that made it
in made-on.json) still reads as finished, and the same recipe renders the same pixels: the
job ids, the manifest and the images of users' run folders outlive any refactor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from batchgen.running.runner import run
from batchgen.store.manifest import Manifest
from batchgen.views.verify import Tolerance, verify_run

RELEASE = Path(__file__).parent / "data" / "run-0.3"


def this_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return ""


@pytest.fixture
def release(tmp_path: Path) -> Path:
    """A copy of the release's recipe, pictures and run folder, to run in."""
    shutil.copytree(RELEASE, tmp_path / "release")
    return tmp_path / "release"


@pytest.fixture
def two_threads():  # type: ignore[no-untyped-def]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # as the release's run: the last bits follow the thread count
    yield
    torch.set_num_threads(threads)


def test_a_run_folder_of_0_3_is_all_done_and_nothing_is_rendered(release: Path) -> None:
    images = {path.name: path.read_bytes() for path in (release / "run" / "images").iterdir()}
    result = run(release / "v03.yaml", output=release / "run", device="cpu", quiet=True)
    assert (result.made, result.failed, result.already_done) == (0, 0, 16)
    assert {path.name: path.read_bytes() for path in (release / "run" / "images").iterdir()} == (
        images
    )
    assert len(Manifest(release / "run").rows()) == 16  # no row added


def test_the_recipe_of_0_3_renders_the_same_pixels_today(release: Path, two_threads) -> None:  # type: ignore[no-untyped-def]
    fresh = run(release / "v03.yaml", output=release / "fresh", device="cpu", quiet=True)
    assert fresh.made == 16
    new_ids = set(Manifest(release / "fresh").latest())
    assert new_ids == set(Manifest(release / "run").latest())
    # Bit for bit on the CPU that made the release; another CPU's kernels may round the last
    # bits of a float the other way, which moves a pixel by a level here and there.
    made_on = json.loads((RELEASE / "made-on.json").read_text())
    same_cpu = made_on["cpu"] == this_cpu()
    tolerance = Tolerance() if same_cpu else Tolerance(max_diff=2)
    verification = verify_run(release / "fresh", release / "run", tolerance)
    assert verification.ok, [c.notes or c.max_diff for c in verification.mismatched]
    assert len(verification.matched) == 16
