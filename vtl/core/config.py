"""What a user asks for when launching a partition."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from vtl.abi import ABI
from vtl.core.layout import check_mem_size

Backend = Literal["memslot", "host_mapping", "rwx"]
KexecPolicy = Literal["teardown", "persist", "deny"]
Mode = Literal["vtl", "heki"]     # heki: one VM, the VMM as KVM with the Heki patches (vtl/modes/heki.py)


class PartitionConfig(BaseModel):
    vtl0_image: Path
    vtl1_image: Path | None = None          # None: VTL1 cannot be enabled
    mem_size: int = Field(default=256 << 20, description="guest memory in bytes (layout.MEM_RANGE)")
    # VPs (vtl run --vps): VP0 boots, VTL0 starts the APs (VTL_HC_START_VP; docs/smp.md).
    nr_vps: int = Field(default=1, ge=1, le=ABI.VTL1_MAX_VPS)
    scenario: str = ""
    param: int = Field(default=0, ge=0, lt=1 << 64)
    attr_backend: Backend | None = None     # None: the best one the host probes working
    # VTL1's allowlist (vtl run --trust): SHA-256 digests, 32 bytes each (vtl/core/trust.py).
    trust: list[bytes] = Field(default_factory=list, max_length=256)
    kexec_policy: KexecPolicy = "teardown"
    staged: Path | None = None              # a file placed in VTL0 memory (boot_info.staged_*)
    reset_on_triple_fault: bool = False     # a VTL0 triple fault is an emulated RESET
    mode: Mode = "vtl"                      # heki: boot_info announces VTL_BOOT_F_HEKI, no VTL1

    @field_validator("mem_size")
    @classmethod
    def _mem_in_range(cls, v: int) -> int:
        check_mem_size(v)          # raises LayoutError, the one message for the range
        return v
