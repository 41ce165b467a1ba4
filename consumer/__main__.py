"""`python -m consumer ...` runs the `absence-sync` command (for when the
console script is not on the PATH)."""

from consumer.cli import main

main(prog_name="absence-sync")
