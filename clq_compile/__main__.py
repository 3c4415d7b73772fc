"""`python -m clq_compile`: the command line (see clq_compile/cli.py)."""

import sys

from .cli import main

sys.exit(main())
