"""Shared fixtures.

`@pytest.mark.kvm` tests need a usable /dev/kvm ($VTL_KVM_DEVICE if set), usable as the
VMM decides it: it opens and answers KVM_GET_API_VERSION (a file that exists but is no
KVM makes them skip, with the one sentence why).  Where it is usable they must run: a
skipped KVM test then fails the session (so CI cannot go green by skipping).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from vmm.kvm import kvm_unavailable_reason

REPO = Path(__file__).resolve().parent.parent
KVM_REASON = kvm_unavailable_reason()
_skipped_kvm: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KVM_REASON is None:
        return
    skip = pytest.mark.skip(reason=f"needs /dev/kvm: {KVM_REASON}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "kvm" in report.keywords and KVM_REASON is None:
        _skipped_kvm.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_kvm:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # type: ignore[no-untyped-def]
    if _skipped_kvm:
        terminalreporter.write_line(
            f"ERROR: /dev/kvm is usable but {len(_skipped_kvm)} KVM test(s) were skipped: "
            + ", ".join(_skipped_kvm), red=True)
    elif KVM_REASON:
        terminalreporter.write_line(f"note: KVM tests skipped: {KVM_REASON}", yellow=True)


@pytest.fixture(scope="session")
def guest_images() -> tuple[Path, Path]:
    """The built-in guest images, built with `make guests` if missing."""
    vtl0 = REPO / "guest_vtl0" / "build" / "vtl0.elf"
    vtl1 = REPO / "guest_vtl1" / "build" / "vtl1.elf"
    if not (vtl0.exists() and vtl1.exists()):
        subprocess.run(["make", "-C", str(REPO), "guests"], check=True, capture_output=True)
    return vtl0, vtl1
