"""Guest memory has one range (vtl/core/layout.py, from vtl_abi.h's VTL_MEM_MIN/MAX): the
parser, PartitionConfig and both guests agree on it, and --help shows it.  Before, the
parser took 1..1048576 MiB, the VMM 64..5120 and the guests' page tables 4 GiB: `--mem
5120` passed the VMM's checks and ended with the guest's exit status 2, the usage status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.vtlrun import SAFETY_TIMEOUT, vtl_cli
from vtl.abi import ABI
from vtl.core import layout
from vtl.core.config import PartitionConfig
from vtl.core.layout import LayoutError


def test_the_range_is_the_abi_s_and_the_boot_tables_hold_it() -> None:
    assert (layout.MEM_MIN, layout.MEM_MAX) == (ABI.VTL_MEM_MIN, ABI.VTL_MEM_MAX) == (64 << 20, 4 << 30)
    assert layout.MEM_RANGE == "64 to 4096 MiB in steps of 2 MiB"
    cp = vtl_cli("run", "--help")
    assert "64 to 4096 MiB in steps of 2 MiB" in " ".join(cp.stdout.split())


@pytest.mark.parametrize("mib", [62, 63, 65, 4098, 5120, -2, 0])
def test_outside_the_range_is_a_usage_error_in_the_parser_and_the_config(mib: int) -> None:
    cp = vtl_cli("run", "--mem", str(mib))
    assert cp.returncode == 2, cp.stderr
    assert f"guest memory must be 64 to 4096 MiB in steps of 2 MiB (not {mib} MiB)" in cp.stderr
    assert "Traceback" not in cp.stderr
    with pytest.raises(LayoutError, match="64 to 4096 MiB"):
        PartitionConfig(vtl0_image=Path("x.elf"), mem_size=mib << 20)


@pytest.mark.kvm
@pytest.mark.parametrize("mib", [64, 4096])
def test_both_edges_boot_on_kvm(guest_images: tuple[Path, Path], mib: int) -> None:
    """VTL0 and VTL1 map all of it (each kernel's own identity map) and VTL1 enables."""
    cp = vtl_cli("run", "--mem", str(mib), "--json", "--quiet", "--timeout", "120", timeout=SAFETY_TIMEOUT)
    assert cp.returncode == 0, cp.stderr
    doc = json.loads(cp.stdout)
    assert doc["status"] == 0 and doc["reason"] == "guest_exit" and doc["vtl1_enabled"], doc
