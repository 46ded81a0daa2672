"""`Recipe` → the ordered, lazily generated `Job`s.

The order is the nested order of the axes as the recipe writes them (the first axis is the
outermost loop); it never changes between runs of the same recipe. `include`/`exclude` follow
GitHub Actions' matrix rules, with the swept axes (those given as lists or ranges) as the
matrix keys and the scalar parameters as values an include entry may set:

- `exclude` drops every combination that matches all of an entry's key/values;
- an `include` entry whose swept keys match a combination sets its other keys on it;
- an entry that matches no combination is a combination of its own, appended at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from batchgen.engine.images import output_size, upscaled_size
from batchgen.jobs.job import Job, nominal_steps, taken_steps
from batchgen.models.families import FAMILIES
from batchgen.models.source import native_side, own_scheduler
from batchgen.recipe.load import AXES, Recipe
from batchgen.recipe.problems import Problem

DEFAULT_MAX_JOBS = 100_000

Combination = dict[str, Any]


def _matches(combination: Combination, entry: dict[str, Any], keys: set[str]) -> bool:
    return all(combination[key] == entry[key] for key in keys)


def combinations(recipe: Recipe, problems: list[Problem] | None = None) -> Iterator[Combination]:
    """Axis name → value for every job, in job order. Problems found go to `problems`."""
    axis_names = list(recipe.axes)
    matched = [False] * len(recipe.include)
    for values in itertools.product(*recipe.axes.values()):
        combination = dict(zip(axis_names, values, strict=True))
        if any(_matches(combination, entry, set(entry)) for entry in recipe.exclude):
            continue
        for index, entry in enumerate(recipe.include):
            swept_keys = set(entry) & recipe.swept
            if _matches(combination, entry, swept_keys):
                combination.update(entry)
                matched[index] = True
        yield combination
    for index, entry in enumerate(recipe.include):
        if matched[index]:
            continue
        open_axes = [
            axis
            for axis in AXES
            if axis in recipe.swept and axis not in entry and len(recipe.axes[axis]) > 1
        ]
        if open_axes:
            if problems is not None:
                problems.append(
                    Problem(
                        recipe.path,
                        recipe.lines.get("include"),
                        f"include[{index}]",
                        "matches no combination, so it is a job of its own, but it leaves "
                        f"{', '.join(f'`{a}`' for a in open_axes)} open",
                        "give a value for every swept axis, or match an existing combination",
                    )
                )
            continue
        yield {axis: values[0] for axis, values in recipe.axes.items()} | entry


def upper_bound(recipe: Recipe) -> int:
    """Jobs at most, without generating them: the product of the axes plus the includes,
    each combination a job and its variations (or iterations)."""
    combinations = math.prod(len(values) for values in recipe.axes.values())
    family = 1 + max(recipe.axes["variation_count"], default=0)
    return (combinations + len(recipe.include)) * family


def _job(recipe: Recipe, index: int, combination: Combination, dtype: str) -> Job:
    image = combination["init_image"]
    width, height = output_size(
        (image.width, image.height), recipe.width, recipe.height, recipe.fit
    )
    final_size = None
    if recipe.upscale_small:
        rendered = upscaled_size((width, height), native_side(combination["model"]))
        final_size = (width, height) if recipe.keep_size and rendered != (width, height) else None
        width, height = rendered
    return Job(
        index=index,
        init_image=image,
        prompt=combination["prompt"],
        negative_prompt=recipe.negative_prompt,
        prompt_2=recipe.prompt_2,
        negative_prompt_2=recipe.negative_prompt_2,
        strength=float(combination["strength"]),
        steps=int(combination["steps"]),
        steps_mode=recipe.steps_mode,
        cfg=float(combination["cfg"]),
        seed=int(combination["seed"]),
        scheduler=_scheduler(recipe, combination),
        width=width,
        height=height,
        fit=recipe.fit,
        clip_skip=recipe.clip_skip,
        model=recipe.identity_of(combination["model"]),
        vae=recipe.vae.identity if recipe.vae else "",
        dtype=dtype,
        model_name=combination["model"].name,
        with_variations=recipe.with_variations,
        mask=recipe.mask,
        mask_blur=recipe.mask_blur,
        invert_mask=recipe.invert_mask,
        final_size=final_size,
        **_refiner_fields(recipe, combination),
    )


def _scheduler(recipe: Recipe, combination: Combination) -> str:
    """The combination's scheduler; a flow-matching model's own where the recipe names none."""
    model = combination["model"]
    if recipe.scheduler_written or not FAMILIES[model.family].flow_matching:
        return str(combination["scheduler"])
    return own_scheduler(model)


def _refiner_fields(recipe: Recipe, combination: Combination) -> dict[str, Any]:
    refiner = combination.get("refiner")
    if refiner is None:
        return {}
    return {
        "refiner": recipe.identity_of(refiner),
        "refiner_switch": float(combination["refiner_switch"]),
        "refiner_label": f"{refiner.name} [{refiner.short_hash}]",  # A1111's short title
    }


def variation_seed(job: Job, number: int) -> int:
    """The seed of a job's `number`-th variation: derived from the job, never random, so a
    re-run makes the same variations; 32 bits, as A1111's variation seeds."""
    digest = hashlib.sha256(f"{job.id}/variation/{number}".encode()).hexdigest()
    return int(digest[:8], 16)


def _family(recipe: Recipe, job: Job, combination: Combination) -> Iterator[Job]:
    """The job, then its variations (noise) or the later jobs of its chain (feedback)."""
    yield job
    count, amount = combination["variation_count"], float(combination["variation_amount"])
    if recipe.variation_mode == "feedback":
        parent = job
        for iteration in range(1, count + 1):
            # The chain's seed throughout: a chain stays one row of a seed × iteration grid.
            parent = replace(job, parent_id=parent.id, iteration=iteration)
            yield parent
    elif amount > 0:
        for number in range(1, count + 1):
            yield replace(job, variation_seed=variation_seed(job, number), variation_amount=amount)


def expand(recipe: Recipe, dtype: str) -> Iterator[Job]:
    """The recipe's jobs in order, numbered from 1: each combination's job followed by its
    variations or iterations; a job seen before is skipped."""
    seen: set[str] = set()
    for combination in combinations(recipe):
        # Numbered as if new: only a variation or a job after a duplicate needs renumbering
        # (`replace` costs more than making the job, in a 10,000-job `plan`).
        base = _job(recipe, len(seen) + 1, combination, dtype)
        for job in _family(recipe, base, combination):
            if job.id in seen:
                continue
            seen.add(job.id)
            if job.index == len(seen):
                yield job
                continue
            numbered = replace(job, index=len(seen))
            numbered.__dict__["id"] = job.id  # the index is not part of the id: keep the hash
            yield numbered


def check(recipe: Recipe, max_jobs: int = DEFAULT_MAX_JOBS) -> list[Problem]:
    """Problems only the whole matrix shows: its size, steps that round to zero, includes."""
    bound = upper_bound(recipe)
    if bound > max_jobs:
        sizes = " × ".join(str(len(v)) for v in recipe.axes.values())
        return [
            Problem(
                recipe.path,
                None,
                "",
                f"the matrix has up to {bound:,} jobs ({sizes} + {len(recipe.include)} "
                f"included), over the limit of {max_jobs:,}",
                "narrow the sweep, or raise the limit with --max-jobs",
            )
        ]
    problems: list[Problem] = []
    zero_step_pairs: set[tuple[float, int]] = set()
    for combination in combinations(recipe, problems):
        strength, steps = float(combination["strength"]), int(combination["steps"])
        nominal = nominal_steps(steps, strength, recipe.steps_mode)
        if strength > 0 and taken_steps(nominal, strength) == 0:
            zero_step_pairs.add((strength, steps))
    for strength, steps in sorted(zero_step_pairs):
        problems.append(
            Problem(
                recipe.path,
                recipe.lines.get("strength"),
                "strength",
                f"strength {strength} with {steps} steps takes int({steps} × {strength}) = 0 "
                "denoising steps",
                "use more steps, or `steps_mode: effective` so the denoiser takes exactly "
                "`steps`; strength 0 keeps the init image as it is",
            )
        )
    return problems
