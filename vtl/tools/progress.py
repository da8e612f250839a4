"""Progress of long commands (`vtl attack`, `vtl bench`) on a terminal.

A bar on stderr (tqdm) while the work runs, gone when it ends; nothing at all when stderr
is not a terminal or the command prints JSON, so that scripts and logs see only the
result.  The work itself knows nothing of bars: it calls a `Step` with the name of what
it starts next (and, when a piece of work has just ended, a short note of its outcome).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

# step(name): the work starts `name`; step(name, note): `name` just ended with `note`.
Step = Callable[..., None]


def _quiet(name: str, note: str = "") -> None:
    pass


QUIET: Step = _quiet


def wanted(json_output: bool, stream: TextIO | None = None) -> bool:
    """Show progress only to a person: stderr is a terminal and the output is not JSON."""
    s = stream if stream is not None else sys.stderr
    try:
        return not json_output and s.isatty()
    except (AttributeError, ValueError):   # a closed or unusual stream
        return False


@contextmanager
def bar(total: int, what: str, unit: str, enabled: bool) -> Iterator[Step]:
    """A progress bar over `total` steps of `unit`; yields the Step to call."""
    if not enabled or total <= 0:
        yield QUIET
        return
    from tqdm import tqdm  # only on a terminal: scripts never pay for the import

    notes: dict[str, int] = {}
    # The size once, from the terminal; 80x24 where it reports none, as a fresh pty does (tqdm
    # itself would take 0 rows and hide the bar).
    size = shutil.get_terminal_size()
    with tqdm(total=total, desc=what, unit=unit, file=sys.stderr, leave=False, ncols=size.columns,
              nrows=size.lines,
              bar_format="{desc}: {n_fmt}/{total_fmt} {unit} |{bar}| {elapsed}{postfix}") as t:
        started = False

        def step(name: str, note: str = "") -> None:
            nonlocal started
            if note:
                notes[note] = notes.get(note, 0) + 1
                t.update(1)
                started = False
            elif started:   # the previous step ended without a note
                t.update(1)
            started = not note
            counts = ", ".join(f"{n} {k}" for k, n in notes.items())
            t.set_postfix_str((f"[{counts}] " if counts else "") + ("" if note else name), refresh=True)

        yield step
