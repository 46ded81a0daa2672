"""The tables `batchgen schedulers` and `batchgen models` print: what a recipe can name."""

from __future__ import annotations

import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from batchgen.engine.schedulers import DIFFUSERS_SCHEDULERS, FLOW_SCHEDULERS, INVOKEAI_SCHEDULERS
from batchgen.models.source import hub_cache_dir, list_models


def print_schedulers() -> None:
    """Every name `scheduler:` takes, InvokeAI's first, with its class, A1111 name and the
    families it is for."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("name", "diffusers class", "AUTOMATIC1111 name", "for"):
        table.add_column(column)
    short_names = INVOKEAI_SCHEDULERS | FLOW_SCHEDULERS
    named = {spec.class_name for spec in short_names.values()}
    unnamed = {name: spec for name, spec in DIFFUSERS_SCHEDULERS.items() if name not in named}
    for name, spec in (short_names | unnamed).items():
        families = "SD 3 (flow matching)" if spec.flow else "SD 1.x/2.x, SDXL"
        table.add_row(name, spec.class_name, spec.a1111_name, families)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        "Every diffusers class above can also be named directly, e.g. `scheduler: "
        "LMSDiscreteScheduler`; it is the same job as `k_lms`."
    )


def print_models(folders: list[Path]) -> None:
    """The builtins, the hub cache's pipelines and the pipelines and single files in `folders`,
    as `model:` names them, each with its family (or why batchgen would not render it)."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("model:", "kind", "path", "family"):
        table.add_column(column, overflow="fold")
    for listing in list_models(folders):
        table.add_row(listing.reference, listing.kind, str(listing.path), listing.family)
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    console.print(f"hub cache searched: {hub_cache_dir()}")
