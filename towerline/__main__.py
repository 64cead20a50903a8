"""`python -m towerline ...`: the CLI, e.g. where the console script is not on PATH."""

from towerline.cli import main

main()
