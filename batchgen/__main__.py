"""`python -m batchgen …`, which launchers such as `accelerate launch -m batchgen` use."""

from batchgen.cli import main

main()
