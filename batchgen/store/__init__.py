"""A run folder on disk: atomic files, image files with their parameters, the manifest, the
run lock."""
