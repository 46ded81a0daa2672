"""batchgen: reproducible, resumable Stable Diffusion img2img sweeps from YAML recipes.

`batchgen.run("recipe.yaml")` does what `batchgen run recipe.yaml` does; `load_recipe` and
`expand` give the recipe and its jobs without touching torch.
"""

__version__ = "0.2.0"

from batchgen.matrix import expand  # noqa: E402
from batchgen.recipe import load_recipe  # noqa: E402
from batchgen.runner import run  # noqa: E402

__all__ = ["__version__", "expand", "load_recipe", "run"]
