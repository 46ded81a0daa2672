"""batchgen: reproducible, resumable Stable Diffusion img2img sweeps from YAML recipes."""

__version__ = "0.1.0"
