"""A `Recipe` becomes `Job`s, the jobs a plan of what is left, batches, and shards."""
