"""`python -m vtl` and the `vtl` command: the command-line interface (vtl/tools/cli.py).

Ctrl-C and SIGTERM are handled from the first line, before anything heavy is imported: a
signal that lands while the modules load (pydantic, cffi, trio: a good part of a second
on a loaded machine) is held until they are loaded, then ends the command with its one
line ("vtl bench: interrupted") and status (130, 143), as it would a moment later.  Only
the standard library's `signal` and `sys` are imported first.
"""

import signal
import sys
from types import FrameType

_held: list[int] = []


def _hold(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def _command() -> str:
    """`vtl <command>` as cli.main names it in its lines, from argv alone (argparse is not
    loaded yet when a signal is held)."""
    return next((f"vtl {a}" for a in sys.argv[1:] if not a.startswith("-")), "vtl")


def _stopped(signum: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # a second Ctrl-C does not cut the line
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    word, status = ("terminated", 143) if signum == signal.SIGTERM else ("interrupted", 130)
    try:
        sys.stderr.write(f"{_command()}: {word}\n")
        sys.stderr.flush()
    except OSError:
        pass
    return status


def _entry() -> int:
    old_int = signal.signal(signal.SIGINT, _hold)
    old_term = signal.signal(signal.SIGTERM, _hold)
    try:
        from vtl.tools.cli import main
    except ImportError as e:           # a dependency missing: say which, not a traceback
        sys.stderr.write(f"{_command()}: error: {e} (install the project's dependencies: "
                         "`make setup`, README.md)\n")
        return 1
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
    if _held:
        return _stopped(_held[0])
    try:
        return main()
    except KeyboardInterrupt:          # outside the command (parsing its arguments, say)
        return _stopped(signal.SIGINT)


def entry() -> int:
    """The command (`vtl` and `python -m vtl`); after Ctrl-C or SIGTERM it does not return
    (see _exit)."""
    status = _entry()
    if status in (130, 143):
        _exit(status)
    return status


def _exit(status: int) -> None:
    """Exit with `status`.  After Ctrl-C or SIGTERM the process ends at once (os._exit, the
    output flushed): CPython marks a KeyboardInterrupt that left a code object it ran through
    PyRun_* (as some C extensions' start-up does) as unhandled even when a caller caught it,
    and then kills itself with SIGINT at exit (status -2) instead of returning ours (130);
    every `with` has unwound by now, so only interpreter finalisation is skipped."""
    import os
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    sys.exit(entry())
