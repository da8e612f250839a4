"""`python -m vtl`: the command-line interface (vtl/tools/cli.py)."""

import sys

from vtl.tools.cli import main

sys.exit(main())
