"""python -m noisekernels ...: the command line (noisekernels/cli.py)."""

import sys

from .cli import main

sys.exit(main())
