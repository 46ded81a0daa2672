"""One module per model family: its components, its conditioning, its model call, its latents.
The table of families, readable without torch, is models/families.py."""
