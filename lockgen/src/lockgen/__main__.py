"""``python -m lockgen`` runs the lockgen command line."""

from lockgen.cli import run

run()
