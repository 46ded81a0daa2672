"""Comparison grids: drawn from a run folder's manifest, labelled, re-made only when their
cells change. The run folders here are made by hand (small solid-colour PNGs and manifest
rows), so no model is needed."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from batchgen.jobs.job import InitImage, Job
from batchgen.recipe.load import load_recipe
from batchgen.recipe.problems import RecipeError
from batchgen.recipe.schema import GridSpec
from batchgen.store.files import write_lock_file
from batchgen.store.manifest import Manifest, ManifestRow, NotARunFolderError
from batchgen.views import grid, grid_layout, grid_plan
from batchgen.views.grid import (
    BACKGROUND,
    PLACEHOLDER_FILL,
    GridError,
    GridResult,
    default_specs,
    make_grids,
    parse_where,
    spec_from_options,
)

DATA = Path(__file__).parent / "data"
SIZE = 64  # the images' side: the default cell size for them
INIT_COLOUR = (0, 120, 255)
PROMPTS = ("fire", "cheery open fire, photograph")
STRENGTHS = (0.4, 0.7)


def colour(index: int) -> tuple[int, int, int]:
    """A colour per job, far from the background, the placeholder grey and the init's."""
    return (200 - 37 * (index % 5), 40 + 50 * (index % 3), 30 + 23 * (index % 7))


class Run:
    """A run folder as batchgen leaves it: images/, manifest.csv, recipe.lock.yaml, with the
    init image beside a recipe file."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder / "run"
        self.recipe_dir = folder / "recipe"
        init_file = self.recipe_dir / "pictures" / "fire-drawing.png"
        init_file.parent.mkdir(parents=True)
        Image.new("RGB", (SIZE, SIZE), INIT_COLOUR).save(init_file)
        self.init = InitImage(
            path=init_file,
            label="pictures/fire-drawing.png",
            sha256=hashlib.sha256(init_file.read_bytes()).hexdigest(),
            width=SIZE,
            height=SIZE,
        )
        write_lock_file(self.dir, {"recipe": str(self.recipe_dir / "recipe.yaml")})
        self.manifest = Manifest(self.dir)
        self.jobs: list[Job] = []

    def job(self, **values: Any) -> Job:
        fields: dict[str, Any] = {
            "index": len(self.jobs) + 1,
            "init_image": self.init,
            "prompt": "fire",
            "negative_prompt": "",
            "strength": 0.4,
            "steps": 10,
            "steps_mode": "nominal",
            "cfg": 7.5,
            "seed": 1592514025,
            "scheduler": "k_lms",
            "width": SIZE,
            "height": SIZE,
            "fit": False,
            "model": "builtin:tiny@0123456789abcdef",
            "dtype": "float32",
        }
        job = Job(**(fields | values))
        self.jobs.append(job)
        return job

    def finish(self, job: Job, fill: tuple[int, int, int] | None = None) -> ManifestRow:
        """Write the job's image (a solid colour) and its manifest row."""
        path = f"images/{job.index:04d}.png"
        (self.dir / "images").mkdir(exist_ok=True)
        Image.new("RGB", (job.width, job.height), fill or colour(job.index)).save(self.dir / path)
        data = (self.dir / path).read_bytes()
        return self._append(job, "done", path, hashlib.sha256(data).hexdigest(), "")

    def fail(self, job: Job, error: str = "RuntimeError: CUDA out of memory") -> ManifestRow:
        return self._append(job, "failed", "", "", error)

    def _append(self, job: Job, status: Any, path: str, sha256: str, error: str) -> ManifestRow:
        row = ManifestRow.from_job(
            job,
            status=status,
            path=path,
            model_hash="0123456789",
            device="cpu",
            seconds=1.0,
            sha256=sha256,
            error=error,
        )
        self.manifest.append(row)
        return row

    def sweep(self, **axes: tuple[Any, ...]) -> list[Job]:
        """Every combination of `axes` (the first one outermost), all finished."""
        names = list(axes)
        jobs = [self.job(**dict(zip(names, values, strict=True))) for values in _product(axes)]
        for job in jobs:
            self.finish(job)
        return jobs


def _product(axes: dict[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return list(itertools.product(*axes.values()))


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return Run(tmp_path)


def spec(**fields: Any) -> GridSpec:
    return GridSpec.model_validate(fields)


def record(result: GridResult) -> dict[str, Any]:
    with Image.open(result.path) as image:
        return json.loads(image.info[grid.TEXT_CHUNK])


def picture(result: GridResult) -> Image.Image:
    with Image.open(result.path) as image:
        return image.convert("RGB")


def boxes(result: GridResult) -> list[tuple[int, int, int, int]]:
    return [tuple(box) for box in record(result)["boxes"]]  # type: ignore[misc]


def centre(box: tuple[int, int, int, int]) -> tuple[int, int]:
    left, top, width, height = box
    return left + width // 2, top + height // 2


def pixels(image: Image.Image, area: tuple[int, int, int, int]) -> np.ndarray:
    """The pixels of `area` (left, top, right, bottom), one RGB triple each."""
    return np.asarray(image.crop(area)).reshape(-1, 3)


def ink(image: Image.Image, area: tuple[int, int, int, int]) -> int:
    """How many pixels of `area` are not background."""
    return int((pixels(image, area) != BACKGROUND).any(axis=1).sum())


def ink_bbox(image: Image.Image, area: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The bounding box, in image coordinates, of the non-background pixels of `area`."""
    left, top, _, _ = area
    rows, columns = np.nonzero((np.asarray(image.crop(area)) != BACKGROUND).any(axis=2))
    assert rows.size, f"no ink in {area}"
    return left + columns.min(), top + rows.min(), left + columns.max() + 1, top + rows.max() + 1


# --- layout and contents ---------------------------------------------------------------------


def test_grid_has_one_cell_per_job_laid_out_under_the_label_strips(run: Run) -> None:
    jobs = run.sweep(prompt=PROMPTS, strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", margin=5)])

    assert result.path == run.dir / "grids" / "strength-x-prompt.png"
    assert result.written and result.note == ""
    assert result.jobs == tuple(job.id for job in jobs)  # row by row, as the recipe orders them
    cells = boxes(result)
    assert len(cells) == 4
    assert {(width, height) for _, _, width, height in cells} == {(SIZE, SIZE)}
    (left, top, _, _), (right_left, _, _, _), (_, below_top, _, _), _ = cells
    assert right_left - left == SIZE + 5 and below_top - top == SIZE + 5
    row_labels = left - 2 * 5
    assert row_labels > 0  # margin, row-label strip, margin, then the cells
    image = picture(result)
    assert image.size == (5 + row_labels + 5 + 2 * (SIZE + 5), top + 2 * (SIZE + 5))
    assert top > 5  # the title and the column labels are above the first row
    for job, box in zip(jobs, cells, strict=True):
        assert image.getpixel(centre(box)) == colour(job.index)
    assert result.fixed == {
        "model": "builtin:tiny@0123456789abcdef",
        "init_image": "pictures/fire-drawing.png",
        "steps": 10,
        "cfg": 7.5,
        "seed": 1592514025,
        "scheduler": "k_lms",
    }


def test_labels_are_drawn_in_their_strips_and_nowhere_else(run: Run) -> None:
    run.sweep(prompt=PROMPTS, strength=STRENGTHS)
    margin = 4

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", margin=margin)])

    image = picture(result)
    cells = boxes(result)
    left, top = cells[0][0], cells[0][1]
    column_strip_top = top - margin - 30
    for box in cells[:2]:  # column labels: in the strip above their column, centred on it
        label = ink_bbox(image, (box[0] - 1, column_strip_top, box[0] + SIZE + 1, top - margin))
        assert abs((label[0] + label[2]) / 2 - centre(box)[0]) <= 2
    for box in cells[::2]:  # row labels: in the strip left of their row
        label = ink_bbox(image, (margin, box[1], left - margin, box[1] + SIZE))
        assert abs((label[1] + label[3]) / 2 - centre(box)[1]) <= 4
    # Nothing in the corner above the row labels, in the margins, or right of the cells.
    assert ink(image, (0, column_strip_top, left - margin, top)) == 0
    assert ink(image, (left - margin, top, left, image.height)) == 0
    assert ink(image, (left + SIZE, top, left + SIZE + margin, image.height)) == 0
    assert ink(image, (0, image.height - margin, image.width, image.height)) == 0
    # The title says what is fixed: ink across the top, above the column labels.
    assert ink(image, (0, 0, image.width, column_strip_top)) > 0


def test_a_long_prompt_is_wrapped_and_shrunk_inside_its_row_label(run: Run) -> None:
    long_prompt = "a cheery open fire in a stone fireplace, " * 6 + "photograph, 35mm, f/1.8"
    run.sweep(prompt=("fire", long_prompt), strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", margin=4)])

    image = picture(result)
    first, _, second, _ = boxes(result)
    label = ink_bbox(image, (4, second[1], first[0] - 4, second[1] + SIZE))
    assert label[2] - label[0] > (first[0] - 8) // 2  # several words a line
    assert label[3] - label[1] > 30  # several lines
    assert ink(image, (first[0] - 4, first[1], first[0], image.height)) == 0  # none spills


PASTED_PROMPTS = (
    "a cheery open fire\nsecond line, photograph",  # pasted from A1111 with a line break
    'tabs\tand "quotes" and a control \x07 character',
    "огонь в камине, φωτιά, 暖炉の火 🔥 " * 8,  # long, non-Latin, an emoji
)


@pytest.mark.parametrize("axis", ["x", "y", "z"])
def test_labels_take_any_prompt_text(run: Run, axis: str) -> None:
    run.sweep(prompt=PASTED_PROMPTS, strength=STRENGTHS)
    others = {"x": "strength", "y": "strength", "z": "strength"}
    layout = {axis: "prompt", ("y" if axis == "x" else "x"): others[axis]}

    [result] = make_grids(run.dir, [spec(**layout, margin=4)])

    image = picture(result)
    cells = boxes(result)
    assert len(cells) == 6
    assert image.getpixel(centre(cells[0])) == colour(1)
    assert grid_plan._format(PASTED_PROMPTS[0]) == "a cheery open fire second line, photograph"
    assert grid_plan._format(PASTED_PROMPTS[1]) == 'tabs and "quotes" and a control □ character'


def test_a_prompt_on_x_is_wrapped_in_the_column_label(run: Run) -> None:
    run.sweep(strength=STRENGTHS, prompt=PROMPTS)

    [result] = make_grids(run.dir, [spec(x="prompt", y="strength", cell=128, margin=4)])

    image = picture(result)
    cells = boxes(result)
    for box in cells[:2]:
        label = ink_bbox(image, (box[0] - 2, 0, box[0] + box[2] + 2, box[1] - 4))
        assert label[0] >= box[0] - 2 and label[2] <= box[0] + box[2] + 2
    assert image.getpixel(centre(cells[1])) == colour(2)


def test_failed_missing_and_unmade_jobs_are_labelled_placeholders(run: Run) -> None:
    fire_weak, fire_strong, cheery_weak, cheery_strong = [
        run.job(prompt=p, strength=s) for p in PROMPTS for s in STRENGTHS
    ]
    run.finish(fire_weak)
    run.fail(fire_strong)
    run.finish(cheery_weak)
    (run.dir / "images" / f"{cheery_weak.index:04d}.png").unlink()  # deleted by hand
    # cheery_strong is not made yet: the run was interrupted.

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt")])

    assert result.jobs == (fire_weak.id, fire_strong.id, cheery_weak.id, None)
    image = picture(result)
    first, *placeholders = boxes(result)
    assert image.getpixel(centre(first)) == colour(fire_weak.index)
    for box in placeholders:
        left, top, width, height = box
        assert image.getpixel((left + 2, top + 2)) == PLACEHOLDER_FILL
        inside = pixels(image, (left + 1, top + 1, left + width - 1, top + height - 1))
        assert (inside != PLACEHOLDER_FILL).any()  # its text
    left, top, width, height = placeholders[0]
    failed = pixels(image, (left, top, left + width, top + height)).astype(int)
    assert ((failed[:, 0] > 120) & (failed[:, 1] < 80)).any()  # "failed: …" in red


def test_where_keeps_only_the_matching_jobs(run: Run) -> None:
    jobs = run.sweep(seed=(1, 2), prompt=PROMPTS, strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", where={"seed": 2})])

    assert result.path.name == "strength-x-prompt-seed-2.png"
    assert result.jobs == tuple(job.id for job in jobs if job.seed == 2)
    assert result.fixed["seed"] == 2
    [only] = make_grids(run.dir, [spec(x="strength", where={"seed": 1, "prompt": "fire"})])
    assert only.jobs == (jobs[0].id, jobs[1].id)
    assert len(boxes(only)) == 2


def test_where_that_matches_nothing_says_what_the_run_has(run: Run) -> None:
    run.sweep(strength=STRENGTHS)

    with pytest.raises(GridError, match=r"no job in the run has seed \[7\] \(it has: 1592514025\)"):
        make_grids(run.dir, [spec(x="strength", where={"seed": 7})])


def test_one_grid_per_combination_of_the_other_swept_axes(run: Run) -> None:
    jobs = run.sweep(seed=(1, 2), cfg=(5.0, 7.5), prompt=PROMPTS, strength=STRENGTHS)

    results = make_grids(run.dir, [spec(x="strength", y="prompt")])

    assert [result.path.name for result in results] == [
        "strength-x-prompt-cfg-5.0-seed-1.png",
        "strength-x-prompt-cfg-7.5-seed-1.png",
        "strength-x-prompt-cfg-5.0-seed-2.png",
        "strength-x-prompt-cfg-7.5-seed-2.png",
    ]
    shown = [job for result in results for job in result.jobs if job is not None]
    assert sorted(shown) == sorted(job.id for job in jobs)  # each job in exactly one grid
    assert [(r.fixed["seed"], r.fixed["cfg"]) for r in results] == [
        (1, 5.0),
        (1, 7.5),
        (2, 5.0),
        (2, 7.5),
    ]


def test_z_axis_draws_one_sub_grid_per_value_in_one_picture(run: Run) -> None:
    jobs = run.sweep(seed=(1, 2), prompt=PROMPTS, strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", z="seed")])

    assert result.path.name == "strength-x-prompt-by-seed.png"
    assert result.jobs == tuple(job.id for job in jobs)
    cells = boxes(result)
    first_grid, second_grid = cells[:4], cells[4:]
    assert all(a[0] + a[2] < b[0] for a, b in zip(first_grid, second_grid, strict=True))
    image = picture(result)
    for job, box in zip(jobs, cells, strict=True):
        assert image.getpixel(centre(box)) == colour(job.index)
    assert record(result)["axes"] == {"x": [0.4, 0.7], "y": list(PROMPTS), "z": [1, 2]}


def test_show_init_adds_a_first_column_with_the_init_image(run: Run) -> None:
    run.sweep(prompt=PROMPTS, strength=STRENGTHS)
    [plain] = make_grids(run.dir, [spec(x="strength", y="prompt", name="plain")])

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", show_init=True)])

    image = picture(result)
    assert image.width == picture(plain).width + SIZE + 4
    assert len(boxes(result)) == 4  # the jobs' cells; the init column is not a job
    first_job = boxes(result)[0]
    for row_top in (first_job[1], first_job[1] + SIZE + 4):
        init_centre = (first_job[0] - 4 - SIZE // 2, row_top + SIZE // 2)
        assert image.getpixel(init_centre) == INIT_COLOUR


def test_show_init_with_init_images_across_adds_a_first_row(run: Run, tmp_path: Path) -> None:
    other_file = run.recipe_dir / "pictures" / "sketch.png"
    Image.new("RGB", (SIZE, SIZE), (250, 200, 0)).save(other_file)
    other = InitImage(
        other_file,
        "pictures/sketch.png",
        hashlib.sha256(other_file.read_bytes()).hexdigest(),
        SIZE,
        SIZE,
    )
    run.sweep(init_image=(run.init, other), strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="init_image", y="strength", show_init=True)])

    image = picture(result)
    first, second = boxes(result)[:2]
    assert image.getpixel((centre(first)[0], first[1] - 4 - SIZE // 2)) == INIT_COLOUR
    assert image.getpixel((centre(second)[0], second[1] - 4 - SIZE // 2)) == (250, 200, 0)


def test_show_init_without_the_lock_file_draws_a_placeholder(run: Run) -> None:
    run.sweep(strength=STRENGTHS)
    (run.dir / "recipe.lock.yaml").unlink()

    [result] = make_grids(run.dir, [spec(x="strength", show_init=True)])

    first = boxes(result)[0]
    assert picture(result).getpixel((first[0] - 4 - SIZE + 2, first[1] + 2)) == PLACEHOLDER_FILL


def test_grids_work_on_merged_shard_ledgers(run: Run) -> None:
    jobs = [run.job(strength=s) for s in STRENGTHS]
    shard = Manifest(run.dir, "shard-2-of-2.csv")
    run.finish(jobs[0])
    run.manifest = shard
    run.finish(jobs[1])

    [result] = make_grids(run.dir, [spec(x="strength")])

    assert result.jobs == (jobs[0].id, jobs[1].id)


def test_a_folder_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        NotARunFolderError, match="is not a batchgen run folder: it has no manifest"
    ):
        make_grids(tmp_path, [spec(x="seed")])


def test_two_grids_writing_one_file_are_refused(run: Run) -> None:
    run.sweep(strength=STRENGTHS)

    with pytest.raises(GridError, match="grids 1 and 2 would both write"):
        make_grids(run.dir, [spec(x="strength"), spec(x="strength", margin=0)])


# --- written once, re-made when the cells change --------------------------------------------


def test_the_text_chunk_says_which_jobs_the_grid_shows(run: Run) -> None:
    jobs = run.sweep(prompt=PROMPTS, strength=STRENGTHS)

    [result] = make_grids(run.dir, [spec(x="strength", y="prompt", where={"seed": 1592514025})])

    chunk = record(result)
    assert chunk["jobs"] == [job.id for job in jobs]
    assert chunk["spec"]["x"] == "strength" and chunk["spec"]["where"] == {"seed": [1592514025]}
    assert chunk["fixed"]["seed"] == 1592514025
    assert chunk["axes"] == {"x": [0.4, 0.7], "y": list(PROMPTS)}
    assert len(chunk["boxes"]) == 4


def test_unchanged_cells_leave_the_grid_file_alone(run: Run) -> None:
    run.sweep(prompt=PROMPTS, strength=STRENGTHS)
    [first] = make_grids(run.dir, [spec(x="strength", y="prompt")])
    before = (first.path.stat().st_mtime_ns, first.path.read_bytes())

    [again] = make_grids(run.dir, [spec(x="strength", y="prompt")])

    assert not again.written
    assert again.jobs == first.jobs
    assert (again.path.stat().st_mtime_ns, again.path.read_bytes()) == before


def test_a_changed_cell_remakes_the_grid(run: Run) -> None:
    fire, cheery = [run.job(prompt=prompt) for prompt in PROMPTS]
    run.finish(fire)
    run.fail(cheery)
    [first] = make_grids(run.dir, [spec(x="prompt")])
    before = first.path.read_bytes()

    run.finish(cheery)  # the failed job redone by a resumed run
    [again] = make_grids(run.dir, [spec(x="prompt")])

    assert again.written
    assert picture(again).getpixel(centre(boxes(again)[1])) == colour(cheery.index)
    assert again.path.read_bytes() != before
    assert not list(again.path.parent.glob(".*.tmp"))  # written atomically, nothing left over


def test_a_changed_spec_remakes_the_grid(run: Run) -> None:
    run.sweep(strength=STRENGTHS)
    make_grids(run.dir, [spec(x="strength")])

    [again] = make_grids(run.dir, [spec(x="strength", margin=12)])

    assert again.written


# --- limits ----------------------------------------------------------------------------------


def test_a_huge_grid_is_downscaled_under_the_limit_and_says_so(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = run.sweep(seed=tuple(range(12)), strength=STRENGTHS)
    monkeypatch.setattr(grid_layout, "MAX_GRID_PIXELS", 200_000)
    monkeypatch.setattr(grid_layout, "MAX_GRID_SIDE", 700)

    [result] = make_grids(run.dir, [spec(x="seed", y="strength")])

    image = picture(result)
    assert image.width * image.height <= 200_000 and max(image.size) <= 700
    assert result.note.startswith("downscaled: ") and "200,000 pixels" in result.note
    assert record(result)["note"] == result.note
    cells = boxes(result)
    assert len(cells) == len(jobs)
    assert cells[0][2] < SIZE  # smaller cells, still every job
    assert image.getpixel(centre(cells[-1])) == pytest.approx(colour(jobs[-1].index), abs=2)
    [kept] = make_grids(run.dir, [spec(x="seed", y="strength")])
    assert not kept.written and kept.note == result.note


def test_a_grid_that_cannot_fit_even_with_tiny_cells_is_refused(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run.sweep(seed=tuple(range(6)))
    monkeypatch.setattr(grid_layout, "MAX_GRID_PIXELS", 2_000)

    with pytest.raises(GridError, match="show fewer with `where`"):
        make_grids(run.dir, [spec(x="seed")])


# --- choosing grids --------------------------------------------------------------------------


def test_default_grid_puts_the_axis_with_most_values_across_and_prompts_down(run: Run) -> None:
    run.sweep(prompt=PROMPTS, strength=(0.3, 0.5, 0.7))
    rows = Manifest(run.dir).latest().values()

    assert default_specs(rows) == [spec(x="strength", y="prompt", show_init=True)]


def test_default_grid_of_a_run_that_sweeps_one_axis_is_one_row(run: Run) -> None:
    run.sweep(seed=(1, 2, 3))

    assert default_specs(Manifest(run.dir).latest().values()) == [spec(x="seed", show_init=True)]


def test_a_run_that_sweeps_nothing_gets_no_default_grid(run: Run) -> None:
    run.sweep(seed=(1,))

    assert default_specs(Manifest(run.dir).latest().values()) == []


# --- the spec: from a recipe, from the command line ------------------------------------------


def recipe(folder: Path, grids: str) -> Path:
    (folder / "red.png").write_bytes((DATA / "pictures" / "red.png").read_bytes())
    path = folder / "recipe.yaml"
    path.write_text(f"init_images: red.png\nprompts: [fire]\nseeds: [1, 2]\ngrids:\n{grids}")
    return path


def test_recipe_grids_are_read_without_a_warning(tmp_path: Path) -> None:
    loaded = load_recipe(
        recipe(tmp_path, "  - {x: seed, where: {strength: 0.75}, show_init: true}")
    )

    assert loaded.grids == (spec(x="seed", where={"strength": [0.75]}, show_init=True),)
    assert not loaded.warnings


@pytest.mark.parametrize(
    ("grids", "message"),
    [
        ("  - {x: strength, y: strength}", "5: grids[0].y: `strength` is already another axis"),
        ("  - {x: sed}", "did you mean `seed`?"),
        ("  - {x: seed, where: {sedd: 1}}", "5: grids[0].where.sedd: "),
        ("  - {x: seed, where: {seed: 1.5}}", "seed values are whole numbers, got [1.5]"),
        ("  - {x: seed, where: {strength: fire}}", "strength values are numbers"),
        ("  - {x: seed, cell: 4}", "grids[0].cell: "),
        ("  - {x: seed, name: ../up}", "grids[0].name: "),
        ("  - {x: seed, size: 4}", "grids[0].size: unknown key"),
    ],
)
def test_bad_grid_specs_are_reported_at_their_line(
    tmp_path: Path, grids: str, message: str
) -> None:
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe(tmp_path, grids))

    assert message in str(error.value)


def test_where_options_from_the_command_line_mean_what_the_recipe_means() -> None:
    where = parse_where(["seed=7", "prompt=cheery open fire, photograph", "seed=8"])

    assert where == {"seed": ["7", "8"], "prompt": ["cheery open fire, photograph"]}
    assert spec_from_options(x="strength", y=None, where=["seed=7"]) == spec(
        x="strength", where={"seed": 7}
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"x": "strenght"}, "--x: Input should be"),
        ({"x": "seed", "where": ["seed"]}, "write it as axis=value"),
        ({"x": "seed", "where": ["seed=x"]}, "--where: seed values are whole numbers"),
        ({"x": "seed", "where": ["sed=1"]}, "--where: sed: Input should be"),
        ({"x": "seed", "show_init": "yes"}, "--show-init: "),
    ],
)
def test_bad_command_line_options_say_which_option(options: dict[str, Any], message: str) -> None:
    with pytest.raises(GridError, match=message.replace("[", r"\[")):
        spec_from_options(**options)


def test_jobs_rerun_with_the_same_values_show_the_latest(run: Run) -> None:
    old = run.job(strength=0.4)
    run.finish(old)
    newer = dataclasses.replace(run.job(strength=0.4), negative_prompt="blurry")  # recipe edited
    run.finish(newer, fill=(1, 2, 3))
    run.sweep(strength=(0.7,))

    [result] = make_grids(run.dir, [spec(x="strength")])

    assert result.jobs[0] == newer.id
    assert picture(result).getpixel(centre(boxes(result)[0])) == (1, 2, 3)


def test_characters_the_font_lacks_show_as_boxes_rather_than_nothing() -> None:
    assert (
        grid_layout._shown("火の鳥 phoenix, crème brûlée → Ωμέγα")
        == "□□□ phoenix, crème brûlée → Ωμέγα"
    )


def test_a_run_folder_asks_for_its_recipe_grids_or_else_the_default(run: Run) -> None:
    run.sweep(prompt=PROMPTS, strength=STRENGTHS)
    assert grid.run_specs(run.dir) == [spec(x="strength", y="prompt", show_init=True)]

    listed = [{"x": "prompt", "where": {"strength": [0.4]}}]
    write_lock_file(run.dir, {"recipe": str(run.recipe_dir / "recipe.yaml"), "grids": listed})

    assert grid.run_specs(run.dir) == [spec(x="prompt", where={"strength": 0.4})]
