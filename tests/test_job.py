"""Job ids are the manifest's keys: a version of batchgen that computed them differently would
find none of an existing run folder's images done, and make them all again."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from batchgen.jobs.job import InitImage, Job

# Spelled out here rather than shared with other tests' jobs: the pinned ids below must not
# move when another test edits its job.
INIT = InitImage(Path("/x/fire.png"), "pictures/fire.png", "ab" * 32, 512, 512)
JOB = Job(
    index=1,
    init_image=INIT,
    prompt="cheery open fire, “photograph” ☕",  # non-ASCII: written as is, not escaped
    negative_prompt="blurry",
    strength=0.75,
    steps=50,
    steps_mode="nominal",
    cfg=7.5,
    seed=1592514025,
    scheduler="k_lms",
    width=512,
    height=512,
    fit=False,
    model="builtin:tiny@0123456789abcdef",
    dtype="float16",
)


def test_job_ids_are_the_ones_earlier_versions_computed() -> None:
    # Pinned from batchgen 0.3.0; without variations, 0.2 computed the same id (checked).
    assert JOB.id == "fbdaab98dd28c7bc"
    varied = replace(JOB, variation_seed=123, variation_amount=0.1, with_variations=((7, 0.2),))
    assert varied.id == "8d5dca6a33428b4e"


def test_ids_ignore_what_does_not_change_pixels() -> None:
    renamed = replace(JOB, index=99, model_name="tiny", fit=True)
    assert renamed.id == JOB.id
    assert replace(JOB, scheduler="LMSDiscreteScheduler").id == JOB.id  # the same sampler
    assert replace(JOB, seed=1).id != JOB.id
