"""VTL0's memory attributes, owned by VTL1 (VTL_HC_MODIFY_VTL_PROTECTION).

The per-page attribute map (NR/NW/NX, 0 = unrestricted) is the partition's
(`Partition.vtl0_attrs`) and is applied to VTL0's KVM VM through the partition's
vmm.memattr backend.  Requests come from VTL1 and are untrusted like any guest
input: each is validated entry by entry, and an entry is either applied whole or
not at all.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.memattr import ALL, NR, ExhaustedError
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI, abi_ffi, abi_struct
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl

ENTRY_PAGE, ENTRY_RANGE = 8, abi_ffi.sizeof("struct vtl_gpa_range")
REQUEST_SIZE = abi_ffi.sizeof("struct vtl_protect_request")


@dataclass
class ProtectionResult:
    status: int
    next_index: int
    pages: int = 0
    ranges: int = 0
    ops: int = 0
    reason: str = ""
    attributes: int = 0


class Vtl0Protection:
    def __init__(self, partition: Partition) -> None:
        self.p = partition
        self.mem, self.layout = partition.mem, partition.layout

    # --- the hypercall ----------------------------------------------------------------
    def modify(self, request_gpa: int, caller_vtl: Vtl) -> ProtectionResult:
        if caller_vtl != Vtl.VTL1:
            return ProtectionResult(int(ABI.VTL_E_ACCESS_DENIED), 0,
                                    reason="only VTL1 sets VTL0's protections")
        # Request and list must be VTL1's own memory: VTL0 cannot change them underneath.
        if not self._inside_vtl1(request_gpa, REQUEST_SIZE):
            return ProtectionResult(int(ABI.VTL_E_INVALID_ARG), 0, reason="request is not in VTL1 memory")
        req = abi_struct(self.mem, "struct vtl_protect_request", request_gpa)
        target, attrs, flags, count = req.target_vtl, req.attributes, req.flags, req.count
        start, list_gpa = req.start_index, req.list_gpa
        if target >= int(caller_vtl):
            return ProtectionResult(int(ABI.VTL_E_ACCESS_DENIED), start,
                           reason=f"VTL{int(caller_vtl)} may only protect a lower VTL, not VTL{target}")
        if attrs & ~ALL or not (attrs & NR == 0 or attrs == ALL) or flags & ~ABI.VTL_PROTECT_F_RANGES:
            return ProtectionResult(int(ABI.VTL_E_INVALID_ARG), start,
                           reason=f"invalid attributes {attrs:#x} or flags {flags:#x}")
        esize = ENTRY_RANGE if flags & ABI.VTL_PROTECT_F_RANGES else ENTRY_PAGE
        if start > count:
            return ProtectionResult(int(ABI.VTL_E_INVALID_ARG), start, reason="start_index beyond count")
        if not self._inside_vtl1(list_gpa, count * esize):
            return ProtectionResult(int(ABI.VTL_E_INVALID_ARG), start,
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
        with self.p.attr_lock:          # VTL1 on another VP may change them at the same time
            return self._apply(runs, attrs, status, stop, reason)

    def _apply(self, runs: list[list[int]], attrs: int, status: int, stop: int,
               reason: str) -> ProtectionResult:
        backend = self.p.backend
        ops0 = backend.ops
        applied = 0
        amap = self.p.vtl0_attrs
        # each page's restrictions before, with the new ones added (NR only with NW and NX)
        union = bytes(ALL if (a | attrs) & NR else (a | attrs) & ALL for a in range(256))
        for gpa, pages, first in runs:
            # Another VP's VTL0 runs meanwhile, and its exits are judged by this map (vtl/run/
            # exits.py): while the backend changes, the map holds every restriction of before
            # and after, so that an access the backend already stops is never taken for a
            # fault of unbacked memory (docs/smp.md, "Cross-VP attacks").
            lo = gpa // PAGE_SIZE
            old = bytes(amap[lo:lo + pages])
            amap[lo:lo + pages] = old.translate(union)
            try:
                backend.set_range(gpa, pages * PAGE_SIZE, attrs)
            except ExhaustedError as e:
                amap[lo:lo + pages] = old
                return ProtectionResult(int(ABI.VTL_E_NO_RESOURCES), first, applied, len(runs),
                               backend.ops - ops0, str(e))
            amap[lo:lo + pages] = bytes([attrs]) * pages
            applied += pages
        return ProtectionResult(status, stop, applied, len(runs), backend.ops - ops0, reason, attrs)

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
