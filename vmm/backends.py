"""Choosing the attribute backend for a VM: rwx where KVM has RWX attributes, else host
mapping where it probes working, else memslots.  Separate from vmm/memattr.py because
the choice runs a probe (vmm/probe.py), which itself builds on the backends."""

from __future__ import annotations

import functools

from vmm.errors import VmmError
from vmm.kvm import Vm
from vmm.memattr import (
    ALL,
    BACKEND_KINDS,
    AttributeBackend,
    HostMappingBackend,
    MemslotBackend,
    Range,
    RunMap,
    RwxBackend,
)
from vmm.memory import GuestMemory
from vmm.probe import probe_host_mapping
from vmm.uapi import KVM_CAP_MEMORY_ATTRIBUTES


def rwx_supported(vm: Vm) -> bool:
    """KVM_CAP_MEMORY_ATTRIBUTES advertises the VSM series' NR/NW/NX bits."""
    return (vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) & ALL) == ALL


@functools.cache
def host_mapping_works() -> bool:
    """Whether host-mapping protections are enforced here (probed once per process)."""
    try:
        return probe_host_mapping().present
    except VmmError:
        return False


def default_backend_kind(vm: Vm) -> str:
    """rwx where KVM has RWX attributes, else host_mapping if it probes working, else memslot."""
    if rwx_supported(vm):
        return "rwx"
    return "host_mapping" if host_mapping_works() else "memslot"


def make_backend(kind: str | None, vm: Vm, mem: GuestMemory, ranges: list[Range]) -> AttributeBackend:
    """The attribute backend for `vm`, which must not map `ranges` yet: the backend maps
    them (unrestricted) itself, on the main mapping (rwx, memslot) or on a new alias of
    `mem` (host_mapping).  `kind` None picks `default_backend_kind(vm)`."""
    chosen = default_backend_kind(vm) if kind is None else kind
    if chosen not in BACKEND_KINDS:
        raise VmmError(f"unknown attribute backend {kind!r}; choose one of {', '.join(BACKEND_KINDS)}")
    if chosen == "memslot":
        return MemslotBackend(vm, mem, ranges)
    if chosen == "host_mapping":
        return HostMappingBackend(vm, mem, ranges)
    if not rwx_supported(vm):
        raise VmmError("the rwx backend needs KVM_SET_MEMORY_ATTRIBUTES with NR/NW/NX "
                       f"(KVM_CAP_MEMORY_ATTRIBUTES = {vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES):#x} "
                       "here); use host_mapping or memslot")
    RunMap(ranges, mem.size)            # the same validation as the other backends
    for gpa, size in ranges:
        if size:
            vm.map_memory(mem, gpa, size)
    return RwxBackend(vm, mem.size, ranges=[(g, s) for g, s in ranges if s])
