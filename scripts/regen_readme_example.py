"""Regenerate the README's `vtl run` worked example from a fresh run (tests/test_readme.py
checks it).  Usage: .venv/bin/python scripts/regen_readme_example.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    cp = subprocess.run([sys.executable, "-m", "vtl", "run"], cwd=REPO, text=True, capture_output=True)
    if cp.returncode != 0:
        print(cp.stderr, file=sys.stderr)
        return 1
    readme = REPO / "README.md"
    lines = readme.read_text().split("\n")
    start = lines.index("    $ vtl run") + 1
    end = start
    while end < len(lines) and (not lines[end] or lines[end].startswith("    ")) \
            and not lines[end].startswith("    $ "):
        end += 1
    while end > start and not lines[end - 1]:
        end -= 1
    fresh = ["    " + line if line else "" for line in cp.stdout.rstrip("\n").split("\n")]
    lines[start:end] = fresh
    readme.write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
