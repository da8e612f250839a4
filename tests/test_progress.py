"""Long commands show progress to a person at a terminal, and nothing extra to a script.

stderr is a real pseudo-terminal here (what a user's shell gives the command); stdout is a
pipe, as when the output is kept in a file, so the bar must be on stderr only."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading

import pytest

from tests.vtlrun import REPO, SAFETY_TIMEOUT, vtl_cli

pytestmark = pytest.mark.kvm

BENCH = ("bench", "--calls", "100", "--intercepts", "0", "--no-protection", "--lifecycle", "0",
         "--smp-calls", "0", "--restores", "0")
# Two attacks the VMM itself refuses (no hardening first: each run is a fraction of a second).
ATTACKS = ("attack", "--scenario", "vtl-return-from-vtl0", "unknown-hypercall")


def _with_terminal_stderr(*args: str) -> tuple[int, str, str]:
    """Run `vtl ARGS` with stderr on a pty; returns (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    got: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:        # EIO: the last writer closed the pty
                return
            if not chunk:
                return
            got.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run([sys.executable, "-m", "vtl", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=slave, timeout=SAFETY_TIMEOUT)
    finally:
        os.close(slave)
    reader.join(SAFETY_TIMEOUT)
    os.close(master)
    return p.returncode, p.stdout.decode(), b"".join(got).decode(errors="replace")


def test_attack_shows_a_bar_with_each_scenario_on_a_terminal() -> None:
    status, out, term = _with_terminal_stderr(*ATTACKS)
    assert status == 0, out + term
    assert "vtl attack: 0/2 scenarios" in term
    assert "vtl-return-from-vtl0" in term and "unknown-hypercall" in term
    assert "[1 blocked]" in term                  # outcomes so far, as they complete
    assert "scenarios |" not in out               # the table on stdout stays clean
    assert "2 attack scenarios: 2 blocked" in out


def test_bench_shows_its_steps_on_a_terminal() -> None:
    status, out, term = _with_terminal_stderr(*BENCH)
    assert status == 0, out + term
    assert "vtl bench: 0/4 steps" in term and "null VTL calls" in term and "C floor" in term
    assert "null call" in out and "steps |" not in out


def test_no_progress_with_json_even_on_a_terminal() -> None:
    status, out, term = _with_terminal_stderr(*BENCH, "--json")
    assert status == 0, term
    assert json.loads(out)["vtl_round_trip"]["median_ns"] > 0
    assert "steps" not in term


def test_no_progress_without_a_terminal() -> None:
    cp = vtl_cli(*ATTACKS)
    assert cp.returncode == 0, cp.stderr
    assert cp.stderr == ""
