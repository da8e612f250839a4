"""While `vtl` starts: Ctrl-C (and SIGTERM) exit 130 (143) with the one line, wherever the
signal lands.  Deterministic: the signal is sent from inside the import of a chosen
module (an import hook in the child), not after a guessed delay; before, one landing in
an import exited 130 without the line.  A missing dependency is one line too."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.vtlrun import REPO

CHILD = """
import os, runpy, signal, sys
target, signum = sys.argv[1], int(sys.argv[2])
class SignalInImport:
    def find_spec(self, name, path=None, target_=None):
        if name == target:
            os.kill(os.getpid(), signum)
        return None
sys.meta_path.insert(0, SignalInImport())
sys.argv = ["vtl", "bench", "--calls", "300000", "--intercepts", "0", "--no-protection"]
runpy.run_module("vtl", run_name="__main__", alter_sys=True)
"""

# cli's own imports (held until they finish), then the command's (inside cli.main).
MODULES = ["argparse", "pydantic", "cffi", "vtl.core.images", "vtl.run.result", "vtl.tools.bench",
           "trio"]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_the_imports_is_its_status_and_one_line(module: str, sig: int, status: int,
                                                                 word: str) -> None:
    cp = subprocess.run([sys.executable, "-c", CHILD, module, str(int(sig))], cwd=REPO, text=True,
                        capture_output=True, timeout=300)
    assert cp.returncode == status, (cp.returncode, cp.stderr)
    assert cp.stderr.strip() == f"vtl bench: {word}", cp.stderr


MISSING = """
import runpy, sys
class Missing:
    def find_spec(self, name, path=None, target=None):
        if name == "pydantic":
            raise ModuleNotFoundError("No module named 'pydantic'")
        return None
sys.meta_path.insert(0, Missing())
sys.argv = ["vtl", "caps"]
runpy.run_module("vtl", run_name="__main__", alter_sys=True)
"""


def test_a_missing_dependency_is_one_line_not_a_traceback() -> None:
    cp = subprocess.run([sys.executable, "-c", MISSING], cwd=REPO, text=True, capture_output=True,
                        timeout=300)
    assert cp.returncode == 1
    assert cp.stderr.strip().splitlines() == [
        "vtl caps: error: No module named 'pydantic' (install the project's dependencies: "
        "`make setup`, README.md)"]
