"""What a user asks for when launching a partition."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

Backend = Literal["memslot", "host_mapping", "rwx"]


class PartitionConfig(BaseModel):
    vtl0_image: Path
    vtl1_image: Path | None = None          # None: VTL1 cannot be enabled
    mem_size: int = Field(default=256 << 20, description="guest memory in bytes")
    nr_vps: int = Field(default=1, ge=1, le=1)  # APs are not started yet
    scenario: str = ""
    param: int = Field(default=0, ge=0, lt=1 << 64)
    attr_backend: Backend | None = None     # None: the best one the host probes working
