"""YAML recipe → typed, resolved `Recipe`.

The file's shape is checked first (`recipe_file.RecipeFile`, also `batchgen schema`);
everything a schema cannot know — globs, files on disk, scheduler and model names, ranges —
is checked after it. Every problem is collected, not just the first, and names the file, the
line and the field, with a hint where one helps. Torch is never imported here.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
)

from batchgen import __version__
from batchgen.engine.images import InitImageError, read_header
from batchgen.engine.schedulers import UnknownSchedulerError, scheduler_spec
from batchgen.jobs.job import InitImage, Job, StepsMode
from batchgen.jobs.parameters import AXIS_OF_KEY
from batchgen.models.families import UnsupportedFamilyError
from batchgen.models.source import (
    CONFIGS_DIR,
    ConfigNotFoundError,
    ModelNotFoundError,
    ModelSource,
    resolve_model,
    resolve_vae,
)
from batchgen.recipe.model_checks import (
    REFINER_AXES,
    SECOND_PROMPTS,
    ModelChecks,
    refiner_values,
)
from batchgen.recipe.problems import PathKey, Problem, RecipeError, YamlDocument, did_you_mean
from batchgen.recipe.schema import (
    AXIS_ITEM,
    FIELD_HINTS,
    MAX_SEED,
    GridSpec,
    IntermediatesSpec,
    Range,
    RecipeFile,
    SchedulerChoice,
    SeedRange,
    VariationMode,
    validate_shape,
)

# Sweep axes, by the singular name jobs, include/exclude and grids use; the model outermost and
# the variations (from `variations`) innermost.
AXES: tuple[str, ...] = tuple(
    dict.fromkeys(["model", *AXIS_OF_KEY.values(), "variation_count", "variation_amount"])
)


@dataclass(frozen=True)
class Recipe:
    path: Path
    name: str
    negative_prompt: str
    steps_mode: StepsMode
    clip_skip: int
    vae: ModelSource | None  # replaces every model's own VAE
    variant: str | None  # of diffusers folders' weight files, e.g. "fp16"
    dtype: str  # as written: "auto" is settled by the device at run time
    width: int | None
    height: int | None
    fit: bool
    # Axis name → its values, in the order the recipe writes the axes (outermost first).
    axes: dict[str, Sequence[Any]]
    swept: frozenset[str]  # axes given as a list or range
    include: tuple[dict[str, Any], ...]
    exclude: tuple[dict[str, Any], ...]
    output: Path
    intermediates: IntermediatesSpec | None  # None: no strips
    grids: tuple[GridSpec, ...]
    variation_mode: VariationMode = "noise"  # what variation_count counts: see Variations
    with_variations: tuple[tuple[int, float], ...] = ()
    mask: InitImage | None = None  # one mask for every init image; None: their alpha
    mask_blur: int = 0
    invert_mask: bool = False
    upscale_small: bool = False
    keep_size: bool = False
    prompt_2: str = ""  # SDXL's second text encoder's prompts; "": the same as the first
    negative_prompt_2: str = ""
    # Whether the recipe names its schedulers: where it does not, a flow-matching model (SD 3)
    # renders with its own, the others with batchgen's default (k_lms).
    scheduler_written: bool = True
    lines: dict[str, int] = field(default_factory=dict)  # top-level key → line, for later errors
    warnings: tuple[Problem, ...] = ()

    def model_of(self, job: Job) -> ModelSource:
        """The model a job of this recipe runs on."""
        return next(model for model in self.axes["model"] if self.identity_of(model) == job.model)

    def refiners(self) -> dict[str, ModelSource]:
        """The SDXL refiners of `refiner:` by the identity their jobs record (none without)."""
        return {self.identity_of(refiner): refiner for refiner in self.axes.get("refiner", ())}

    def identity_of(self, source: ModelSource) -> str:
        """What a job records of a model or refiner: variant weights are other numbers under
        the same folder, so part of the identity."""
        return source.identity + (f"+{self.variant}" if self.variant else "")

    def locked(self) -> dict[str, Any]:
        """The recipe as resolved — globs expanded, defaults filled — for recipe.lock.yaml."""

        def plain(value: Any) -> Any:
            if isinstance(value, ModelSource):
                return value.reference
            return value.label if isinstance(value, InitImage) else value

        def models(axis: str) -> dict[str, Any]:
            sources = self.axes.get(axis, ())
            return {axis: [{"reference": m.reference, "identity": m.identity} for m in sources]}

        return {
            "batchgen_version": __version__,
            "name": self.name,
            "recipe": str(self.path.resolve()),  # init image labels are relative to its folder
            **models("model"),
            "init_images": [
                {"path": image.label, "sha256": image.sha256} for image in self.axes["init_image"]
            ],
            **{
                axis: [plain(v) for v in values]
                for axis, values in self.axes.items()
                if axis not in ("init_image", "model", "refiner")
            },
            # Only when set: a lock without it is not a change (nor is an older one).
            **(models("refiner") if "refiner" in self.axes else {}),
            "negative_prompt": self.negative_prompt,
            # Only when set: a lock without them is not a change (nor is an older one).
            **{key: getattr(self, key) for key in SECOND_PROMPTS if getattr(self, key)},
            "steps_mode": self.steps_mode,
            "clip_skip": self.clip_skip,
            "vae": {"reference": self.vae.reference, "identity": self.vae.identity}
            if self.vae
            else None,
            "variant": self.variant,
            "dtype": self.dtype,
            "width": self.width,
            "height": self.height,
            "fit": self.fit,
            "include": [{k: plain(v) for k, v in entry.items()} for entry in self.include],
            "exclude": [{k: plain(v) for k, v in entry.items()} for entry in self.exclude],
            "intermediates": self.intermediates.model_dump() if self.intermediates else False,
            "variation_mode": self.variation_mode,
            "with_variations": [list(pair) for pair in self.with_variations],
            "mask": {"path": self.mask.label, "sha256": self.mask.sha256} if self.mask else None,
            "mask_blur": self.mask_blur,
            "invert_mask": self.invert_mask,
            "upscale_small": self.upscale_small,
            "keep_size": self.keep_size,
            "grids": [grid.model_dump(exclude_none=True) for grid in self.grids],
        }


def load_recipe(path: str | Path, output: Path | None = None) -> Recipe:
    """Read, validate and resolve a recipe file; raise RecipeError listing every problem."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([Problem(file, None, "", "no such recipe file")]) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([Problem(file, None, "", f"cannot read the recipe: {error}")]) from None
    doc = YamlDocument(file, text)
    if doc.problems and doc.data is None:
        raise RecipeError(doc.problems)
    if not isinstance(doc.data, dict):
        raise RecipeError(
            [
                Problem(
                    file,
                    1,
                    "",
                    "a recipe is a YAML mapping of keys to values",
                    "start from recipes/example.yaml",
                )
            ]
        )
    problems = list(doc.problems)
    shape, shape_problems = validate_shape(doc)
    resolver = _Resolver(
        doc, shape, skip={p.field.split(".")[0].split("[")[0] for p in shape_problems}
    )
    recipe = resolver.resolve(output)
    problems += shape_problems + resolver.problems
    if problems:
        raise RecipeError(sorted(problems, key=lambda p: (p.line or 0, p.field)))
    return recipe


class _Resolver:
    """Checks that need the disk or the name tables, collecting problems as it goes."""

    def __init__(self, doc: YamlDocument, shape: RecipeFile, skip: set[str]) -> None:
        self.doc = doc
        self.shape = shape
        self.skip = skip  # fields whose shape was wrong: already reported, stand-ins now
        self.base = doc.file.resolve().parent
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.single_files = 0  # single-file checkpoints among the models: what `config:` is for
        self.model_checks = ModelChecks(shape, set(doc.data), self.base, self.fail)
        self.init_images: dict[Path, InitImage] = {}

    def fail(self, path: PathKey, message: str, hint: str | None = None) -> None:
        if str(path[0]) in self.skip:
            return
        self.problems.append(self.doc.problem(path, message, hint))

    def resolve(self, output: Path | None) -> Recipe:
        shape = self.shape
        name = shape.name or self.doc.file.stem
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            self.fail(("name",), f"`{name}` cannot name a folder", "use letters, digits, - and _")
        axes = {
            "model": self._models(),
            "init_image": self._init_images(),
            "prompt": self._prompts(),
            "strength": self._numbers("strength", shape.strength, float),
            "steps": self._numbers("steps", shape.steps, int),
            "cfg": self._numbers("cfg", shape.cfg, float),
            "seed": self._seeds(),
            "scheduler": self._schedulers(),
            **self.model_checks.refiner_axes(),
            "variation_count": self._variation_axis("count"),
            "variation_amount": self._variation_axis("amount"),
        }
        written = [AXIS_OF_KEY[key] for key in self.doc.data if key in AXIS_OF_KEY]
        # The model is always the outermost loop: each model is loaded once per run.
        order = list(dict.fromkeys(["model", *REFINER_AXES[:1], *written, *axes]))
        swept = (
            frozenset(
                AXIS_OF_KEY[key]
                for key, value in self.doc.data.items()
                if key in AXIS_OF_KEY and (isinstance(value, list | dict) or key == "prompts_file")
            )
            | {
                f"variation_{key}"
                for key in ("count", "amount")
                if isinstance(getattr(shape.variations, key), list)
            }
            | {
                axis
                for axis, value in zip(REFINER_AXES, refiner_values(shape.refiner), strict=True)
                if isinstance(value, list)
            }
        )
        if output is None:
            output = self.base / shape.output if shape.output else Path("outputs") / name
        include = self._matrix_entries("include", axes)
        exclude = self._matrix_entries("exclude", axes)
        self._check_config()
        self.model_checks.check_second_prompts(axes["model"])
        self.model_checks.check_refined_models(axes["model"])
        self.model_checks.check_scheduler_kinds(axes["model"], axes["scheduler"])
        return Recipe(
            path=self.doc.file,
            name=name,
            negative_prompt=shape.negative_prompt,
            steps_mode=shape.steps_mode,
            clip_skip=shape.clip_skip,
            vae=self._vae(),
            variant=shape.variant,
            dtype=shape.dtype,
            width=shape.width,
            height=shape.height,
            fit=shape.fit,
            axes={axis: axes[axis] for axis in order if axis in axes},
            swept=swept,
            include=include,
            exclude=exclude,
            output=output.absolute(),
            intermediates=(
                IntermediatesSpec() if shape.intermediates is True else shape.intermediates or None
            ),
            grids=tuple(shape.grids),
            variation_mode=shape.variations.mode,
            with_variations=tuple(shape.with_variations),
            mask=self._mask(),
            mask_blur=shape.mask_blur,
            invert_mask=shape.invert_mask,
            upscale_small=shape.upscale_small,
            keep_size=shape.keep_size,
            prompt_2=shape.prompt_2,
            negative_prompt_2=shape.negative_prompt_2,
            scheduler_written="scheduler" in self.doc.data,
            lines={str(k[0]): v for k, v in self.doc.lines.items() if len(k) == 1},
            warnings=tuple(self.warnings),
        )

    def _model(self, where: PathKey, reference: str) -> ModelSource | None:
        try:
            source = resolve_model(reference, self.base, self.shape.config)
        except ConfigNotFoundError as error:  # raised for single files only
            self.single_files += 1
            self.fail(("config",), str(error), error.hint)
            return None
        except (ModelNotFoundError, UnsupportedFamilyError) as error:
            self.fail(where, str(error), error.hint)
            return None
        self.single_files += source.kind == "single_file"
        if source.config == CONFIGS_DIR / "sd2" and self.shape.config is None:
            self.warnings.append(
                self.doc.problem(
                    where,
                    f"`{reference}` is an SD 2.x checkpoint: loaded as 768-v (v-prediction, "
                    "768 px), which its tensors cannot tell from 2.x base (epsilon, 512 px)",
                    "for SD 2.0/2.1 base write `config: sd2-base`; `config: sd2` silences this",
                )
            )
        return source

    def _check_config(self) -> None:
        """After every model is resolved (`include` entries may name more)."""
        if self.shape.config is not None and not self.single_files:
            self.fail(
                ("config",),
                "applies to single-file checkpoints only, and no `model:` is one",
                "remove `config:`: diffusers folders and hub models carry their own configs",
            )

    def _vae(self) -> ModelSource | None:
        if self.shape.vae is None:
            return None
        try:
            return resolve_vae(self.shape.vae, self.base)
        except ModelNotFoundError as error:
            self.fail(("vae",), str(error), error.hint)
            return None

    def _variation_axis(self, key: str) -> tuple[Any, ...]:
        value = getattr(self.shape.variations, key)
        if value == []:
            self.fail(("variations", key), "is empty", "give a value or a list of values")
        return tuple(dict.fromkeys(value)) if isinstance(value, list) else (value,)

    def _mask(self) -> InitImage | None:
        if self.shape.mask is None:
            return None
        images = self._init_image(("mask",), self.shape.mask)
        if len(images) > 1:
            self.fail(("mask",), f"matches {len(images)} files; one mask serves every job")
        return images[0] if images else None

    def _models(self) -> tuple[ModelSource, ...]:
        references = self.shape.model
        if isinstance(references, str):
            return tuple(filter(None, [self._model(("model",), references)]))
        if not references:
            self.fail(("model",), "is empty", "e.g. `model: builtin:tiny`")
        found = [self._model(("model", i), ref) for i, ref in enumerate(references)]
        return tuple(dict.fromkeys(source for source in found if source is not None))

    def _init_image(self, path: PathKey, pattern: str) -> list[InitImage]:
        full = Path(os.path.normpath(self.base / Path(pattern).expanduser()))
        matches = (
            sorted(glob.glob(str(full), recursive=True)) if glob.has_magic(pattern) else [str(full)]
        )
        if not matches or not Path(matches[0]).exists():
            self.fail(
                path,
                f"no file matches `{pattern}` (looked in {self.base})",
                "paths are relative to the recipe file's folder",
            )
            return []
        images = []
        for match in matches:
            file = Path(match)
            if file in self.init_images:
                images.append(self.init_images[file])
                continue
            try:
                header = read_header(file)
            except InitImageError as error:
                self.fail(path, str(error))
                continue
            try:
                label = file.relative_to(self.base).as_posix()
            except ValueError:
                label = str(file)
            image = InitImage(
                file, label, header.sha256, header.width, header.height, header.has_alpha
            )
            self.init_images[file] = image
            images.append(image)
        return images

    def _init_images(self) -> tuple[InitImage, ...]:
        patterns = self.shape.init_images
        if isinstance(patterns, str):
            return tuple(self._init_image(("init_images",), patterns))
        if not patterns:
            self.fail(("init_images",), "is empty", "list at least one picture")
        found = [self._init_image(("init_images", i), p) for i, p in enumerate(patterns)]
        return tuple(dict.fromkeys(image for images in found for image in images))

    def _prompts(self) -> tuple[str, ...]:
        shape = self.shape
        if (shape.prompts is None) == (shape.prompts_file is None):
            key = "prompts_file" if shape.prompts is not None else "prompts"
            self.fail((key,), "give either `prompts` or `prompts_file`, exactly one of them")
            return ()
        if shape.prompts_file is not None:
            file = self.base / Path(shape.prompts_file).expanduser()
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                self.fail(("prompts_file",), f"cannot read {file}: {error}")
                return ()
            prompts = tuple(line.strip() for line in lines if line.strip())
            if not prompts:
                self.fail(("prompts_file",), f"{file} has no prompts", "one prompt a line")
            return prompts
        prompts = (shape.prompts,) if isinstance(shape.prompts, str) else tuple(shape.prompts or ())
        if not prompts:
            self.fail(("prompts",), "is empty", 'give at least one prompt (it may be "")')
        return prompts

    def _numbers(self, key: str, value: Any, kind: type) -> tuple[Any, ...]:
        if isinstance(value, Range):
            values = self._expand_range(key, value)
            if not values:
                return ()  # _expand_range said why
        else:
            values = value if isinstance(value, list) else [value]
        if not values:
            self.fail((key,), "is empty", FIELD_HINTS[key])
        if kind is int and any(float(v) != int(v) for v in values):
            self.fail((key,), f"must be whole numbers, got {values}", FIELD_HINTS[key])
            return ()
        checked = [kind(v) for v in values]
        for number in checked:
            try:
                AXIS_ITEM[key].validate_python(number)
            except ValidationError as error:
                self.fail((key,), f"{number}: {error.errors()[0]['msg']}", FIELD_HINTS[key])
        return tuple(dict.fromkeys(checked))

    def _expand_range(self, key: str, spec: Range) -> list[float]:
        if (spec.step is None) == (spec.num is None):
            self.fail(
                (key,),
                "a range takes either `step` or `num`, exactly one",
                "{start: 0.3, stop: 0.9, step: 0.2} or {start: 0.3, stop: 0.9, num: 4}",
            )
            return []
        if spec.stop < spec.start:
            self.fail((key, "stop"), f"stop {spec.stop} is below start {spec.start}")
            return []
        if spec.num is not None:
            if spec.num == 1:
                return [spec.start]
            gap = (spec.stop - spec.start) / (spec.num - 1)
            return [round(spec.start + i * gap, 10) for i in range(spec.num)]
        assert spec.step is not None
        count = math.floor((spec.stop - spec.start) / spec.step + 1e-9) + 1
        return [round(spec.start + i * spec.step, 10) for i in range(count)]

    def _seeds(self) -> tuple[int, ...]:
        seeds = self.shape.seeds
        if isinstance(seeds, SeedRange):
            if seeds.start + seeds.count - 1 > MAX_SEED:
                self.fail(("seeds", "count"), f"the last seed would pass {MAX_SEED}")
                return ()
            # A range, not a tuple: the matrix's size is checked before anything is expanded.
            return range(seeds.start, seeds.start + seeds.count)  # type: ignore[return-value]
        values = seeds if isinstance(seeds, list) else [seeds]
        if not values:
            self.fail(("seeds",), "is empty", FIELD_HINTS["seeds"])
        return tuple(dict.fromkeys(values))

    def _schedulers(self) -> tuple[str, ...]:
        choices = self.shape.scheduler
        listed = choices if isinstance(choices, list) else [choices]
        names = [c.as_name() if isinstance(c, SchedulerChoice) else c for c in listed]
        for index, name in enumerate(names):
            try:
                scheduler_spec(name)
            except UnknownSchedulerError as error:
                where: PathKey = (
                    ("scheduler", index) if isinstance(choices, list) else ("scheduler",)
                )
                self.fail(where, str(error), error.hint)
        if not names:
            self.fail(("scheduler",), "is empty", "e.g. `scheduler: k_lms`")
        return tuple(dict.fromkeys(names))

    def _matrix_entries(
        self, key: str, axes: dict[str, tuple[Any, ...]]
    ) -> tuple[dict[str, Any], ...]:
        """include/exclude entries with their values checked and normalised like the axes'."""
        entries = []
        for index, raw in enumerate(getattr(self.shape, key)):
            entry: dict[str, Any] = {}
            for axis, value in raw.items():
                where: PathKey = (key, index, axis)
                if axis not in AXES:
                    self.fail(
                        where,
                        f"`{axis}` is not a sweep axis",
                        did_you_mean(str(axis), AXES) or f"axes: {', '.join(AXES)}",
                    )
                    continue
                normalised = self._entry_value(where, axis, value, axes[axis])
                if normalised is not None:
                    entry[axis] = normalised
            if not raw:
                self.fail((key, index), "is empty", "name at least one axis and value")
            entries.append(entry)
        return tuple(entries)

    def _entry_value(self, where: PathKey, axis: str, value: Any, known: tuple[Any, ...]) -> Any:
        if axis == "model":
            for source in known:
                if value in (source.reference, source.name):
                    return source
            return self._model(where, str(value))
        if axis == "init_image":
            for image in known:
                if value in (image.label, image.path.name, image.path.stem):
                    return image
            images = self._init_image(where, str(value))
            return images[0] if images else None
        if axis == "scheduler":
            try:
                scheduler_spec(str(value))
            except UnknownSchedulerError as error:
                self.fail(where, str(error), error.hint)
                return None
            return str(value)
        if axis == "prompt":
            return str(value)
        try:
            return AXIS_ITEM[axis].validate_python(value)
        except ValidationError as error:
            self.fail(
                where,
                error.errors()[0]["msg"],
                FIELD_HINTS.get("seeds" if axis == "seed" else axis),
            )
            return None
