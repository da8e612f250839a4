"""Writing a matplotlib figure as `--png FILE`: through vmm/files.py's open_output (never an
input, a FIFO or stdout's file), any write failure one OutputFileError line, and the figure
closed either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmm.files import OutputFileError, open_output


def save_png(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with open_output(path, "--png", "wb") as out:
            fig.savefig(out, format="png")
    except OSError as e:
        raise OutputFileError(f"cannot write --png {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
