"""The `batchgen` command end to end on builtin:tiny: exit codes, files written, rows, re-runs."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from batchgen import __version__
from batchgen.engine.images import prepare
from batchgen.jobs.job import InitImage
from batchgen.running.runner import BadInputError, run
from tests.helpers import (
    RECIPE,
    fail_batches_with,
    gradient,
    imported_modules,
    imports_torch,
    invoke,
    manifest,
    write_recipe,
)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    return write_recipe(tmp_path, RECIPE)


def test_version_and_help_with_examples() -> None:
    assert invoke("--version") == (0, f"batchgen, version {__version__}\n")
    for command in ("run", "plan", "validate", "schema", "models", "schedulers", "report", "grid"):
        code, output = invoke(command, "--help")
        assert code == 0 and "Example:" in output


def test_run_writes_images_manifest_lock_and_log(recipe: Path) -> None:
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    run_dir = recipe.parent / "out"
    rows = manifest(run_dir)
    assert [row["status"] for row in rows] == ["done"] * 4
    assert {row["device"] for row in rows} == {f"cpu ({torch.get_num_threads()} threads)"}
    assert [(row["prompt"], row["strength"], row["steps_taken"]) for row in rows] == [
        ("fire", "0.0", "0"),
        ("fire", "0.5", "2"),
        ("cheery open fire, photograph", "0.0", "0"),
        ("cheery open fire, photograph", "0.5", "2"),
    ]
    for row in rows:
        image = run_dir / row["path"]
        assert image.name.startswith(f"000{row['index']}-gradient-")
        with Image.open(image) as png:
            assert png.size == (64, 48)
            assert "Seed: 7, Size: 64x48" in png.text["parameters"]
            assert json.loads(png.text["batchgen"])["id"] == row["id"]
    lock = yaml.safe_load((run_dir / "recipe.lock.yaml").read_text())
    assert lock["strength"] == [0.0, 0.5] and lock["init_images"][0]["path"] == (
        "pictures/gradient.png"
    )
    log = (run_dir / "run.log").read_text()
    assert "[4/4] job " in log and "4 made, 0 failed" in log
    assert "[1/4] job 1 images/0001-gradient-fire-f0.00-s4-S7.png" in output  # not a TTY: lines
    assert (run_dir / "grids" / "strength-x-prompt.png").is_file()
    report = (run_dir / "report.html").read_text()
    assert f"report → {run_dir / 'report.html'}" in output
    assert all(row["path"] in report for row in rows)


def test_strength_zero_keeps_the_init_image_as_prepared(recipe: Path) -> None:
    invoke("run", str(recipe))
    run_dir = recipe.parent / "out"
    row = manifest(run_dir)[0]
    assert row["strength"] == "0.0"
    init = prepare(recipe.parent / "pictures" / "gradient.png", (64, 48)).rgb
    with Image.open(run_dir / row["path"]) as made:
        assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(init))


def test_rerun_redoes_nothing_and_a_fresh_run_is_bit_identical(recipe: Path, tmp_path: Path):
    invoke("run", str(recipe))
    run_dir = recipe.parent / "out"
    before = {p.name: p.read_bytes() for p in (run_dir / "images").iterdir()}
    code, output = invoke("run", str(recipe))
    assert code == 0 and "nothing to do: all 4 jobs are done" in output
    assert len(manifest(run_dir)) == 4
    code, _ = invoke("run", str(recipe), "--output", str(tmp_path / "again"))
    assert code == 0
    again = {p.name: p.read_bytes() for p in (tmp_path / "again" / "images").iterdir()}
    assert again == before


def test_a_failing_job_is_recorded_and_the_run_goes_on(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patched:
        fail_batches_with(patched, 2, "CUDA out of memory (simulated)")
        code, output = invoke("run", str(recipe), "--batch-size", "1")
    assert code == 1
    rows = manifest(recipe.parent / "out")
    assert [row["status"] for row in rows] == ["done", "failed", "done", "done"]
    assert rows[1]["error"] == "RuntimeError: CUDA out of memory (simulated)"
    assert "FAILED" in output

    code, output = invoke("run", str(recipe))  # the failed job is retried, the rest kept
    assert code == 0 and "1 made, 0 failed, 3 already done" in output


def test_a_failing_batch_fails_each_of_its_jobs(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_batches_with(monkeypatch, 2, "CUDA out of memory (simulated)")
    code, _ = invoke("run", str(recipe), "--batch-size", "2")
    assert code == 1
    statuses = [(row["strength"], row["status"]) for row in manifest(recipe.parent / "out")]
    assert statuses == [("0.0", "done"), ("0.5", "failed"), ("0.0", "done"), ("0.5", "failed")]


def test_a_batch_that_runs_out_of_gpu_memory_is_split_and_the_size_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchgen.engine.img2img import Engine

    recipe = write_recipe(
        tmp_path,
        "init_images: [pictures/gradient.png]\nprompts: [a, b]\nstrength: [0.5, 0.75]\n"
        "steps: 4\nseeds: [1, 2]\n",
    )
    real_render_batch = Engine.render_batch
    tried: list[int] = []

    def render_batch(self, jobs, inits, on_step=None):  # type: ignore[no-untyped-def]
        tried.append(len(jobs))
        # A retry inside the `except` that caught the error would hold the failed attempt's
        # tensors through its traceback: none of these calls may see an exception in flight.
        assert sys.exc_info() == (None, None, None)
        if len(jobs) > 2:  # what this "GPU" holds
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_render_batch(self, jobs, inits, on_step)

    monkeypatch.setattr(Engine, "render_batch", render_batch)
    code, output = invoke("run", str(recipe), "--batch-size", "4")

    assert code == 0, output
    assert "a batch of 4 at 64x48 ran out of GPU memory: batches of 2 from now on" in output
    # Two batches of 4 (one per strength): the first runs out and is split; the second is
    # split before it is tried.
    assert tried == [4, 2, 2, 2, 2]
    rows = manifest(tmp_path / "out")
    assert [(row["status"], row["batch_size"]) for row in rows] == [("done", "2")] * 8


def test_an_init_image_unreadable_at_run_time_fails_its_jobs_and_the_run_goes_on(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchgen.running import render

    def unreadable(image: InitImage, size: tuple[int, int]) -> None:
        raise OSError(f"cannot read {image.path.name} (simulated)")

    monkeypatch.setattr(render, "prepared", unreadable)
    code, output = invoke("run", str(recipe), "--batch-size", "1")

    assert code == 1, output
    rows = manifest(recipe.parent / "out")
    assert [row["status"] for row in rows] == ["failed"] * 4
    assert "cannot read gradient.png (simulated)" in rows[0]["error"]


def test_fail_fast_stops_at_the_first_failure(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_batches_with(monkeypatch, 1, "broken")
    code, output = invoke("run", str(recipe), "--fail-fast", "--batch-size", "1")
    assert code == 1 and "--fail-fast" in output
    assert len(manifest(recipe.parent / "out")) == 1


def test_bad_input_exits_2_before_loading_a_model(recipe: Path) -> None:
    recipe.write_text(recipe.read_text().replace("steps: 4", "stepz: 4"))
    for command in ("run", "plan", "validate"):
        code, output = invoke(command, str(recipe))
        assert code == 2
        assert f"{recipe}:6: stepz: unknown key" in output and "did you mean `steps`?" in output
    assert not (recipe.parent / "out").exists()


def test_unknown_device_is_bad_input(recipe: Path) -> None:
    code, output = invoke("run", str(recipe), "--device", "tpu")
    assert code == 2 and "tpu" in output


def test_missing_recipe_file_is_bad_input(tmp_path: Path) -> None:
    code, output = invoke("validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and "no such recipe file" in output


def test_plan_counts_done_and_to_do_and_steps_taken(recipe: Path) -> None:
    code, output = invoke("plan", str(recipe))
    assert code == 0
    assert "4 jobs: 0 done, 0 failed, 4 to do; 4 denoising steps to run" in output
    assert "fixed: model tiny · init pictures/gradient.png · steps 4" in output
    invoke("run", str(recipe))
    code, output = invoke("plan", str(recipe))
    assert "4 jobs: 4 done, 0 failed, 0 to do; 0 denoising steps" in output


def test_small_init_image_warning_is_printed_once_per_image(recipe: Path) -> None:
    code, output = invoke("run", str(recipe))
    assert output.count("does not work properly below 512x512") == 1


def test_schema_is_json_for_editors() -> None:
    code, output = invoke("schema")
    assert code == 0 and json.loads(output)["title"] == "batchgen recipe"


def test_validate_does_not_import_torch(recipe: Path) -> None:
    assert not imports_torch("validate", str(recipe))


def test_a_run_with_nothing_to_do_answers_without_torch(recipe: Path) -> None:
    """A cron job re-running a finished sweep: no model, no torch, and the same answer."""
    assert invoke("run", str(recipe))[0] == 0
    assert not imports_torch("run", str(recipe))
    code, output = invoke("run", str(recipe))
    assert code == 0 and "nothing to do: all 4 jobs are done" in output
    # With work, torch loads, and of diffusers only what the SD family uses: its UNet, VAE
    # and schedulers, none of its pipelines.
    modules = imported_modules("run", str(recipe), "--redo", "all")
    assert {"torch", "diffusers.models.unets.unet_2d_condition"} <= modules
    assert not [name for name in modules if name.startswith("diffusers.pipelines")]


def test_a_device_name_batchgen_does_not_know_is_bad_input_with_nothing_to_do(
    recipe: Path,
) -> None:
    assert invoke("run", str(recipe))[0] == 0
    code, output = invoke("run", str(recipe), "--device", "gpu")
    assert code == 2 and "unknown device `gpu`" in output


def test_sigint_stops_after_the_current_batch_and_a_rerun_finishes(tmp_path: Path) -> None:
    (tmp_path / "pictures").mkdir()
    gradient(tmp_path / "pictures" / "gradient.png")
    recipe = tmp_path / "many.yaml"
    recipe.write_text(
        RECIPE.replace("seeds: [7]", "seeds: {start: 1, count: 10}").replace("[0.0, 0.5]", "0.75")
    )
    command = [sys.executable, "-m", "batchgen", "run", str(recipe), "-o", str(tmp_path / "o")]
    command += ["--batch-size", "4"]  # five batches: the signal lands before the last
    process = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        if line.startswith("[1/20]"):
            process.send_signal(signal.SIGINT)
            break
    output = process.stdout.read()
    assert process.wait(timeout=120) == 130
    assert "run the same command again to finish the rest" in output
    made = len(manifest(tmp_path / "o"))
    assert 1 <= made < 20
    assert not [p for p in (tmp_path / "o" / "images").iterdir() if p.suffix != ".png"]
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert finished.returncode == 0
    assert f"{20 - made} made, 0 failed, {made} already done" in finished.stdout
    rows = manifest(tmp_path / "o")
    assert len(rows) == 20 and len({row["id"] for row in rows}) == 20


def test_run_is_importable_as_a_library(recipe: Path) -> None:
    import batchgen

    result = batchgen.run(recipe, quiet=True)
    assert (result.made, result.failed, result.exit_code) == (4, 0, 0)


def test_schedulers_and_models_list_what_a_recipe_can_name() -> None:
    code, output = invoke("schedulers")
    assert code == 0 and "k_lms" in output and "LMSDiscreteScheduler" in output
    assert "UniPCMultistepScheduler" in output
    code, output = invoke("models")
    assert code == 0 and "builtin:tiny" in output and "hub cache searched" in output


def test_a_model_sweep_loads_each_model_once_as_the_outermost_loop(recipe: Path) -> None:
    from batchgen.models.source import resolve_model

    other = recipe.parent / "other-model"
    shutil.copytree(resolve_model("builtin:tiny", recipe.parent).path, other)
    config = other / "unet" / "config.json"
    config.write_text(config.read_text().replace('"norm_eps": 1e-05', '"norm_eps": 0.001'))
    recipe.write_text(recipe.read_text() + "model: [builtin:tiny, ./other-model]\n")

    code, output = invoke("run", str(recipe))
    assert code == 0, output
    rows = manifest(recipe.parent / "out")
    models = [row["model"] for row in rows]
    assert len(rows) == 8 and models[:4] == [models[0]] * 4 and models[4:] == [models[4]] * 4
    assert models[0].startswith("builtin:tiny@") and models[4].startswith("folder:")
    assert output.count("model tiny loaded") == 1 and output.count("model other-model loaded") == 1
    with Image.open(recipe.parent / "out" / rows[5]["path"]) as png:
        assert "Model: other-model" in png.text["parameters"]


def test_report_command_rewrites_the_page_and_refuses_a_folder_that_is_no_run(
    recipe: Path, tmp_path: Path
) -> None:
    invoke("run", str(recipe))
    page = recipe.parent / "out" / "report.html"
    page.unlink()
    assert invoke("report", str(recipe.parent / "out")) == (0, f"{page}\n")
    assert page.is_file()
    code, output = invoke("report", str(tmp_path / "nothing-here"))
    assert code == 2 and "nothing-here" in output


def test_a_prompt_with_a_line_break_gets_its_grid_and_report(tmp_path: Path) -> None:
    pasted = '[fire, "a cheery open fire\\nsecond line, photograph", "火 🔥 огонь"]'
    recipe = write_recipe(
        tmp_path, RECIPE.replace('[fire, "cheery open fire, photograph"]', pasted)
    )
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    assert (tmp_path / "out" / "grids" / "strength-x-prompt.png").is_file()
    assert (tmp_path / "out" / "report.html").is_file()


def test_a_view_that_fails_warns_and_leaves_the_finished_run_a_success(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(run_dir: Path) -> None:
        raise RuntimeError("raqm_layout() failed.")

    monkeypatch.setattr("batchgen.running.runner.make_run_grids", broken)
    monkeypatch.setattr("batchgen.running.runner.write_report", broken)
    code, output = invoke("run", str(recipe))
    assert code == 0
    assert "grids not drawn: RuntimeError: raqm_layout() failed." in output
    assert "report.html not written: RuntimeError" in output
    assert len(list((recipe.parent / "out" / "images").glob("*.png"))) == 4


def test_grid_command_draws_any_grid_after_the_fact(recipe: Path) -> None:
    invoke("run", str(recipe))
    run_dir = recipe.parent / "out"
    code, output = invoke("grid", str(run_dir), "--x", "prompt", "--where", "strength=0.5")
    assert code == 0 and "wrote" in output
    with Image.open(run_dir / "grids" / "prompt-strength-0.5.png") as grid:
        shown = json.loads(grid.text["batchgen-grid"])["jobs"]
    rows = manifest(run_dir)
    assert shown == [row["id"] for row in rows if row["strength"] == "0.5"]
    code, output = invoke("grid", str(run_dir), "--x", "colour")
    assert code == 2 and "--x: Input should be 'model', 'init_image'" in output


def test_intermediates_save_a_strip_per_job_that_takes_steps(recipe: Path) -> None:
    recipe.write_text(recipe.read_text() + "intermediates: {mode: exact, x0: true}\n")
    code, output = invoke("run", str(recipe))
    assert code == 0, output
    rows = manifest(recipe.parent / "out")
    strips = recipe.parent / "out" / "intermediates"
    for row in rows:
        strip = strips / Path(row["path"]).name
        if row["steps_taken"] == "0":
            assert not strip.exists()  # strength 0: nothing was denoised
            continue
        with Image.open(strip) as picture:
            chunk = json.loads(picture.text["batchgen-intermediates"])
        assert chunk["job_id"] == row["id"] and "exact" in chunk["note"]
        assert len(chunk["steps"]) == int(row["steps_taken"]) + 1  # the start, then each step


def test_a_model_sweep_grids_every_job_of_every_model(recipe: Path) -> None:
    from batchgen.models.source import resolve_model

    other = recipe.parent / "other-model"
    shutil.copytree(resolve_model("builtin:tiny", recipe.parent).path, other)
    (other / "unet" / "extra.txt").write_text("another model")  # another identity
    recipe.write_text(recipe.read_text() + "model: [builtin:tiny, ./other-model]\n")
    assert invoke("run", str(recipe))[0] == 0
    shown: list[str] = []
    for grid in (recipe.parent / "out" / "grids").glob("*.png"):
        with Image.open(grid) as picture:
            shown += json.loads(picture.text["batchgen-grid"])["jobs"]
    # model is an axis like the others: no cell holds two models' images
    assert sorted(shown) == sorted(row["id"] for row in manifest(recipe.parent / "out"))
    code, output = invoke("grid", str(recipe.parent / "out"), "--x", "model", "--y", "prompt")
    assert code == 0, output
    with Image.open(recipe.parent / "out" / "grids" / "model-x-prompt-strength-0.5.png") as grid:
        assert json.loads(grid.text["batchgen-grid"])["fixed"]["strength"] == 0.5
    code, output = invoke(
        "grid", str(recipe.parent / "out"), "--x", "prompt", "--where", "model=./other-model"
    )
    assert code == 0 and "prompt" in output


def test_png_compression_changes_file_sizes_not_pixels(recipe: Path, tmp_path: Path) -> None:
    assert invoke("run", str(recipe))[0] == 0
    code, output = invoke(
        "run", str(recipe), "--output", str(tmp_path / "packed"), "--png-compression", "9"
    )
    assert code == 0, output
    for fast, packed in zip(
        manifest(recipe.parent / "out"), manifest(tmp_path / "packed"), strict=True
    ):
        assert fast["id"] == packed["id"]
        fast_bytes = (recipe.parent / "out" / fast["path"]).read_bytes()
        packed_bytes = (tmp_path / "packed" / packed["path"]).read_bytes()
        assert len(packed_bytes) < len(fast_bytes)
        pixels = [np.asarray(Image.open(io.BytesIO(data))) for data in (fast_bytes, packed_bytes)]
        assert np.array_equal(*pixels)

    code, output = invoke("run", str(recipe), "--png-compression", "10")
    assert code == 2 and "--png-compression" in output
    with pytest.raises(BadInputError, match="not a zlib level"):
        run(recipe, png_compression=10)  # the library checks too


def test_a_compile_that_cannot_work_here_stops_the_run_with_what_to_do(
    recipe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As on a CPU box without a C++ compiler: every batch would fail compiling after
    tracing the UNet again, so the run stops at the first (exit 2) and fails no job."""

    def no_compiler(graph: object, example_inputs: object) -> None:
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found (simulated)")

    real_compile = torch.compile
    monkeypatch.setattr(
        torch,
        "compile",
        lambda model, **options: real_compile(model, backend=no_compiler, **options),
    )
    code, output = invoke("run", str(recipe), "--fast", "compile")

    assert code == 2, output
    assert "--fast compile cannot compile the UNet here" in output
    assert "No working C++ compiler found (simulated)" in output
    assert "run without --fast compile" in output
    rows = manifest(recipe.parent / "out")
    # The strength-0 batch came first and needs no UNet: its images are kept.
    assert [(row["strength"], row["status"]) for row in rows] == [("0.0", "done")] * 2
    assert invoke("run", str(recipe))[0] == 0  # without it, the same command finishes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_run_reports_its_peak_gpu_memory(recipe: Path) -> None:
    code, output = invoke("run", str(recipe), "--device", "cuda")
    assert code == 0, output
    assert "peak GPU memory" in output and " GB → " in output


def test_offload_on_the_cpu_stops_the_run_before_any_job_with_what_to_do(recipe: Path) -> None:
    code, output = invoke("run", str(recipe), "--device", "cpu", "--fast", "offload")
    assert code == 2, output
    assert "--fast offload keeps the models in CPU memory" in output
    assert "run without it" in output
    assert not (recipe.parent / "out" / "manifest.csv").exists()  # no job made, none failed


def test_fast_paths_are_opt_in_recorded_and_change_pixels_within_a_level(
    recipe: Path, tmp_path: Path
) -> None:
    assert invoke("run", str(recipe))[0] == 0
    fast = ("--fast", "channels_last", "--fast", "vae_slicing", "--fast", "vae_tiling")
    code, output = invoke("run", str(recipe), "--output", str(tmp_path / "fast"), *fast)
    assert code == 0, output
    assert "(float32, channels_last,vae_tiling,vae_slicing)" in output
    plain, fast_rows = manifest(recipe.parent / "out"), manifest(tmp_path / "fast")
    assert {row["fast_paths"] for row in plain} == {""}
    assert {row["fast_paths"] for row in fast_rows} == {"channels_last,vae_tiling,vae_slicing"}
    for before, after in zip(plain, fast_rows, strict=True):
        assert before["id"] == after["id"]  # the same jobs: fast paths are not part of an id
        first = np.asarray(Image.open(recipe.parent / "out" / before["path"]), np.int16)
        second = np.asarray(Image.open(tmp_path / "fast" / after["path"]), np.int16)
        assert np.abs(first - second).max() <= 1
