"""`python -m vtl`: the command-line interface (vtl/tools/cli.py)."""

import sys

try:
    from vtl.tools.cli import main
except KeyboardInterrupt:          # Ctrl-C while the modules load: no traceback either
    sys.exit(130)

sys.exit(main())
