"""A KVM device that is not KVM ($VTL_KVM_DEVICE, e.g. /dev/null): every command says so in
one sentence, and the KVM tests skip (conftest probes KVM_GET_API_VERSION, not existence)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vtlrun import REPO, SAFETY_TIMEOUT, vtl_cli
from vmm.errors import KvmUnavailable
from vmm.kvm import Kvm, kvm_unavailable_reason

SENTENCE = "is not a KVM device (KVM_GET_API_VERSION: ENOTTY)"


def _not_kvm(tmp_path: Path, kind: str) -> str:
    if kind == "regular":
        f = tmp_path / "kvm"
        f.write_bytes(b"")
        return str(f)
    if kind == "fifo":
        f = tmp_path / "kvm"
        os.mkfifo(f)
        return str(f)
    return os.devnull


@pytest.mark.parametrize("kind", ["chardev", "regular", "fifo"])
def test_a_device_that_is_not_kvm_is_one_sentence(tmp_path: Path, kind: str) -> None:
    path = _not_kvm(tmp_path, kind)
    assert kvm_unavailable_reason(path) == f"{path} {SENTENCE}"
    with pytest.raises(KvmUnavailable, match="not a KVM device"):
        Kvm(path)
    for cmd in (("run",), ("caps",), ("bench", "--calls", "100")):
        cp = vtl_cli(*cmd, env={"VTL_KVM_DEVICE": path}, timeout=SAFETY_TIMEOUT)
        assert cp.returncode == 1, (cmd, cp.stderr)
        err = cp.stderr.strip()
        assert err.endswith(f"{path} {SENTENCE}") and len(err.splitlines()) == 1, (cmd, err)
        assert "0xae00" not in err and "Traceback" not in cp.stdout + err


def test_kvm_tests_skip_when_the_device_is_not_kvm() -> None:
    cp = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "tests/test_vmm_vm.py"], cwd=REPO, text=True, capture_output=True,
                        timeout=SAFETY_TIMEOUT, env={**os.environ, "VTL_KVM_DEVICE": os.devnull})
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "skipped" in cp.stdout and "failed" not in cp.stdout and "error" not in cp.stdout.lower()
    assert f"KVM tests skipped: {os.devnull} {SENTENCE}" in cp.stdout
