"""batchgen: reproducible, resumable Stable Diffusion img2img sweeps from YAML recipes.

`batchgen.run("recipe.yaml")` does what `batchgen run recipe.yaml` does; `load_recipe` and
`expand` give the recipe and its jobs without touching torch.
"""

from typing import Any

__version__ = "0.3.0"

__all__ = ["__version__", "expand", "load_recipe", "run"]


def __getattr__(name: str) -> Any:
    """Imported on first use: `batchgen plan` and `validate` start faster without the run
    loop's modules (grids, report, rich) that they never use."""
    if name == "run":
        from batchgen.running.runner import run

        return run
    if name == "expand":
        from batchgen.jobs.matrix import expand

        return expand
    if name == "load_recipe":
        from batchgen.recipe.load import load_recipe

        return load_recipe
    raise AttributeError(f"module 'batchgen' has no attribute {name!r}")
