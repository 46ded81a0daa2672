"""Crash safety for real (issue 5): `batchgen run` on builtin:tiny killed with SIGKILL at seeded
random moments and at faults injected mid-write, then run to completion. Afterwards every job
is done exactly once, every image decodes and matches its recorded sha256, no temp file is
left, and the images are bit-identical to those of an uninterrupted run. And SIGTERM: exit
143, and running the same command again finishes.

Kill points (see "Kill points" below): SIGKILL from outside at a random moment (recipe, lock,
resume, model load, rendering, writing); recipe.lock.yaml's or an image's temp file torn
mid-write; an image written but not renamed; an image renamed but its row not appended (the
next run adopts it); a manifest row torn mid-write; a grid torn and report.html not renamed
after the last image; the lock holder's file torn; a row torn just before its line end. The
runs batch their jobs (`--batch-size 2`), so the bit-identity also checks that a resumed run
renders each job in the batch an uninterrupted run would.

Every killed run is a process of its own, killed by a real signal while writing real files.
A fresh interpreter spends about 10 s here importing torch and diffusers, so the killed runs are
forked from a small server that imported batchgen once (SERVER below); the uninterrupted
reference run and the run that finishes the job are plain `python -m batchgen` processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from batchgen.store.manifest import Manifest, ManifestRow
from tests.helpers import gradient

# 2 prompts x 2 strengths x `seeds` seeds; every job takes denoising steps.
RECIPE = """
name: crash
init_images: [pictures/gradient.png]
prompts: [fire, "cheery open fire, photograph"]
strength: [0.5, 0.75]
steps: 4
seeds: {{start: 1, count: {seeds}}}
"""
CPU_LABEL = "cpu (1 threads)"
RUN_TIMEOUT = 300  # seconds: a hung run fails the test instead of blocking the suite

# Runs `batchgen` in forked children, one request at a time. A request (a JSON line on stdin)
# names the command line, the file for the child's output, optionally a fault to arm in the
# child and a signal to send it; the answer (a JSON line on stdout) is its exit status.
SERVER = r'''
import builtins
import fnmatch
import json
import os
import pkgutil
import signal
import sys
import time
import traceback
from pathlib import Path

import batchgen.cli
import batchgen.engine.img2img  # torch and diffusers: the slow imports, done once for all children
import batchgen.running.runner
import batchgen.store.files
import batchgen.store.manifest


def die():
    """SIGKILL this process: no handler, no cleanup, no flushing of files."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def short(path):
    """What fault patterns match: the last two parts of a path, `images/0001-….png`."""
    return "/".join(Path(path).parts[-2:])


class Countdown:
    def __init__(self, nth):
        self.left = nth

    def hit(self):
        self.left -= 1
        return self.left == 0


class TornFile:
    """A file whose next write writes only its first bytes before the process dies."""

    def __init__(self, file, fault):
        self.file, self.fault = file, fault

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)

    def write(self, data):
        keep = len(data) - self.fault["drop"] if "drop" in self.fault else self.fault["keep"]
        self.file.write(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
        self.file.flush()
        die()


def arm(fault):
    """Make the child die at the fault's `nth` matching moment."""
    countdown = Countdown(fault["nth"])
    if fault["kind"] == "torn_write":  # a write through store's `open`: images, manifest, …
        def store_open(file, mode="r", *args, **kwargs):
            opened = builtins.open(file, mode, *args, **kwargs)
            if fnmatch.fnmatch(short(file), fault["match"]) and countdown.hit():
                return TornFile(opened, fault)
            return opened

        batchgen.store.files.open = batchgen.store.manifest.open = store_open
    elif fault["kind"] == "before_replace":  # a temp file whole and fsynced, not renamed yet
        real_replace = os.replace

        def replace(source, target, *args, **kwargs):
            if fnmatch.fnmatch(short(target), fault["match"]) and countdown.hit():
                die()
            return real_replace(source, target, *args, **kwargs)

        os.replace = replace
    elif fault["kind"] == "before_call":
        owner = pkgutil.resolve_name(fault["owner"])
        real = getattr(owner, fault["name"])

        def call(*args, **kwargs):
            if countdown.hit():
                die()
            return real(*args, **kwargs)

        setattr(owner, fault["name"], call)
    else:
        raise ValueError(f"unknown fault {fault}")


def child(request):
    output = os.open(request["log"], os.O_WRONLY | os.O_APPEND)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    code = 1
    try:
        if request["fault"]:
            arm(request["fault"])
        batchgen.cli.main(request["args"], prog_name="batchgen")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def supervise(pid, request):
    """Wait for the child; send it `send["signum"]` `send["delay"]` seconds after its output
    shows `send["after"]` (after its start when None); SIGKILL it past the timeout."""
    started, log = time.monotonic(), Path(request["log"])
    send, timed_out = request["send"], False
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        if send and (send["after"] is None or send["after"] in log.read_text(errors="replace")):
            time.sleep(send["delay"])
            os.kill(pid, send["signum"])  # not reaped yet: still this child, or its zombie
            send = None
        if not timed_out and time.monotonic() - started > request["timeout"]:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(0.005)


for line in sys.stdin:
    request = json.loads(line)
    Path(request["log"]).write_bytes(b"")
    pid = os.fork()
    if pid == 0:
        child(request)
    print(json.dumps(supervise(pid, request)), flush=True)
'''


def batchgen_env(cache: Path) -> dict[str, str]:
    """The environment of every batchgen process here. One torch thread: CPU results change in
    the last bits with the thread count, and the images of all runs must be comparable. No
    launcher or shard variables, and a hash cache of the test's own."""
    launcher = {"WORLD_SIZE", "RANK", "LOCAL_RANK"}
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BATCHGEN_", "SLURM_")) and name not in launcher
    }
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "BATCHGEN_CACHE_DIR": str(cache)}


class ForkServer:
    """SERVER as a subprocess. It starts importing at once, so that the first request, usually
    made after a fresh reference run, hardly waits."""

    def __init__(self, folder: Path) -> None:
        script = folder / "server.py"
        script.write_text(SERVER)
        self.errors = folder / "server-stderr.txt"
        with self.errors.open("w") as errors:
            self.process = subprocess.Popen(
                [sys.executable, str(script)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                cwd=folder,
                env=batchgen_env(folder / "cache"),
            )

    def run(
        self,
        args: list[str],
        log: Path,
        *,
        fault: dict[str, Any] | None = None,
        send: dict[str, Any] | None = None,
    ) -> int:
        """`batchgen ARGS` in a fork, its output in `log`; its exit status (-9: SIGKILL)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {"args": args, "log": str(log), "fault": fault, "send": send}
        self.process.stdin.write(json.dumps(request | {"timeout": RUN_TIMEOUT}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], RUN_TIMEOUT + 120)
        answer = self.process.stdout.readline() if ready else ""
        assert answer, f"the fork server did not answer:\n{self.errors.read_text()[-3000:]}"
        result = json.loads(answer)
        assert not result["timed_out"], f"batchgen {args} hung:\n{tail(log)}"
        return int(result["returncode"])

    def close(self) -> None:
        """End of input: the server exits once its current run, if any, is over."""
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    """One fork server for the module: its imports are paid once."""
    server = ForkServer(tmp_path_factory.mktemp("fork-server"))
    yield server
    server.close()


def tail(log: Path, characters: int = 3000) -> str:
    """The end of a run's output, for failure messages."""
    return log.read_text(errors="replace")[-characters:] if log.is_file() else "(no output)"


@dataclass
class Sweep:
    """A recipe on builtin:tiny in `folder` with 4 x `seeds` jobs, and its runs, fresh or
    forked, each into an output folder of `folder`; every run's output is kept in logs/."""

    folder: Path
    seeds: int
    server: ForkServer
    runs: int = 0

    def __post_init__(self) -> None:
        (self.folder / "pictures").mkdir()
        gradient(self.folder / "pictures" / "gradient.png")
        self.recipe = self.folder / "crash.yaml"
        self.recipe.write_text(RECIPE.format(seeds=self.seeds))
        (self.folder / "logs").mkdir()

    @property
    def jobs(self) -> int:
        return 4 * self.seeds

    def args(self, output: str) -> list[str]:
        # Batches of two: batched rendering is exercised, and a kill still finds jobs left.
        output_folder = str(self.folder / output)
        return [
            "run",
            str(self.recipe),
            "--device",
            "cpu",
            "--output",
            output_folder,
            "--batch-size",
            "2",
        ]

    def log(self, what: str) -> Path:
        self.runs += 1
        return self.folder / "logs" / f"{self.runs:02d}-{re.sub(r'[^a-z0-9.]+', '-', what)}.txt"

    def fresh(self, output: str) -> tuple[int, str]:
        """A plain `python -m batchgen run` process: its exit status and output."""
        result = subprocess.run(
            [sys.executable, "-m", "batchgen", *self.args(output)],
            cwd=self.folder,
            env=batchgen_env(self.folder / "cache"),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
        )
        self.log("fresh").write_text(result.stdout + result.stderr)
        return result.returncode, result.stdout + result.stderr

    def forked(self, output: str, what: str, **kill: dict[str, Any] | None) -> tuple[int, str]:
        """A run forked from the server, with `fault=` and/or `send=` (ForkServer.run)."""
        log = self.log(what)
        return self.server.run(self.args(output), log, **kill), tail(log)


# ---------------------------------------------------------------------------------------------
# What a run folder holds


def done_rows(run_dir: Path) -> dict[str, ManifestRow]:
    """Job id → its latest row, for the jobs done: the manifest's final view."""
    return {id: row for id, row in Manifest(run_dir).latest().items() if row.status == "done"}


def temp_files(run_dir: Path, folder: str = ".") -> list[Path]:
    """write_file_atomically's temp files (`.<name>.<8 hex>.tmp`) in and under a folder."""
    return sorted((run_dir / folder).rglob(".*.tmp"))


def unrecorded_images(run_dir: Path) -> set[str]:
    """Images on disk that no done row names: what a kill before the row leaves."""
    recorded = {Path(row.path).name for row in done_rows(run_dir).values()}
    return {path.name for path in (run_dir / "images").glob("*.png")} - recorded


def torn_row_at_end(run_dir: Path) -> bool:
    """Whether manifest.csv ends inside a row, as a kill in the middle of an append leaves it."""
    return not (run_dir / "manifest.csv").read_bytes().endswith(b"\n")


# Columns that say when and how fast, not what: they differ between any two runs. An adopted
# image's row also cannot know the device of the run that made it.
TIMING_COLUMNS = {"seconds", "finished_at", "device"}


def what_was_made(row: ManifestRow) -> dict[str, object]:
    """A row less its timing columns: what two runs of the same job must agree on."""
    return {f.name: getattr(row, f.name) for f in fields(row) if f.name not in TIMING_COLUMNS}


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run's final rows and image bytes, job id by job id."""

    rows: dict[str, ManifestRow] = field(repr=False)
    images: dict[str, bytes] = field(repr=False)

    @classmethod
    def run(cls, sweep: Sweep) -> Reference:
        code, output = sweep.fresh("reference")
        assert code == 0, output
        run_dir = sweep.folder / "reference"
        rows = done_rows(run_dir)
        assert len(rows) == sweep.jobs
        assert {row.device for row in rows.values()} == {CPU_LABEL}, "not one torch thread"
        return cls(rows, {id: (run_dir / row.path).read_bytes() for id, row in rows.items()})


def assert_complete_and_identical(run_dir: Path, reference: Reference) -> None:
    """The issue's end state: every job done exactly once, every image whole and as recorded,
    no temp file anywhere, and the same images, rows and files as the uninterrupted run."""
    rows = done_rows(run_dir)
    assert rows.keys() == reference.rows.keys()
    done_counts = Counter(row.id for row in Manifest(run_dir).rows() if row.status == "done")
    assert {id for id, count in done_counts.items() if count > 1} == set(), "a job done twice"
    assert temp_files(run_dir) == []
    for id, row in rows.items():
        with Image.open(run_dir / row.path) as png:
            png.load()
        data = (run_dir / row.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256, row.path
        assert data == reference.images[id], f"{row.path} differs from the reference"
        assert what_was_made(row) == what_was_made(reference.rows[id])
        assert row.device == CPU_LABEL, row.device
    made = sorted(path.name for path in (run_dir / "images").iterdir())
    assert made == sorted(Path(row.path).name for row in reference.rows.values())


# ---------------------------------------------------------------------------------------------
# Kill points


@dataclass(frozen=True)
class Kill:
    """One run of the folder under test, killed: by SIGKILL from outside (`send`) or by an
    injected fault (`fault`); `trace` finds what the kill must have left in the folder."""

    name: str
    fault: dict[str, Any] | None = None
    send: dict[str, Any] | None = None
    trace: Callable[[Path], object] = lambda run_dir: True
    jobs_needed: int = 1  # jobs the run must still have to make for the kill to land


def sigkill_at_random(rng: random.Random) -> Kill:
    """SIGKILL from outside at a random moment: after the start (recipe, lock, resume, model
    load), after the "N to do" line (model load, first image) or after the first image."""
    after = rng.choice([None, "to do,", "[1/"])
    delay = round(rng.uniform(0, 0.3 if after is None else 0.1), 3)
    return Kill(
        f"sigkill {delay}s after {after or 'the start'}",
        send={"signum": signal.SIGKILL, "after": after, "delay": delay},
        jobs_needed=2 if after == "[1/" else 1,
    )


def torn_image_write(rng: random.Random) -> Kill:
    """Mid-write: the image's temp file holds part of the PNG."""
    nth, keep = rng.randint(1, 2), round(rng.uniform(0.1, 0.9), 2)
    return Kill(
        f"image {nth} torn at {keep:.0%}",
        fault={"kind": "torn_write", "match": "images/.*.png.*.tmp", "nth": nth, "keep": keep},
        trace=lambda run_dir: temp_files(run_dir, "images"),
        jobs_needed=nth,
    )


def image_not_renamed(rng: random.Random) -> Kill:
    """The image's temp file written and fsynced, not yet renamed into place."""
    nth = rng.randint(1, 2)
    return Kill(
        f"image {nth} not renamed",
        fault={"kind": "before_replace", "match": "images/*.png", "nth": nth},
        trace=lambda run_dir: temp_files(run_dir, "images"),
        jobs_needed=nth,
    )


def image_without_row(rng: random.Random) -> Kill:
    """The image in place, its row not appended: the next run must adopt it."""
    nth = rng.randint(1, 2)
    fault = {"kind": "before_call", "owner": "batchgen.store.manifest:Ledger", "name": "append"}
    return Kill(
        f"append {nth} not made",
        fault=fault | {"nth": nth},
        trace=unrecorded_images,
        jobs_needed=nth,
    )


def torn_row(rng: random.Random) -> Kill:
    """Half a row, or some other part of it short of its last value, in the manifest."""
    nth, keep = rng.randint(1, 2), round(rng.uniform(0.1, 0.9), 2)
    return Kill(
        f"row {nth} torn at {keep:.0%}",
        fault={"kind": "torn_write", "match": "*/manifest.csv", "nth": nth, "keep": keep},
        trace=torn_row_at_end,
        jobs_needed=nth,
    )


def torn_lock_file(rng: random.Random) -> Kill:
    """Before any image: recipe.lock.yaml's temp file torn."""
    keep = round(rng.uniform(0.1, 0.9), 2)
    match = "*/.recipe.lock.yaml.*.tmp"
    return Kill(
        f"recipe.lock.yaml torn at {keep:.0%}",
        fault={"kind": "torn_write", "match": match, "nth": 1, "keep": keep},
        trace=temp_files,
    )


def torn_grid() -> Kill:
    """After the last image: the first grid's temp file torn."""
    return Kill(
        "grid torn",
        fault={"kind": "torn_write", "match": "grids/.*.tmp", "nth": 1, "keep": 0.5},
        trace=lambda run_dir: temp_files(run_dir, "grids"),
        jobs_needed=0,
    )


def report_not_renamed() -> Kill:
    """After the grids: report.html's temp file written, not renamed."""
    return Kill(
        "report not renamed",
        fault={"kind": "before_replace", "match": "*/report.html", "nth": 1},
        trace=temp_files,
        jobs_needed=0,
    )


FAULTS_MID_RUN = (torn_lock_file, torn_image_write, image_not_renamed, image_without_row, torn_row)


def kill_plan(rng: random.Random, external: int, faults: list[Callable[..., Kill]]) -> list[Kill]:
    """`external` random SIGKILLs and the `faults` in a seeded order, then the kills after the
    last image, which only a run that makes every image left reaches."""
    kills = [sigkill_at_random(rng) for _ in range(external)] + [fault(rng) for fault in faults]
    rng.shuffle(kills)
    return [*kills, torn_grid(), report_not_renamed()]


def left_to_make(run_dir: Path, reference: Reference) -> int:
    """Jobs not done yet, less one an earlier kill may have left for adoption: how many the
    next run makes at least, to check that a kill planned at its Nth image can land."""
    return max(len(reference.rows.keys() - done_rows(run_dir).keys()) - 1, 0)


def kill_then_finish(sweep: Sweep, kills: list[Kill]) -> None:
    """The issue's test: a reference run, then the folder under test killed at each of `kills`
    in turn, then finished by a plain run, and compared."""
    reference = Reference.run(sweep)
    run_dir = sweep.folder / "killed"
    for kill in kills:
        jobs_left = left_to_make(run_dir, reference)
        assert jobs_left >= kill.jobs_needed, f"{kill.name}: the plan left it {jobs_left} jobs"
        code, output = sweep.forked("killed", kill.name, fault=kill.fault, send=kill.send)
        assert code == -signal.SIGKILL, f"{kill.name}: not killed (exit {code}):\n{output}"
        assert kill.trace(run_dir), f"{kill.name}: left no trace in {sorted(run_dir.rglob('*'))}"
    code, output = sweep.fresh("killed")
    assert code == 0, output
    assert f"nothing to do: all {sweep.jobs} jobs are done" in output
    assert_complete_and_identical(run_dir, reference)
    log = (run_dir / "run.log").read_text()
    assert "adopted" in log and "temp file(s) a killed run left" in log


# ---------------------------------------------------------------------------------------------
# Tests


def test_killed_at_random_moments_and_mid_write_a_rerun_finishes_as_if_never_killed(
    server: ForkServer, tmp_path: Path
) -> None:
    """12 kills, 24 jobs: 5 random SIGKILLs, each mid-run fault once, the 2 after the images."""
    sweep = Sweep(tmp_path, seeds=6, server=server)
    kill_then_finish(sweep, kill_plan(random.Random(5), 5, list(FAULTS_MID_RUN)))


@pytest.mark.slow
def test_killed_thirty_times_a_rerun_finishes_as_if_never_killed(
    server: ForkServer, tmp_path: Path
) -> None:
    """32 kills, 64 jobs: 14 random SIGKILLs, 16 mid-run faults drawn at random, and the 2
    after the images. `make test-slow` runs it."""
    rng = random.Random(20)
    faults = [rng.choice(FAULTS_MID_RUN) for _ in range(16)]
    kill_then_finish(Sweep(tmp_path, seeds=16, server=server), kill_plan(rng, 14, faults))


def test_sigterm_stops_after_the_current_image_and_a_rerun_finishes(
    server: ForkServer, tmp_path: Path
) -> None:
    """A SIGTERM while job 2 is made: that job finishes, then the run exits 143."""
    sweep = Sweep(tmp_path, seeds=3, server=server)
    sigterm = {"signum": signal.SIGTERM, "after": "[1/", "delay": 0}
    code, output = sweep.forked("out", "sigterm", send=sigterm)
    assert code == 143, output
    assert "SIGTERM: stopping after the current batch" in output
    assert "run the same command again to finish the rest" in output
    made = len(done_rows(tmp_path / "out"))
    assert 1 <= made < sweep.jobs and temp_files(tmp_path / "out") == []
    code, output = sweep.forked("out", "again")
    assert code == 0, output
    assert f"{sweep.jobs - made} made, 0 failed, {made} already done" in output
    assert len(done_rows(tmp_path / "out")) == sweep.jobs


# ---------------------------------------------------------------------------------------------
# Kill points at the edges of a write, each checked on its own.


def test_a_kill_while_the_lock_holder_file_is_written_leaves_no_temp_file(
    server: ForkServer, tmp_path: Path
) -> None:
    sweep = Sweep(tmp_path, seeds=1, server=server)
    holder = ".locks/.run.lock.json.*.tmp"
    fault = {"kind": "torn_write", "match": holder, "nth": 1, "keep": 0.5}
    code, output = sweep.forked("out", "lock holder torn", fault=fault)
    assert code == -signal.SIGKILL, output
    assert temp_files(tmp_path / "out", ".locks"), "the kill left no temp file"
    code, output = sweep.forked("out", "again")
    assert code == 0, output
    assert len(done_rows(tmp_path / "out")) == sweep.jobs
    assert temp_files(tmp_path / "out") == []


@pytest.mark.parametrize("drop", [1, 3], ids=["before-its-line-end", "in-its-last-value"])
def test_a_row_torn_at_its_very_end_leaves_its_job_done_once(
    server: ForkServer, tmp_path: Path, drop: int
) -> None:
    sweep = Sweep(tmp_path, seeds=1, server=server)
    fault = {"kind": "torn_write", "match": "*/manifest.csv", "nth": 2, "drop": drop}
    code, output = sweep.forked("out", "row torn at its end", fault=fault)
    assert code == -signal.SIGKILL, output
    assert torn_row_at_end(tmp_path / "out")
    code, output = sweep.forked("out", "again")
    assert code == 0 and "adopted 1 image(s)" in output, output
    assert len(done_rows(tmp_path / "out")) == sweep.jobs
    rows = Manifest(tmp_path / "out").rows()
    done = Counter(row.id for row in rows if row.status == "done")
    assert max(done.values()) == 1, done
