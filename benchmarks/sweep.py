"""Issue 9's benchmark: one img2img sweep made two ways in one process — a plain per-job
`StableDiffusionImg2ImgPipeline` loop (what a user writes without batchgen) and
`batchgen.running.runner.run` — reporting images/s, their ratio, peak memory, the largest pixel
difference between the two outputs and the share of wall time inside model forward calls.
It also times `batchgen plan` on a 10,000-job recipe.

Both arms are timed the same way: the wall time of the sweep after one warm-up job, model
loading excluded, writing the PNGs included (the loop saves each image; batchgen writes its
images, manifest, grid and report.html). Nothing is downloaded: the SD1.5-architecture model
is built here from the configs batchgen ships, with random weights (throughput does not depend
on their values). Figures and the machines they came from: benchmarks/RESULTS.md.

    python benchmarks/sweep.py                       # CPU: tiny64, tiny256, a small sd15
    python benchmarks/sweep.py --profile gpu         # 512² SD1.5, 50 steps, fp16, 32 jobs
    python benchmarks/sweep.py --only tiny64 --batch-size 4

SDXL (issue 18) has its workloads too: the tiny SDXL of tools/tiny_sdxl.py at 64 px on both
profiles, and on the gpu profile SDXL's architecture (batchgen's shipped sdxl-base configs,
random weights) at 1024² in fp16, each against a plain `StableDiffusionXLImg2ImgPipeline` loop.
"""

from __future__ import annotations

import os

# Before diffusers and transformers load huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

import argparse
import contextlib
import ctypes
import gc
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import PIL.Image
import torch
import transformers
import yaml

# tools/ is not installed with the package: the tiny SDXL builder is imported from the checkout.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchgen.engine.devices import NO_FAST_PATHS, FastPaths
from batchgen.engine.families.sd_loading import load_tokenizer
from batchgen.engine.images import prepare
from batchgen.engine.schedulers import scheduler_spec
from batchgen.jobs.job import Job
from batchgen.jobs.plan import make_plan
from batchgen.models.source import CONFIGS_DIR, resolve_model
from batchgen.recipe.load import load_recipe
from batchgen.running.runner import BatchSize, run
from batchgen.store.manifest import Manifest
from tools.tiny_sd3 import write_tiny_sd3
from tools.tiny_sdxl import write_tiny_sdxl

REPO_ROOT = Path(__file__).resolve().parent.parent
FIRE_DRAWING = REPO_ROOT / "recipes" / "pictures" / "fire-drawing.png"
PROMPTS = ("fire", "cheery open fire, photograph")
TINY = "builtin:tiny"
SD15_RANDOM = "sd15-random"  # built by build_random_sd15 into the work folder
SDXL_RANDOM = "sdxl-random"  # built by build_random_sdxl into the work folder
TINY_SDXL = "tiny-sdxl"  # tools/tiny_sdxl.py's, written into the work folder
TINY_SD3 = "tiny-sd3"  # tools/tiny_sd3.py's, likewise
TINY_WRITERS = {TINY_SDXL: write_tiny_sdxl, TINY_SD3: write_tiny_sd3}
PLAN_JOBS = 10_000
# Above this many cores of other processes' CPU use during an arm, its figures are flagged.
DISTURBED_CORES = 0.2


@dataclass(frozen=True)
class Workload:
    """One sweep: prompts × init images × strengths × seeds at one size and step count."""

    name: str
    model: str  # TINY, TINY_SDXL, SD15_RANDOM or SDXL_RANDOM
    size: int  # width and height, pixels
    prompts: int
    init_images: int  # the fire drawing, then its mirror image
    strengths: tuple[float, ...]
    seeds: int
    steps: int  # nominal: the denoiser takes int(steps × strength)
    cfg: float = 7.5
    scheduler: str = "k_lms"

    @property
    def jobs(self) -> int:
        return self.prompts * self.init_images * len(self.strengths) * self.seeds

    def describe(self) -> str:
        strengths = "/".join(f"{s:g}" for s in self.strengths)
        return (
            f"{self.model} {self.size}×{self.size}, {self.jobs} jobs "
            f"({_count(self.prompts, 'prompt')} × {_count(self.init_images, 'init')} × "
            f"strength {strengths} × {_count(self.seeds, 'seed')}), "
            f"{self.scheduler} {self.steps} steps, cfg {self.cfg:g}"
        )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def tiny_sweep(
    name: str,
    size: int,
    model: str = TINY,
    strengths: tuple[float, ...] = (0.4, 0.7),
    scheduler: str = "k_lms",
) -> Workload:
    """The issue's builtin:tiny sweep: 2 prompts × 2 init images × 2 strengths × 4 seeds."""
    return Workload(name, model, size, 2, 2, strengths, 4, steps=10, scheduler=scheduler)


# The profiles: what runs where. The SD1.5 UNet reads 3.4 GB of fp32 weights per forward call,
# so on a CPU it runs small (64 px, 7 steps taken, 4 jobs) just to exercise the path.
PROFILES: dict[str, dict[str, Workload]] = {
    "cpu": {
        "tiny64": tiny_sweep("tiny64", 64),
        "tiny256": tiny_sweep("tiny256", 256),
        "sd15": Workload("sd15", SD15_RANDOM, 64, 1, 1, (0.75,), 4, steps=10),
        "sdxl64": tiny_sweep("sdxl64", 64, TINY_SDXL),
        # 0.6, not 0.7: diffusers' flow pipelines take 8 of 10 steps at 0.7 (batchgen, as the
        # seed document, 7), and the loop must make the same jobs.
        "sd3_64": tiny_sweep("sd3_64", 64, TINY_SD3, (0.4, 0.6), "flow_euler"),
    },
    "gpu": {
        "tiny64": tiny_sweep("tiny64", 64),
        "tiny256": tiny_sweep("tiny256", 256),
        "sd15": Workload("sd15", SD15_RANDOM, 512, 2, 2, (0.75,), 8, steps=50),
        "sdxl64": tiny_sweep("sdxl64", 64, TINY_SDXL),
        # SDXL's own scheduler and size: 30 steps at strength 0.6 take 18, 8 jobs.
        "sdxl": Workload("sdxl", SDXL_RANDOM, 1024, 2, 1, (0.6,), 4, steps=30, scheduler="k_euler"),
    },
}
PROFILE_DEVICE = {"cpu": "cpu", "gpu": "cuda"}
PROFILE_DTYPE = {"cpu": "float32", "gpu": "float16"}


# ---------------------------------------------------------------------------------------------
# Measuring: forward-call time and peak memory


class ForwardTimer:
    """Seconds spent inside the models' forward calls (text encoder, UNet, VAE encode and
    decode), by component. On CUDA a call's time is its span on the GPU, between CUDA events
    recorded before and after it, read when `seconds` is asked for: synchronizing around each
    call instead would stop the host from queueing the next call's kernels, which costs a
    per-job loop with many small calls more than batchgen, and would flatter the ratio."""

    WRAPPED = (
        ("text_encoder", "forward"),
        ("unet", "forward"),
        ("vae", "encode"),
        ("vae", "decode"),
    )

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []  # CUDA: (name, start, end), not yet read

    def instrument(self, components: Any) -> None:
        """Wrap the forward methods of `components` (an engine's family or a pipeline): an
        instance attribute shadows the class's method, and `module(...)` calls `self.forward`.
        SDXL's two text encoders count together as `text_encoder`."""
        for component, method in self.WRAPPED:
            for owner in _owners(components, component):
                timed = self._timed(f"{component}.{method}", getattr(owner, method))
                setattr(owner, method, timed)

    def reset(self) -> None:
        self._seconds, self._events = {}, []

    @property
    def seconds(self) -> dict[str, float]:
        if self._events:
            torch.cuda.synchronize()
            for name, start, end in self._events:
                self._add(name, start.elapsed_time(end) / 1000)
            self._events = []
        return self._seconds

    def _add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def _timed(self, name: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                try:
                    return call(*args, **kwargs)
                finally:
                    end.record()
                    self._events.append((name, start, end))
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self._add(name, time.perf_counter() - started)

        return timed


class PeakMemory:
    """One arm's peak memory. CUDA: torch's peak allocation. CPU: the process's peak resident
    set (VmHWM), reset at the arm's start through /proc/self/clear_refs (Linux ≥ 4.0), so that
    both arms are measured in this one process; reported with the RSS at the arm's start,
    which already holds Python, torch and diffusers."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.start_bytes = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return
        _return_freed_memory()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        self.start_bytes = _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")

    def label(self) -> str:
        return "peak CUDA allocated" if self.cuda else "peak RSS"


def _owners(components: Any, component: str) -> list[Any]:
    """The modules behind a WRAPPED name: a family's `text_encoders` list, a pipeline's
    `text_encoder` and `text_encoder_2` (an SDXL refiner has no first), a family's `denoiser`
    for the pipeline's `unet`, or the one module."""
    if component == "unet":  # a family's denoiser, or an SD3 pipeline's transformer
        return [
            getattr(components, "denoiser", None)
            or getattr(components, "transformer", None)
            or components.unet
        ]
    if component != "text_encoder":
        return [getattr(components, component)]
    if hasattr(components, "text_encoders"):
        return list(components.text_encoders)
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    found = (getattr(components, name, None) for name in names)
    return [module for module in found if module is not None]


def _return_freed_memory() -> None:
    """glibc keeps freed heap pages; give them back so the next arm starts from a true RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status_bytes(key: str) -> int:
    """A `kB` line of /proc/self/status in bytes; 0 where there is no such file."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    return 0


class OtherLoad:
    """How many cores other processes kept busy during a timed stretch: the machine's busy
    time (/proc/stat) minus this process's own CPU time, over the wall time. On a shared box
    it says how far a figure was disturbed; None where /proc/stat is missing."""

    def __init__(self) -> None:
        self.started = (time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds())

    def cores(self) -> float | None:
        wall, busy, own = self.started
        busy_now = _machine_busy_seconds()
        if busy is None or busy_now is None:
            return None
        others = (busy_now - busy) - (_own_cpu_seconds() - own)
        return max(0.0, others / (time.perf_counter() - wall))


def _machine_busy_seconds() -> float | None:
    """CPU seconds every process has run, all cores together (user, nice, system, irq)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class ArmResult:
    """One way of making the sweep: its timing, memory and the images it wrote by job id."""

    name: str
    images: dict[str, Path]
    seconds: float  # the sweep, after the warm-up, model load excluded
    load_seconds: float
    peak_bytes: int
    start_bytes: int
    forward_seconds: dict[str, float]
    other_cores: float | None  # other processes' CPU use during the sweep, see OtherLoad
    render_seconds: float | None = None  # batchgen: time inside its render calls (manifest)
    batch_note: str = ""

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds

    @property
    def forward_share(self) -> float:
        return sum(self.forward_seconds.values()) / self.seconds


# ---------------------------------------------------------------------------------------------
# The inputs: init images, the random SD1.5 model, recipes


def write_init_images(folder: Path) -> list[Path]:
    """The fire drawing and its mirror image: two init images with the same content cost."""
    folder.mkdir(parents=True, exist_ok=True)
    mirrored = folder / "fire-drawing-mirrored.png"
    with PIL.Image.open(FIRE_DRAWING) as drawing:
        drawing.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    copy = folder / FIRE_DRAWING.name
    shutil.copyfile(FIRE_DRAWING, copy)
    return [copy, mirrored]


# The shipped config folder each random-weight model is built from.
RANDOM_MODELS = {SD15_RANDOM: "sd15", SDXL_RANDOM: "sdxl-base"}


def build_random_model(folder: Path, config: str, device: str) -> Path:
    """A diffusers folder with the architecture of one of batchgen's shipped configs (SD1.5's
    or SDXL base's) and seeded random weights, saved as fp16 safetensors (SD1.5 2.1 GB, SDXL
    6.9 GB; each arm loads them in its own dtype). The weights are drawn on `device` (a GPU
    draws SDXL's 3.5 billion in seconds). Reused when `folder` already holds one."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = CONFIGS_DIR / config
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch.manual_seed(0)
    builders: dict[str, Callable[[Path], Any]] = {  # diffusers models are untyped
        "unet": lambda path: UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(path)
        ),
        "vae": lambda path: AutoencoderKL.from_config(AutoencoderKL.load_config(path)),
        "text_encoder": lambda path: CLIPTextModel(CLIPTextConfig.from_pretrained(path)),
        "text_encoder_2": lambda path: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(path)
        ),
    }
    for name, build in builders.items():  # one at a time: SDXL's UNet is 10 GB in fp32
        if not (configs / name).is_dir():
            continue
        with torch.device(device):
            model = build(configs / name).to(torch.float16)
        model.save_pretrained(partial / name, safe_serialization=True)
        del model
        tokenizer = name.replace("text_encoder", "tokenizer")
        if tokenizer != name:
            load_tokenizer(configs, tokenizer).save_pretrained(partial / tokenizer)
    shutil.copytree(configs / "scheduler", partial / "scheduler")
    shutil.copyfile(configs / "model_index.json", partial / "model_index.json")
    partial.rename(folder)
    return folder


def write_recipe(
    path: Path,
    workload: Workload,
    model: str,
    init_images: Sequence[Path],
    dtype: str,
    *,
    warm_up: bool = False,
) -> Path:
    """The workload as a batchgen recipe; `warm_up` keeps only its first job."""
    seeds = {"start": 1000, "count": 1 if warm_up else workload.seeds}
    recipe = {
        "name": path.stem,
        "model": model,
        "scheduler": workload.scheduler,
        "init_images": [str(p) for p in init_images[: 1 if warm_up else workload.init_images]],
        "prompts": list(PROMPTS[: 1 if warm_up else workload.prompts]),
        "strength": list(workload.strengths[:1] if warm_up else workload.strengths),
        "steps": workload.steps,
        "cfg": workload.cfg,
        "seeds": seeds,
        "width": workload.size,
        "height": workload.size,
        "dtype": dtype,
        "output": str(path.with_suffix("")),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def recipe_jobs(recipe_path: Path, dtype: str) -> list[Job]:
    """The recipe's jobs as batchgen numbers them: the loop makes the same ones, by id."""
    return [planned.job for planned in make_plan(load_recipe(recipe_path), dtype).jobs]


# ---------------------------------------------------------------------------------------------
# The plain loop


def load_pipeline(model_path: Path, scheduler: str, device: str, dtype: str) -> Any:
    """diffusers' img2img pipeline from the same folder, with the sweep's scheduler built from
    the model's own scheduler config, as a user would."""
    if (model_path / "transformer").is_dir():  # SD 3
        pipe = diffusers.StableDiffusion3Img2ImgPipeline.from_pretrained(
            model_path, dtype=getattr(torch, dtype), local_files_only=True
        ).to(device)
    elif (model_path / "text_encoder_2").is_dir():  # SDXL: no safety checker to turn off
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(
            model_path, dtype=getattr(torch, dtype), local_files_only=True
        ).to(device)
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
            model_path,
            dtype=getattr(torch, dtype),
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        ).to(device)
    pipe.set_progress_bar_config(disable=True)
    spec = scheduler_spec(scheduler)
    scheduler_class = getattr(diffusers, spec.class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **spec.config)
    return pipe


def pipeline_image(pipe: Any, job: Job, init: PIL.Image.Image) -> PIL.Image.Image:
    """One job through the pipeline, with the generator batchgen's engine matches. No negative
    prompt is None, as a user leaves it out: SD encodes it as "", SDXL's pipeline zeros it."""
    # SD 3's pipeline resizes to its transformer's sample size unless told the size.
    size = {"height": job.height, "width": job.width} if hasattr(pipe, "transformer") else {}
    return pipe(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or None,
        image=init,
        **size,
        strength=job.strength,
        num_inference_steps=job.steps_nominal,
        guidance_scale=job.cfg,
        generator=torch.Generator("cpu").manual_seed(job.seed),
    ).images[0]


def run_loop(
    jobs: Sequence[Job], model_path: Path, workload: Workload, device: str, dtype: str, out: Path
) -> ArmResult:
    """The user's alternative: load the pipeline, then one call and one PNG per job."""
    memory = PeakMemory(device)
    memory.start()
    started = time.perf_counter()
    pipe = load_pipeline(model_path, workload.scheduler, device, dtype)
    load_seconds = time.perf_counter() - started
    timer = ForwardTimer(device)
    timer.instrument(pipe)
    size = (workload.size, workload.size)
    pipeline_image(pipe, jobs[0], prepare(jobs[0].init_image.path, size).rgb)  # warm-up
    timer.reset()

    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path] = {}
    inits: dict[Path, PIL.Image.Image] = {}
    started, others = time.perf_counter(), OtherLoad()
    for job in jobs:
        if job.init_image.path not in inits:  # each init image is read once, as a user would
            inits[job.init_image.path] = prepare(job.init_image.path, size).rgb
        images[job.id] = out / f"{job.index:04d}.png"
        pipeline_image(pipe, job, inits[job.init_image.path]).save(images[job.id])
    _synchronize(device)
    seconds = time.perf_counter() - started
    return ArmResult(
        "plain loop",
        images,
        seconds,
        load_seconds,
        memory.peak(),
        memory.start_bytes,
        dict(timer.seconds),
        others.cores(),
    )


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# batchgen


class EngineTimers:
    """`batchgen.run`'s `on_engine` hook: forward timers on each engine's models as it loads,
    so that the runner's own loading and loop are measured without changing the package."""

    def __init__(self) -> None:
        self.engines: list[Any] = []
        self.timers: list[ForwardTimer] = []

    def __call__(self, engine: Any) -> None:
        timer = ForwardTimer(engine.device)
        timer.instrument(engine.family)
        self.engines.append(engine)
        self.timers.append(timer)

    def clear(self) -> None:
        self.engines.clear()
        self.timers.clear()


@dataclass(frozen=True)
class BatchgenOptions:
    """How batchgen's arm runs: `--batch-size` and the `--fast` paths."""

    batch_size: BatchSize = "auto"
    fast_paths: FastPaths = NO_FAST_PATHS

    def __str__(self) -> str:
        """As the arm's column title: `auto`, or `auto, compile,channels_last`."""
        return ", ".join(filter(None, [str(self.batch_size), str(self.fast_paths)]))


def run_batchgen(
    recipe: Path, warm_up_recipe: Path, device: str, options: BatchgenOptions
) -> ArmResult:
    """`batchgen.run` on the warm-up recipe, then on the sweep; the sweep's time is the run's
    own wall time minus its model load. With `--fast compile` the warm-up compiles for its own
    batch shape only: the sweep's first batches compile again, so use `--repeat 2` (later
    repeats find torch's compile caches warm)."""
    memory = PeakMemory(device)
    memory.start()
    timers = EngineTimers()
    _checked_run(warm_up_recipe, device, options, timers)
    # Let the warm-up's model go before the sweep loads its own (the timers' wrappers form
    # reference cycles, which only the cycle collector frees).
    timers.clear()
    gc.collect()
    others = OtherLoad()
    result = _checked_run(recipe, device, options, timers)
    other_cores = others.cores()
    engine, forward_timer = timers.engines[-1], timers.timers[-1]
    rows = Manifest(result.output).latest().values()
    return ArmResult(
        f"batchgen ({options})",
        {row.id: result.output / row.path for row in rows},
        result.seconds - engine.load_seconds,
        engine.load_seconds,
        memory.peak(),
        memory.start_bytes,
        dict(forward_timer.seconds),
        other_cores,
        render_seconds=sum(row.seconds for row in rows),
        batch_note=", ".join(sorted({str(row.batch_size) for row in rows})),
    )


def _checked_run(recipe: Path, device: str, options: BatchgenOptions, timers: EngineTimers) -> Any:
    result = run(
        recipe,
        device=device,
        quiet=True,
        batch_size=options.batch_size,
        fast_paths=options.fast_paths,
        on_engine=timers,
    )
    if result.exit_code != 0:
        errors = {row.error for row in Manifest(result.output).latest().values() if row.error}
        raise SystemExit(
            f"batchgen failed on {recipe}: {result.failed} failed, exit {result.exit_code}: "
            + ("; ".join(sorted(errors)) or result.storage_error or "see its run.log")
        )
    return result


# ---------------------------------------------------------------------------------------------
# One workload


@dataclass
class WorkloadResult:
    """Every repeat of both arms; the figures are each arm's fastest repeat (the one least
    disturbed by whatever else shares the machine) and its peak memory over all repeats."""

    workload: Workload
    loops: list[ArmResult]
    ours: list[ArmResult]
    max_pixel_diff: int
    notes: list[str] = field(default_factory=list)

    @property
    def loop(self) -> ArmResult:
        return min(self.loops, key=lambda arm: arm.seconds)

    @property
    def batchgen(self) -> ArmResult:
        return min(self.ours, key=lambda arm: arm.seconds)

    @property
    def ratio(self) -> float:
        return self.batchgen.images_per_second / self.loop.images_per_second


def max_pixel_difference(loop: ArmResult, ours: ArmResult) -> int:
    """The largest difference in any channel of any image, in 8-bit levels, matched by id."""
    if loop.images.keys() != ours.images.keys():
        raise SystemExit(
            f"the two arms made different jobs: {loop.images.keys() ^ ours.images.keys()}"
        )
    largest = 0
    for job_id, path in loop.images.items():
        theirs = np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)
        mine = np.asarray(PIL.Image.open(ours.images[job_id]).convert("RGB"), dtype=np.int16)
        largest = max(largest, int(np.abs(theirs - mine).max()))
    return largest


def run_workload(
    workload: Workload,
    work: Path,
    device: str,
    dtype: str,
    options: BatchgenOptions,
    repeats: int,
) -> WorkloadResult:
    """Both arms, alternating, `repeats` times; each repeat loads its model and warms up
    afresh and batchgen writes into a new folder (it would skip jobs already done)."""
    folder = work / workload.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    inits = write_init_images(work / "init")
    started = time.perf_counter()
    if workload.model in RANDOM_MODELS:
        config = RANDOM_MODELS[workload.model]
        model = str(build_random_model(work / workload.model, config, device))
        print(f"random-weight {config} model ready in {time.perf_counter() - started:.0f} s")
    elif workload.model in TINY_WRITERS:
        model = str(work / workload.model)
        if not (work / workload.model / "model_index.json").exists():
            TINY_WRITERS[workload.model](work / workload.model)
    else:
        model = workload.model
    model_path = resolve_model(model, folder).path
    loops: list[ArmResult] = []
    ours: list[ArmResult] = []
    for repeat in range(1, repeats + 1):
        recipe = write_recipe(folder / f"batchgen-{repeat}.yaml", workload, model, inits, dtype)
        warm_up = write_recipe(
            folder / f"warm-up-{repeat}.yaml", workload, model, inits, dtype, warm_up=True
        )
        jobs = recipe_jobs(recipe, dtype)
        loops.append(run_loop(jobs, model_path, workload, device, dtype, folder / f"loop-{repeat}"))
        ours.append(run_batchgen(recipe, warm_up, device, options))
    result = WorkloadResult(workload, loops, ours, max_pixel_difference(loops[0], ours[0]))
    if any(_is_flat(path) for path in ours[0].images.values()):
        result.notes.append("some images are one flat colour (random weights saturate)")
    return result


def _is_flat(path: Path) -> bool:
    with PIL.Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return bool((pixels == pixels[0, 0]).all())


# ---------------------------------------------------------------------------------------------
# `batchgen plan` on a big recipe


@dataclass
class PlanResult:
    """`batchgen plan` timed in this process and as the command a user types."""

    jobs: int
    make_plan_seconds: float  # in this process, recipe loading included
    cli_seconds: dict[int, float]  # `python -m batchgen plan`, process start to exit, by jobs
    cli_peak_bytes: dict[int, int]


def write_plan_recipe(path: Path, jobs: int, init_image: Path) -> Path:
    """builtin:tiny × 10 prompts × 10 strengths × jobs/100 seeds, nothing done yet."""
    recipe = {
        "name": path.stem,
        "model": TINY,
        "init_images": [str(init_image)],
        "prompts": [f"prompt {number}" for number in range(10)],
        "strength": {"start": 0.1, "stop": 1.0, "num": 10},
        "steps": 10,
        "seeds": {"start": 0, "count": jobs // 100},
        "output": str(path.with_suffix("")),
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def bench_plan(work: Path, jobs: int) -> PlanResult:
    """`make_plan` in this process, and the CLI in a child process at jobs/10 and jobs, to
    see whether its time and memory grow with the job count."""
    folder = work / "plan"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    init = write_init_images(work / "init")[0]
    recipes = {
        count: write_plan_recipe(folder / f"plan-{count}.yaml", count, init)
        for count in (jobs // 10, jobs)
    }
    started = time.perf_counter()
    planned = make_plan(load_recipe(recipes[jobs]), "float32")
    make_plan_seconds = time.perf_counter() - started
    if len(planned.jobs) != jobs:
        raise SystemExit(f"the plan recipe made {len(planned.jobs)} jobs, not {jobs}")
    seconds, peaks = {}, {}
    for count, recipe in recipes.items():
        seconds[count], peaks[count] = _timed_plan_cli(recipe)
    return PlanResult(jobs, make_plan_seconds, seconds, peaks)


# `python -m batchgen plan RECIPE` that reports its own peak RSS on its last stderr line. Not
# wait4's ru_maxrss: Linux carries the parent's high-water mark into a forked child.
PLAN_CHILD = """
import sys
from pathlib import Path
from batchgen.cli import main
try:
    main(["plan", sys.argv[1]], prog_name="batchgen")
finally:
    status = Path("/proc/self/status").read_text().splitlines()
    print(next(line for line in status if line.startswith("VmHWM:")), file=sys.stderr)
"""


def _timed_plan_cli(recipe: Path) -> tuple[float, int]:
    """Wall seconds, process start to exit, and peak RSS of `batchgen plan RECIPE`."""
    started = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-c", PLAN_CHILD, str(recipe)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - started
    last_line = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
    if child.returncode != 0 or not last_line.startswith("VmHWM:"):
        raise SystemExit(f"batchgen plan {recipe} failed: {child.stderr[-2000:]}")
    return seconds, int(last_line.split()[1]) * 1024


# ---------------------------------------------------------------------------------------------
# Output


def machine() -> str:
    """What the figures depend on: CPU model and count, torch's threads, library versions."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    text = (
        f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), diffusers {diffusers.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}"
    )
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def megabytes(count: int) -> str:
    return f"{count / 1e6:,.0f} MB"


def print_workload(result: WorkloadResult, memory_label: str) -> None:
    """Both arms side by side: the fastest repeat's figures, where the time went, and the
    peak memory over every repeat."""
    loop, ours = result.loop, result.batchgen
    rows = [
        ("images/s", f"{loop.images_per_second:.3f}", f"{ours.images_per_second:.3f}"),
        ("sweep s, each repeat", _each(result.loops), _each(result.ours)),
        ("model load s", f"{loop.load_seconds:.1f}", f"{ours.load_seconds:.1f}"),
        (memory_label, _peak(result.loops), _peak(result.ours)),
        ("  at the arm's start", megabytes(loop.start_bytes), megabytes(ours.start_bytes)),
        ("forward share", f"{loop.forward_share:.0%}", f"{ours.forward_share:.0%}"),
    ]
    for component, method in ForwardTimer.WRAPPED:
        key = f"{component}.{method}"
        rows.append(
            (
                f"  {key} s",
                f"{loop.forward_seconds.get(key, 0):.2f}",
                f"{ours.forward_seconds.get(key, 0):.2f}",
            )
        )
    rows.append(("inside render calls s", "", f"{ours.render_seconds or 0:.1f}"))
    rows.append(("others' CPU use, cores", _cores(loop), _cores(ours)))
    rows.append(("batch sizes", "1", ours.batch_note))
    width = max(len(row[0]) for row in rows)
    print(f"{'':<{width}}  {loop.name:>14}  {ours.name:>16}")
    for name, theirs, mine in rows:
        print(f"{name:<{width}}  {theirs:>14}  {mine:>16}")
    print(
        f"ratio batchgen / loop: {result.ratio:.2f}×   "
        f"max pixel difference: {result.max_pixel_diff} levels"
    )
    for note in result.notes:
        print(f"note: {note}")
    busiest = _busiest(result)
    if busiest is not None and busiest > DISTURBED_CORES:
        print(
            f"warning: other processes kept {busiest:.2f} cores busy during a repeat shown: "
            "torch's threads then wait for each other and the figures are not representative"
        )


def _busiest(result: WorkloadResult) -> float | None:
    """The most cores other processes used during the repeats whose figures are shown."""
    known = [
        arm.other_cores for arm in (result.loop, result.batchgen) if arm.other_cores is not None
    ]
    return max(known) if known else None


def _cores(arm: ArmResult) -> str:
    return "?" if arm.other_cores is None else f"{arm.other_cores:.2f}"


def _each(arms: list[ArmResult]) -> str:
    return ", ".join(f"{arm.seconds:.1f}" for arm in arms)


def _peak(arms: list[ArmResult]) -> str:
    return megabytes(max(arm.peak_bytes for arm in arms))


@dataclass(frozen=True)
class Target:
    """One of issue 9's targets and this run's figure for it."""

    what: str
    measured: str
    met: bool


def check_targets(
    results: list[WorkloadResult], plan: PlanResult | None, profile: str, batch_size: BatchSize
) -> list[Target]:
    """Issue 9's and 18's targets that this run's workloads and profile speak to."""
    targets = []
    by_name = {result.workload.name: result for result in results}
    floors = (
        {"tiny64": 2.5, "tiny256": 1.2, "sd15": 1.0, "sdxl64": 2.5, "sd3_64": 2.5}
        if profile == "cpu"
        else {"sd15": 2.0, "sdxl": 2.0}
    )
    for name, floor in floors.items():
        if name in by_name and (batch_size == "auto" or name == "tiny64"):
            ratio = by_name[name].ratio
            targets.append(
                Target(f"{name}: batchgen ≥ {floor:g}× the loop", f"{ratio:.2f}×", ratio >= floor)
            )
    if profile == "cpu" and batch_size == "auto":
        for result in results:
            targets.append(
                Target(
                    f"{result.workload.name}: --batch-size auto ≥ 1.0× the loop",
                    f"{result.ratio:.2f}×",
                    result.ratio >= 1.0,
                )
            )
    if "sd15" in by_name:
        share = by_name["sd15"].batchgen.forward_share
        targets.append(
            Target("sd15: batchgen's forward share ≥ 85%", f"{share:.0%}", share >= 0.85)
        )
        if profile == "gpu":
            speed = by_name["sd15"].batchgen.images_per_second
            targets.append(Target("sd15: batchgen ≥ 4 images/s (H100)", f"{speed:.2f}", speed >= 4))
    if plan is not None:
        seconds = plan.cli_seconds[plan.jobs]
        targets.append(
            Target(f"`batchgen plan` on {plan.jobs:,} jobs < 1 s", f"{seconds:.2f} s", seconds < 1)
        )
        small, big = (plan.cli_peak_bytes[count] for count in sorted(plan.cli_peak_bytes))
        growth = big / small - 1
        targets.append(
            Target(
                "`batchgen plan` memory constant in the job count (≤ 5% growth, ×10 jobs)",
                f"+{growth:.0%}",
                growth <= 0.05,
            )
        )
    return targets


def print_summary(
    results: list[WorkloadResult], plan: PlanResult | None, targets: list[Target], memory_label: str
) -> None:
    """Markdown tables, for RESULTS.md."""
    print(
        "\n| workload | loop img/s | batchgen img/s | ratio | "
        f"{memory_label} loop / batchgen | max diff (levels) | forward share loop / batchgen | "
        "others' CPU, cores |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in results:
        loop, ours = result.loop, result.batchgen
        print(
            f"| {result.workload.name} | {loop.images_per_second:.3f} | "
            f"{ours.images_per_second:.3f} | {result.ratio:.2f}× | "
            f"{_peak(result.loops)} / {_peak(result.ours)} | "
            f"{result.max_pixel_diff} | {loop.forward_share:.0%} / {ours.forward_share:.0%} | "
            f"{_cores(loop)} / {_cores(ours)} |"
        )
    if plan:
        print(f"\n`make_plan` on {plan.jobs:,} jobs, in-process: {plan.make_plan_seconds:.2f} s")
        print("\n| `batchgen plan` | wall s | peak RSS |\n| --- | ---: | ---: |")
        for count in sorted(plan.cli_seconds):
            print(
                f"| {count:,} jobs | {plan.cli_seconds[count]:.2f} | "
                f"{megabytes(plan.cli_peak_bytes[count])} |"
            )
    if targets:
        print("\n| target | measured | |\n| --- | ---: | --- |")
        for target in targets:
            print(f"| {target.what} | {target.measured} | {'met' if target.met else 'MISSED'} |")


# ---------------------------------------------------------------------------------------------
# Command line


def parse_batch_size(text: str) -> BatchSize:
    if text == "auto":
        return "auto"
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"`{text}` is not auto or a whole number") from None
    if size < 1:
        raise argparse.ArgumentTypeError("a batch size is at least 1")
    return size


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The same img2img sweep as a plain diffusers loop and through batchgen.",
        epilog="example: python benchmarks/sweep.py --only tiny64,plan --batch-size 8",
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument(
        "--only",
        help="comma-separated workloads: tiny64, tiny256, sd15, sdxl64, sd3_64, plan, and sdxl "
        "on the gpu profile (default: all of the profile's)",
    )
    parser.add_argument("--batch-size", type=parse_batch_size, default="auto", help="auto or N")
    parser.add_argument(
        "--fast",
        action="append",
        default=[],
        choices=[fast.name for fast in fields(FastPaths)],
        help="a fast path for batchgen's arm (repeatable), as `batchgen run --fast`",
    )
    parser.add_argument("--device", help="default: cpu for --profile cpu, cuda for gpu")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both arms this many times, alternating, and keep each arm's fastest (default 1)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="keep outputs (and the random SD1.5 model, reused next time) here; "
        "default: a temporary folder, removed at the end",
    )
    args = parser.parse_args(argv)
    only = args.only or ",".join([*PROFILES[args.profile], "plan"])
    args.only = [name.strip() for name in only.split(",") if name.strip()]
    unknown = set(args.only) - {*PROFILES[args.profile], "plan"}
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        parser.error("--repeat is at least 1")
    args.device = args.device or PROFILE_DEVICE[args.profile]
    args.options = BatchgenOptions(args.batch_size, FastPaths(**dict.fromkeys(args.fast, True)))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU")
    return args


@contextlib.contextmanager
def work_folder(kept: Path | None) -> Iterator[Path]:
    if kept is not None:
        kept.mkdir(parents=True, exist_ok=True)
        yield kept.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="batchgen-bench-") as temporary:
        yield Path(temporary)


def quiet_libraries() -> None:
    """The tables are the output: no loading bars or info logs from diffusers/transformers."""
    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    dtype = PROFILE_DTYPE[args.profile]
    memory_label = PeakMemory(args.device).label()
    print(f"machine: {machine()}")
    print(
        f"profile {args.profile}: device {args.device}, {dtype}, "
        f"batchgen --batch-size {args.batch_size}"
        + "".join(f" --fast {name}" for name in args.fast)
    )
    results: list[WorkloadResult] = []
    plan = None
    with work_folder(args.work_dir) as work:
        # Model hashes for the work folder's paths go to a cache there, not the user's.
        os.environ["BATCHGEN_CACHE_DIR"] = str(work / "cache")
        for name in args.only:
            if name == "plan":
                print(f"\n== plan: `batchgen plan` on a {PLAN_JOBS:,}-job recipe", flush=True)
                plan = bench_plan(work, PLAN_JOBS)
                continue
            workload = PROFILES[args.profile][name]
            print(f"\n== {name}: {workload.describe()}, {dtype} on {args.device}", flush=True)
            result = run_workload(workload, work, args.device, dtype, args.options, args.repeat)
            print_workload(result, memory_label)
            results.append(result)
    targets = check_targets(results, plan, args.profile, args.options.batch_size)
    print_summary(results, plan, targets, memory_label)
    return 0


if __name__ == "__main__":
    sys.exit(main())
