"""The report channel from the guest's side (scenario report-limits): what guest_lib's
helpers put in a record, and which records the VMM refuses, with which status."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vtlrun import run_scenario
from vtl.abi import ABI

pytestmark = pytest.mark.kvm

# STATUS name -> the status the guest must have received for that report
REFUSED = {
    "kind_0": ABI.VTL_E_INVALID_ARG,
    "kind_unknown": ABI.VTL_E_INVALID_ARG,
    "name_unterminated": ABI.VTL_E_INVALID_ARG,
    "text_unterminated": ABI.VTL_E_INVALID_ARG,
    "bytes_too_many": ABI.VTL_E_INVALID_ARG,
    "stamps_too_many": ABI.VTL_E_INVALID_ARG,
    "data_in_vtl1": ABI.VTL_E_OUT_OF_RANGE,
    "record_in_vtl1": ABI.VTL_E_OUT_OF_RANGE,
    "record_past_memory": ABI.VTL_E_OUT_OF_RANGE,
    "data_no_read": ABI.VTL_E_OUT_OF_RANGE,
    "record_no_read": ABI.VTL_E_OUT_OF_RANGE,
}


def test_report_helpers_and_refusals(guest_images: tuple[Path, Path]) -> None:
    run = run_scenario(guest_images, "report-limits")
    assert run.passed(), "\n".join(run.console[-15:])
    status = {r.name: r.value for r in run.of_kind("status") if r.vtl == 0}
    # A name and a text longer than their fields arrive cut, NUL-terminated, values intact.
    long_name = "long-name-0123456789abcdefghijklmnopqrstuvwxyz"
    long_text = "long-text-0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz"
    assert status["long_report"] == [ABI.VTL_HC_REPORT, ABI.VTL_OK, 0, 0]
    cut = run.report("value", long_name[:31])
    assert (cut.vtl, cut.text, cut.value) == (0, long_text[:63], [7, 1, 2, 3])
    # The data is copied during the call: the guest overwrote it right after.
    assert status["bytes_max"][1] == ABI.VTL_OK
    assert run.report("bytes", "bytes_max").data == b"\xA5" * ABI.VTL_REPORT_MAX_BYTES
    # Each malformed or unreadable record got its status, and none was recorded.
    for key, want in REFUSED.items():
        assert status[key] == [ABI.VTL_HC_REPORT, want, 0, 0], key
    assert not [r for r in run.reports if r.name.startswith(("must-not", "nnnn"))]
    assert run.report("status", "protect_no_read").value[1] == ABI.VTL_OK
    # The refusals never stopped the run: the guest's verdict arrived after them.
    assert run.reports[-1].kind == "result" and run.reports[-1].name == "report-limits"
