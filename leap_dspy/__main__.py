"""`python -m leap_dspy`: the CLI, as the experiment runner starts each run."""

from leap_dspy.cli import main

main()
