"""What `model:` names: built-in models, local folders, hub ids in the cache, single files."""
