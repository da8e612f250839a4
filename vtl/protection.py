"""VTL0's memory attributes, owned by VTL1 (VTL_HC_MODIFY_VTL_PROTECTION).

The per-page attribute map (NR/NW/NX, 0 = unrestricted) is kept here and applied to
VTL0's KVM VM through a vmm.memattr backend: read-only/unmapped memslots on mainline
KVM, KVM_SET_MEMORY_ATTRIBUTES where the VSM series is present.  Requests come from
VTL1 and are untrusted like any guest input: each is validated entry by entry, and an
entry is either applied whole or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm import uapi as u
from vmm.kvm import Vm
from vmm.memattr import ALL, NR, AttributeBackend, ExhaustedError, MemslotBackend, RwxBackend
from vmm.memory import PAGE_SIZE, GuestMemory
from vtl.abi import ABI, abi_ffi, abi_struct
from vtl.layout import Layout

ENTRY_PAGE, ENTRY_RANGE = 8, abi_ffi.sizeof("struct vtl_gpa_range")
REQUEST_SIZE = abi_ffi.sizeof("struct vtl_protect_request")


def rwx_supported(vm: Vm) -> bool:
    return (vm.check_extension(u.KVM_CAP_MEMORY_ATTRIBUTES) & ALL) == ALL


@dataclass
class Outcome:
    status: int
    next_index: int
    pages: int = 0
    ranges: int = 0
    ops: int = 0
    reason: str = ""
    attributes: int = 0


class Vtl0Protection:
    def __init__(self, vm: Vm, mem: GuestMemory, layout: Layout, backend: str | None = None) -> None:
        self.mem, self.layout = mem, layout
        kind = backend or ("rwx" if rwx_supported(vm) else "memslot")
        self.backend: AttributeBackend
        if kind == "rwx":
            for gpa, size in layout.vtl0_ranges():
                vm.map_memory(mem, gpa, size)
            self.backend = RwxBackend(vm, layout.mem_size)
        else:
            self.backend = MemslotBackend(vm, mem, layout.vtl0_ranges())
        self.map = bytearray(layout.mem_size // PAGE_SIZE)   # attributes per VTL0 page

    @property
    def kind(self) -> str:
        return self.backend.name

    def get(self, gpa: int) -> int:
        return self.map[gpa // PAGE_SIZE] if 0 <= gpa < self.layout.mem_size else 0

    def enforced(self, attrs: int) -> int:
        """The part of `attrs` KVM enforces on this backend (NX: page tables, see caps)."""
        return self.backend.enforceable(attrs)

    # --- the hypercall ----------------------------------------------------------------
    def modify(self, request_gpa: int, caller_vtl: int) -> Outcome:
        if caller_vtl != 1:
            return Outcome(int(ABI.VTL_E_ACCESS_DENIED), 0, reason="only VTL1 sets VTL0's protections")
        # Request and list must be VTL1's own memory: VTL0 cannot change them underneath.
        if not self._inside_vtl1(request_gpa, REQUEST_SIZE):
            return Outcome(int(ABI.VTL_E_INVALID_ARG), 0, reason="request is not in VTL1 memory")
        req = abi_struct(self.mem, "struct vtl_protect_request", request_gpa)
        target, attrs, flags, count = req.target_vtl, req.attributes, req.flags, req.count
        start, list_gpa = req.start_index, req.list_gpa
        if target >= caller_vtl:
            return Outcome(int(ABI.VTL_E_ACCESS_DENIED), start,
                           reason=f"VTL{caller_vtl} may only protect a lower VTL, not VTL{target}")
        if attrs & ~ALL or not (attrs & NR == 0 or attrs == ALL) or flags & ~ABI.VTL_PROTECT_F_RANGES:
            return Outcome(int(ABI.VTL_E_INVALID_ARG), start,
                           reason=f"invalid attributes {attrs:#x} or flags {flags:#x}")
        esize = ENTRY_RANGE if flags & ABI.VTL_PROTECT_F_RANGES else ENTRY_PAGE
        if start > count:
            return Outcome(int(ABI.VTL_E_INVALID_ARG), start, reason="start_index beyond count")
        if not self._inside_vtl1(list_gpa, count * esize):
            return Outcome(int(ABI.VTL_E_INVALID_ARG), start,
                           reason=f"list of {count} entries at {list_gpa:#x} is not in VTL1 memory")
        end = min(count, start + ABI.VTL_PROTECT_MAX_PER_CALL)
        raw = self.mem.read(list_gpa + start * esize, (end - start) * esize)
        # Validate and coalesce into runs of adjacent pages, in list order.
        runs: list[list[int]] = []      # [gpa, pages, first index]
        status, reason, stop = int(ABI.VTL_OK), "", end
        for i in range(end - start):
            gpa = int.from_bytes(raw[i * esize:i * esize + 8], "little")
            pages = int.from_bytes(raw[i * esize + 8:i * esize + 16], "little") if esize == ENTRY_RANGE else 1
            status, reason = self._check(gpa, pages)
            if status != ABI.VTL_OK:
                stop = start + i
                break
            if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == gpa:
                runs[-1][1] += pages
            else:
                runs.append([gpa, pages, start + i])
        ops0 = self.backend.ops
        applied = 0
        for gpa, pages, first in runs:
            try:
                self.backend.set_range(gpa, pages * PAGE_SIZE, attrs)
            except ExhaustedError as e:
                return Outcome(int(ABI.VTL_E_NO_RESOURCES), first, applied, len(runs),
                               self.backend.ops - ops0, str(e))
            lo = gpa // PAGE_SIZE
            self.map[lo:lo + pages] = bytes([attrs]) * pages
            applied += pages
        return Outcome(status, stop, applied, len(runs), self.backend.ops - ops0, reason, attrs)

    def _check(self, gpa: int, pages: int) -> tuple[int, str]:
        lay = self.layout
        if gpa % PAGE_SIZE:
            return int(ABI.VTL_E_MISALIGNED), f"GPA {gpa:#x} is not page aligned"
        if pages == 0 or pages > lay.mem_size // PAGE_SIZE or gpa + pages * PAGE_SIZE > lay.mem_size:
            return int(ABI.VTL_E_OUT_OF_RANGE), f"{pages} pages at {gpa:#x} run past guest memory"
        if lay.in_vtl1(gpa, pages * PAGE_SIZE):
            return int(ABI.VTL_E_OVERLAPS_VTL1), f"{pages} pages at {gpa:#x} touch VTL1's region"
        return int(ABI.VTL_OK), ""

    def _inside_vtl1(self, gpa: int, length: int) -> bool:
        lay = self.layout
        return length >= 0 and lay.vtl1_base <= gpa and gpa + length <= lay.vtl1_end

    # --- views --------------------------------------------------------------------------
    def runs(self) -> list[tuple[int, int, int]]:
        """(start, end, attrs) runs of the whole guest-physical space, VTL1 region included
        as attrs -1 (never mapped in VTL0's VM)."""
        out: list[tuple[int, int, int]] = []
        lay = self.layout
        for i, a in enumerate(self.map):
            gpa = i * PAGE_SIZE
            val = -1 if lay.in_vtl1(gpa) else a
            if out and out[-1][2] == val and out[-1][1] == gpa:
                out[-1] = (out[-1][0], gpa + PAGE_SIZE, val)
            else:
                out.append((gpa, gpa + PAGE_SIZE, val))
        return out

