"""report.html: every job shown, user text escaped, links relative, the summary right, on
finished, half-finished and resumed runs — and, in headless Chromium, every thumbnail loads
and the table shows every job."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from html.parser import HTMLParser
from itertools import product
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from batchgen import __version__
from batchgen.jobs.job import Job
from batchgen.store.files import write_lock_file
from batchgen.store.images import a1111_parameters, write_image
from batchgen.store.manifest import Manifest, ManifestRow, NotARunFolderError
from batchgen.views.report import REPORT_NAME, write_report
from tests.helpers import INIT, JOB, gradient_image, make_job, make_row

PROMPTS = ("fire", "cheery open fire, photograph")
STRENGTHS = (0.4, 0.7)
NASTY_PROMPT = """</script><script>alert("x")</script> <!-- it's a "fire" & <b>smoke</b>"""


def sweep(
    prompts: Sequence[str] = PROMPTS,
    strengths: Sequence[float] = STRENGTHS,
    seeds: Sequence[int] = (7,),
) -> list[Job]:
    """Jobs in recipe order: seeds, then prompts, then strengths varying fastest."""
    combinations = product(seeds, prompts, strengths)
    return [
        make_job(index=index, prompt=prompt, strength=strength, seed=seed)
        for index, (seed, prompt, strength) in enumerate(combinations, start=1)
    ]


def lock_for(jobs: Sequence[Job], **changes: Any) -> dict[str, Any]:
    """What recipe.lock.yaml holds for a recipe sweeping these jobs' values."""

    def values(axis: str) -> list[Any]:
        return list(dict.fromkeys(getattr(job, axis) for job in jobs))

    return {
        "batchgen_version": __version__,
        "name": "fire-sweep",
        "recipe": "/recipes/fire-sweep.yaml",
        "model": [
            {"reference": "builtin:tiny", "identity": identity} for identity in values("model")
        ],
        "init_images": [{"path": INIT.label, "sha256": INIT.sha256}],
        # in the order sweep() nests them, as a recipe's order of keys decides its job order
        **{
            axis: values(axis)
            for axis in ("scheduler", "seed", "prompt", "strength", "steps", "cfg")
        },
        "negative_prompt": "",
        "steps_mode": "nominal",
        "width": 384,
        "height": 384,
        "fit": True,
        "include": [],
        "exclude": [],
        "intermediates": False,
        "grids": [],
        **changes,
    }


def make_run(
    run_dir: Path,
    jobs: Sequence[Job],
    *,
    failed: dict[Job, str] | None = None,
    lock: dict[str, Any] | None = None,
) -> list[ManifestRow]:
    """A run folder as `batchgen run` leaves it: lock file, images, a manifest row per job;
    the jobs in `failed` get a failed row with that error instead of an image."""
    failed = failed or {}
    write_lock_file(run_dir, lock if lock is not None else lock_for(jobs))
    manifest = Manifest(run_dir)
    rows = []
    for job in jobs:
        if job in failed:
            row = make_row(job, status="failed", path="", sha256="", error=failed[job])
        else:
            row = make_row(job)
            parameters = a1111_parameters(job, "tiny", "0123456789")
            write_image(gradient_image(), run_dir / row.path, job, parameters)
        manifest.append(row)
        rows.append(row)
    return rows


def write_grid(run_dir: Path, name: str, job_ids: Iterable[str], fixed: dict[str, Any]) -> None:
    """A grid PNG as grid.py writes it, with its batchgen-grid text chunk."""
    info = PngInfo()
    chunk = {"spec": {"x": "strength", "y": "prompt"}, "jobs": list(job_ids), "fixed": fixed}
    info.add_text("batchgen-grid", json.dumps(chunk))
    (run_dir / "grids").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "orange").save(run_dir / "grids" / name, pnginfo=info)


class ParsedPage(HTMLParser):
    """The page as a browser's parser sees it: elements with their attributes, the text
    (character references resolved) and the raw contents of each <script> by its id."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.source = page
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text = ""
        self.scripts: dict[str | None, str] = {}
        self._script: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))
        if tag == "script":
            self._script = dict(attrs).get("id") or ""
            self.scripts[self._script] = ""

    def handle_endtag(self, tag: str) -> None:
        self._script = None

    def handle_data(self, data: str) -> None:
        if self._script is not None:
            self.scripts[self._script] += data
        else:
            self.text += data

    def all(self, tag: str, **attributes: str) -> list[dict[str, str | None]]:
        return [
            attrs
            for name, attrs in self.elements
            if name == tag and all(attrs.get(key) == value for key, value in attributes.items())
        ]

    def texts(self, element: str) -> list[str]:
        """The text of each element whose start tag matches `element` exactly, e.g. `<h3>`."""
        tag = element.strip("<>").split()[0]
        inner = re.findall(rf"{re.escape(element)}(.*?)</{tag}>", self.source, re.DOTALL)
        return [ParsedPage(html).text for html in inner]

    def summary(self) -> dict[str, str]:
        """The summary's tiles, term → value."""
        return dict(zip(self.texts("<dt>"), self.texts("<dd>"), strict=True))

    def jobs_data(self) -> dict[str, dict[str, Any]]:
        return json.loads(self.scripts["jobs-data"])


def report(run_dir: Path) -> ParsedPage:
    return ParsedPage(write_report(run_dir).read_text(encoding="utf-8"))


def table_ids(page: ParsedPage) -> list[str | None]:
    return [attrs["data-id"] for attrs in page.all("tr") if "data-id" in attrs]


def thumbnail_ids(page: ParsedPage) -> list[str | None]:
    return [attrs["data-id"] for attrs in page.all("button") if "data-id" in attrs]


# --- what the page shows -------------------------------------------------------------------


def test_every_job_has_a_thumbnail_a_table_row_and_its_parameters(tmp_path: Path) -> None:
    jobs = sweep()
    rows = make_run(tmp_path, jobs)

    page = report(tmp_path)

    ids = [job.id for job in jobs]
    assert table_ids(page) == ids
    assert thumbnail_ids(page) == ids
    thumbnails = page.all("img", loading="lazy")
    for row in rows:
        assert {"src": row.path, "width": "16", "height": "16"}.items() <= next(
            img.items() for img in thumbnails if img["src"] == row.path
        )
    details = page.jobs_data()
    assert list(details) == ids
    job = jobs[2]
    assert details[job.id]["parameters"] == a1111_parameters(job, "tiny", "0123456789")
    assert details[job.id]["prompt"] == "cheery open fire, photograph"
    assert details[job.id]["image"] == rows[2].path


def test_report_is_written_atomically_and_rewritten_in_place(tmp_path: Path) -> None:
    make_run(tmp_path, sweep()[:1])

    first = write_report(tmp_path)
    Manifest(tmp_path).append(make_row(sweep()[1]))
    second = write_report(tmp_path)

    assert first == second == tmp_path / REPORT_NAME
    assert len(table_ids(ParsedPage(second.read_text(encoding="utf-8")))) == 2
    assert not [path.name for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_prompts_with_markup_and_quotes_are_escaped_everywhere(tmp_path: Path) -> None:
    job = make_job(prompt=NASTY_PROMPT, negative_prompt='"><img src=x onerror=alert(1)>')
    failing = make_job(prompt=NASTY_PROMPT, seed=8, index=4)
    make_run(tmp_path, [job, failing], failed={failing: "ValueError: bad <prompt> & 'quote'"})

    page = report(tmp_path)

    assert NASTY_PROMPT not in page.source
    assert "<img src=x" not in page.source and not page.all("img", src="x")
    assert list(page.scripts) == ["jobs-data", ""]  # the page's own data and code, no more
    assert page.source.count("</script") == 2
    assert "<!-- it's" not in page.source
    assert NASTY_PROMPT in page.text  # shown as typed: in the layout and in the table
    assert "ValueError: bad <prompt> & 'quote'" in page.text
    details = page.jobs_data()
    assert details[job.id]["prompt"] == NASTY_PROMPT
    assert details[job.id]["negative_prompt"] == '"><img src=x onerror=alert(1)>'
    assert details[failing.id]["error"] == "ValueError: bad <prompt> & 'quote'"


def test_failed_jobs_show_their_error_in_the_thumbnails_and_the_table(tmp_path: Path) -> None:
    jobs = sweep()
    error = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    make_run(tmp_path, jobs, failed={jobs[1]: error})

    page = report(tmp_path)

    assert table_ids(page) == [job.id for job in jobs]
    assert thumbnail_ids(page) == [job.id for job in jobs]  # the failed one is a button too
    assert page.texts('<span class="error">') == [error]
    assert page.texts("<td class=error>") == ["", error, "", ""]
    assert "#2 failed" in page.text
    (failed_row,) = page.all("tr", **{"data-status": "failed"})
    assert failed_row["data-id"] == jobs[1].id
    assert page.jobs_data()[jobs[1].id]["error"] == error
    assert page.summary()["failed"] == "1"
    assert len(page.all("img", loading="lazy")) == 2 * 3  # layout and table, done jobs only


def test_links_are_relative_and_point_at_files_in_the_run_folder(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs)
    write_grid(tmp_path, "seed-7.png", [job.id for job in jobs], {"seed": 7})
    (tmp_path / "run.log").touch()

    page = report(tmp_path)

    links = [attrs["src"] for attrs in page.all("img") if attrs.get("src")]
    links += [attrs["href"] for attrs in page.all("a") if attrs.get("href")]
    assert len(links) >= 4 * len(jobs)  # thumbnails and table images, with their links
    for link in links:
        assert link is not None
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc and not parts.path.startswith("/"), link
        target = unquote(parts.path)
        assert not target or (tmp_path / target).is_file(), link


def test_summary_counts_time_speed_model_device_and_version(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs, failed={jobs[3]: "OSError: disk full"})
    rows = Manifest(tmp_path).rows()
    (tmp_path / "manifest.csv").unlink()
    for row, seconds in zip(rows, (2.0, 3.0, 5.0, 0.5), strict=True):
        Manifest(tmp_path).append(dataclasses.replace(row, seconds=seconds))

    page = report(tmp_path)

    assert page.summary() == {
        "jobs": "4",
        "done": "3",
        "failed": "1",
        "image time": "10.5 s",
        "images/s": "0.286",  # 3 images in 10.5 s
        "model": "builtin:tiny [0123456789]",
        "device": "cpu",
        "dtype": "float32",
        "batchgen": __version__,
    }
    facts = [re.sub(r"\s+", " ", fact) for fact in page.texts('<p class="facts">')]
    assert facts[1:] == [
        "swept: prompt (2) × strength (2)",
        "fixed: init_image pictures/fire-drawing.png · scheduler k_lms · seed 7 · steps 10 · "
        "cfg 7.5 · size 384x384",
        "recipe /recipes/fire-sweep.yaml",
    ]
    assert facts[0].startswith("finished 20")


def test_models_are_named_by_the_recipe_reference_and_can_be_swept(tmp_path: Path) -> None:
    jobs = [
        make_job(index=1, model="builtin:tiny@0123456789abcdef"),
        make_job(index=2, model="/models/sd15@fedcba9876543210"),
    ]
    lock = lock_for(jobs)
    lock["model"][1]["reference"] = "/models/sd15"
    make_run(tmp_path, jobs, lock=lock)

    page = report(tmp_path)

    assert page.texts('<th scope="col" class="x">') == ["builtin:tiny", "/models/sd15"]
    assert page.summary()["model"] == "builtin:tiny, /models/sd15 [0123456789]"
    assert "swept: model (2)" in page.texts('<p class="facts">')


def test_lock_files_of_earlier_versions_name_the_model_too(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs, lock=lock_for(jobs, model={"reference": "sd", "identity": JOB.model}))

    assert report(tmp_path).summary()["model"] == "sd [0123456789]"


def test_thumbnails_are_laid_out_like_the_grids(tmp_path: Path) -> None:
    jobs = sweep(seeds=(7, 8))
    make_run(tmp_path, jobs)

    page = report(tmp_path)

    # No grid asked for: x and y are the last two swept axes, one table per seed.
    assert page.texts('<h3 class="group-title">') == ["seed 7", "seed 8"]
    assert page.texts('<th class="corner">') == ["prompt ↓ / strength →"] * 2
    assert page.texts('<th scope="col" class="x">') == ["0.4", "0.7"] * 2
    assert page.texts('<th scope="row" class="y">') == list(PROMPTS) * 2
    assert thumbnail_ids(page) == [job.id for job in jobs]


def test_thumbnails_follow_the_recipe_grid_when_it_names_one(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs, lock=lock_for(jobs, grids=[{"x": "prompt", "y": "strength"}]))

    page = report(tmp_path)

    assert page.texts('<th class="corner">') == ["strength ↓ / prompt →"]
    assert page.texts('<th scope="col" class="x">') == list(PROMPTS)
    assert page.texts('<th scope="row" class="y">') == ["0.4", "0.7"]
    by_strength = [jobs[0], jobs[2], jobs[1], jobs[3]]
    assert thumbnail_ids(page) == [job.id for job in by_strength]


def test_grid_pngs_are_shown_with_their_spec_and_linked_from_their_group(tmp_path: Path) -> None:
    jobs = sweep(seeds=(7, 8))
    make_run(tmp_path, jobs)
    write_grid(tmp_path, "seed-7.png", [job.id for job in jobs[:4]], {"seed": 7})
    write_grid(tmp_path, "seed-8.png", [job.id for job in jobs[4:]], {"seed": 8})
    (tmp_path / "grids" / ".seed-9.png.1234.tmp").write_bytes(b"half a grid")

    page = report(tmp_path)

    grid_images = [attrs for attrs in page.all("img") if str(attrs.get("src")).startswith("grids/")]
    assert [attrs["src"] for attrs in grid_images] == ["grids/seed-7.png", "grids/seed-8.png"]
    assert grid_images[0]["width"] == "40" and grid_images[0]["height"] == "30"
    assert page.texts("<figcaption>") == [
        "seed-7.png · x strength · y prompt · seed 7",
        "seed-8.png · x strength · y prompt · seed 8",
    ]
    group_links = [attrs["href"] for attrs in page.all("a", **{"class": "grid-link"})]
    assert group_links == ["grids/seed-7.png", "grids/seed-8.png"]
    assert page.all("a", href="#grids")


def test_half_finished_run_shows_what_is_done_and_what_is_not(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs[:1], lock=lock_for(jobs))  # killed after the first image

    page = report(tmp_path)

    assert table_ids(page) == [jobs[0].id]
    assert thumbnail_ids(page) == [jobs[0].id]
    assert page.text.count("not made") == 3  # the other cells of the 2×2 layout
    assert "swept: prompt (2) × strength (2)" in page.texts('<p class="facts">')


def test_run_with_no_finished_job_gets_a_report_too(tmp_path: Path) -> None:
    write_lock_file(tmp_path, lock_for(sweep()))

    page = report(tmp_path)

    assert table_ids(page) == []
    assert page.jobs_data() == {}
    assert "no job of this run has finished" in page.text
    assert "no job has finished yet" in page.text


def test_a_folder_that_is_not_a_run_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    with pytest.raises(NotARunFolderError, match="typo does not exist"):
        write_report(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotARunFolderError, match="not a batchgen run folder.*recipe.lock.yaml"):
        write_report(tmp_path / "empty")
    assert not any((tmp_path / "empty").iterdir())


def test_resumed_run_shows_the_latest_row_of_each_job(tmp_path: Path) -> None:
    jobs = sweep()
    make_run(tmp_path, jobs, failed={jobs[0]: "OSError: disk full"})
    make_run(tmp_path, jobs[:1])  # the re-run redid the failed job

    page = report(tmp_path)

    assert table_ids(page) == [job.id for job in jobs]
    assert "disk full" not in page.text
    assert not page.all("tr", **{"data-status": "failed"})


def test_image_file_gone_from_disk_is_reported_not_linked(tmp_path: Path) -> None:
    jobs = sweep()
    rows = make_run(tmp_path, jobs)
    (tmp_path / rows[0].path).unlink()

    page = report(tmp_path)

    assert not page.all("img", src=rows[0].path)
    assert "#1 image missing" in page.text
    assert page.summary()["image files missing"] == "1"
    assert table_ids(page) == [job.id for job in jobs]


def test_manifest_paths_outside_the_run_folder_are_not_linked(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "images").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    gradient_image().save(secret)
    Manifest(run_dir).append(make_row(path="../secret.png"))
    Manifest(run_dir).append(make_row(make_job(seed=2), path=str(secret)))

    page = report(run_dir)

    sources = [attrs.get("src") for attrs in page.all("img")]
    assert not [source for source in sources if source and "secret" in source]
    assert page.text.count("image missing") == 2


# --- in a real browser ---------------------------------------------------------------------

# Chromium's flags for this closed network: no sandbox as root, no GPU, nothing phoning home.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        binary = shutil.which(name)
        if binary:
            return binary
    pytest.skip(
        "no chromium binary on PATH: `make test` installs Debian's chromium package "
        "(apt-get install chromium) when it can"
    )


def test_report_in_headless_chromium_loads_every_thumbnail_and_lists_every_job(
    tmp_path: Path,
) -> None:
    browser = chromium()
    run_dir = tmp_path / "run with spaces"
    jobs = sweep(prompts=(*PROMPTS, NASTY_PROMPT))
    make_run(run_dir, jobs, failed={jobs[-1]: "RuntimeError: out of memory"})
    write_grid(run_dir, "seed-7.png", [job.id for job in jobs], {"seed": 7})
    url = write_report(run_dir).as_uri() + "#self-check"

    started = time.monotonic()
    dump = subprocess.run(
        [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    seconds = time.monotonic() - started

    found = re.search(r'<pre id="self-check"[^>]*>(.+?)</pre>', dump.stdout, re.DOTALL)
    assert found, f"the page did not check itself (exit {dump.returncode}):\n{dump.stderr[-2000:]}"
    seen = json.loads(ParsedPage(found[0]).text)
    done = len(jobs) - 1
    assert seen["images"] == 2 * done + 1  # a thumbnail and a table image a job, the grid
    assert seen["brokenImages"] == []
    assert seen["imagesLoaded"] == seen["images"]
    assert seen["jobs"] == seen["rowsShown"] == len(jobs)
    assert sorted(seen["rowIds"]) == sorted(job.id for job in jobs)
    assert seen["sortedDescending"] is True
    assert seen["filteredToOne"] is True
    assert seen["dialogShowsParameters"] is True
    assert seconds < 20
