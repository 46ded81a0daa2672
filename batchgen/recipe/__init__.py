"""A recipe file becomes a `Recipe`: its schema, loading and resolving, and the problems found."""
