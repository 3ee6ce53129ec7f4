"""``python -m lockgen`` runs the lockgen command line."""

import sys

from lockgen.cli import main

sys.exit(main())
