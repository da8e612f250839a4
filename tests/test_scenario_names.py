"""An unknown `--scenario`: one line with the nearest names (difflib), exit 2 (a usage
error), before KVM is touched.  It used to print all 63 names and exit 1."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtlrun import vtl_cli


@pytest.mark.parametrize("name,suggested", [
    ("boto", ["'boot'"]),
    ("harden2", ["'harden'"]),
    ("kexec-persit", ["'kexec-persist'", "'kexec-after-persist'"]),
    ("nosuch", []),
])
def test_unknown_scenario_suggests_the_nearest_in_one_line(guest_images: tuple[Path, Path], name: str,
                                                           suggested: list[str]) -> None:
    # No KVM needed: the name is checked against the image before any VM exists.
    cp = vtl_cli("run", "--scenario", name, env={"VTL_KVM_DEVICE": "/nonexistent/kvm"})
    assert cp.returncode == 2, cp.stderr
    err = cp.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"scenario {name!r} is not in" in err and "`vtl scenarios` lists all" in err
    assert all(s in err for s in suggested), err
    assert ("did you mean" in err) == bool(suggested), err
    assert "vtl-call-state" not in err and "reset-triple-fault" not in err      # not the whole list


def test_attack_scenario_typo_suggests_the_attack_and_runs_nothing(guest_images: tuple[Path, Path]) -> None:
    cp = vtl_cli("attack", "--scenario", "write-kernel-txt", env={"VTL_KVM_DEVICE": "/nonexistent/kvm"})
    assert cp.returncode == 2, cp.stderr
    err = cp.stderr.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'write-kernel-text'?" in err, err
