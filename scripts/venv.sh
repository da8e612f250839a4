#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs the project into
# it, editable, with its test and plot extras.
#
#   scripts/venv.sh PYTHON VENV
#
# Why a venv: Debian's /usr/bin/python3 is "externally managed" (PEP 668), so `pip
# install` into it is refused; a venv works the same with Debian's Python and with any
# other CPython 3.11+.  The venv is made anew when it was made from another interpreter
# than PYTHON (for example after `make setup PYTHON=/usr/bin/python3`), or is broken.
set -euo pipefail
python=${1:?usage: venv.sh PYTHON VENV}
venv=${2:?usage: venv.sh PYTHON VENV}

if ! command -v "$python" >/dev/null; then
    echo "venv: no Python interpreter '$python' (set PYTHON=/path/to/python3.11+)" >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "venv: $python is $("$python" -V 2>&1); the project needs CPython 3.11 or newer" >&2
    exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "venv: $python has no venv/ensurepip module (on Debian: apt-get install python3-venv)" >&2
    exit 1
fi

# The interpreter the venv must come from, by its real path, so that a pyenv shim and the
# binary it runs count as one.
want=$("$python" -c 'import os, sys; print(os.path.realpath(sys.executable))')
marker="$venv/.base-python"
if [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$want" ]] \
        && "$venv/bin/python" -c 'import pip' 2>/dev/null; then
    : # the venv is there and from the right interpreter
else
    [[ -e "$venv" ]] && echo "venv: recreating $venv (made from another interpreter, or broken)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    printf '%s\n' "$want" > "$marker"
fi

# editable_mode=compat: the venv finds the project through a plain path line in a .pth
# file.  The default (a finder module imported by site.py at every start) costs ~50 ms of
# imports before `vtl` runs, a window in which Ctrl-C gets Python's traceback instead of
# the command's one line (tests/test_robustness.py, test_startup_signals.py).
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,plot]' \
    --config-settings editable_mode=compat
echo "venv: $venv ready ($("$venv/bin/python" -V), from $want); the CLI is $venv/bin/vtl"
