"""`python -m mlkv`: the same command as the `mlkv` console script."""

import sys

from .cli import main

sys.exit(main())
