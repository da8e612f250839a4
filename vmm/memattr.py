"""Per-page memory attributes (NR/NW/NX) applied to one KVM VM.

Two backends with one interface:

* MemslotBackend (mainline KVM): the VM's memory is cut into runs of pages with
  equal attributes; a run with no restriction is a normal memslot, NW is a
  KVM_MEM_READONLY memslot, NR has no memslot at all.  NX cannot be expressed by
  memslots and is reported as not enforced (`enforceable`).  A change touches only
  the runs it overlaps (plus neighbours it merges with), so memslot operations
  grow with the ranges changed, never with the size of the guest.
* RwxBackend (kernels with the Hyper-V VSM series): KVM_SET_MEMORY_ATTRIBUTES with
  the RWX attribute bits on the VM; violations arrive as KVM_EXIT_MEMORY_FAULT.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from vmm.errors import VmmError
from vmm.kvm import Vm
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.uapi import KVM_CAP_NR_MEMSLOTS
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NR as NR
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NW as NW
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NX as NX

ALL = NR | NW | NX


def valid_attributes(attrs: int) -> bool:
    """0 = unrestricted.  Readable-but-not-writable is fine; W or X without R is not."""
    if attrs & ~ALL:
        return False
    return not (attrs & NR) or attrs == ALL


def describe(attrs: int) -> str:
    return "".join(c if not attrs & bit else "-" for c, bit in (("r", NR), ("w", NW), ("x", NX)))


class AttributeBackend(Protocol):
    name: str

    @property
    def ops(self) -> int: ...      # KVM operations issued so far (memslot add/delete or ioctls)

    def set_range(self, gpa: int, size: int, attrs: int) -> None: ...
    def get(self, gpa: int) -> int: ...
    def enforceable(self, attrs: int) -> int: ...


class ExhaustedError(VmmError):
    """The change would need more memslots than the host allows; nothing was changed."""


@dataclass
class _Run:
    start: int        # gpa, page aligned
    end: int          # exclusive
    attrs: int
    slot: int | None  # memslot id, None when unmapped (NR)


class MemslotBackend:
    name = "memslot"

    def __init__(self, vm: Vm, mem: GuestMemory, ranges: list[tuple[int, int]],
                 max_slots: int | None = None) -> None:
        """`ranges`: the (gpa, size) the VM may ever map; they are mapped unrestricted now."""
        self.vm, self.mem = vm, mem
        self.max_slots = max_slots or vm.check_extension(KVM_CAP_NR_MEMSLOTS) or 32764
        self.ops_base = vm.memslot_ops
        self._runs: list[_Run] = []
        for gpa, size in sorted(ranges):
            if size > 0:
                self._runs.append(_Run(gpa, gpa + size, 0, vm.map_memory(mem, gpa, size)))
        self._starts = [r.start for r in self._runs]

    @property
    def ops(self) -> int:
        return self.vm.memslot_ops - self.ops_base

    def enforceable(self, attrs: int) -> int:
        """The subset of `attrs` this backend enforces: NX needs page tables or RWX."""
        return attrs & (NR | NW)

    def runs(self) -> list[tuple[int, int, int]]:
        return [(r.start, r.end, r.attrs) for r in self._runs]

    def _index(self, gpa: int) -> int:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0 or gpa >= self._runs[i].end:
            raise VmmError(f"GPA {gpa:#x} is not memory this VM may map")
        return i

    def get(self, gpa: int) -> int:
        return self._runs[self._index(gpa)].attrs

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise VmmError(f"range {gpa:#x}+{size:#x} is not page aligned")
        if not valid_attributes(attrs):
            raise VmmError(f"invalid attribute combination {attrs:#x}")
        end = gpa + size
        first, last = self._index(gpa), self._index(end - 1)
        # Every page of [gpa, end) must be mappable memory: no gaps between runs.
        for i in range(first, last):
            if self._runs[i].end != self._runs[i + 1].start:
                raise VmmError(f"range {gpa:#x}+{size:#x} crosses memory this VM may not map")
        # Widen the window to neighbours we may merge with.
        lo = first - 1 if first > 0 and self._runs[first - 1].end == self._runs[first].start else first
        hi = last + 1 if last + 1 < len(self._runs) and self._runs[last].end == self._runs[last + 1].start \
            else last
        old = self._runs[lo:hi + 1]
        pieces: list[tuple[int, int, int]] = []
        for r in old:
            if r.start < gpa:
                pieces.append((r.start, min(r.end, gpa), r.attrs))
            if r.end > end:
                pieces.append((max(r.start, end), r.end, r.attrs))
        pieces.append((gpa, end, attrs))
        pieces.sort()
        merged: list[tuple[int, int, int]] = []
        for s, e, a in pieces:
            if merged and merged[-1][1] == s and merged[-1][2] == a:
                merged[-1] = (merged[-1][0], e, a)
            else:
                merged.append((s, e, a))
        keep = {(r.start, r.end, r.attrs) for r in old} & set(merged)
        removed = [r for r in old if (r.start, r.end, r.attrs) not in keep]
        added = [m for m in merged if m not in keep]
        slots_now = len(self.vm.slots)
        slots_after = slots_now - sum(1 for r in removed if r.slot is not None) + \
            sum(1 for m in added if not m[2] & NR)
        if slots_after > self.max_slots:
            raise ExhaustedError(f"the change needs {slots_after} memslots; this host allows "
                                 f"{self.max_slots}")
        for r in removed:
            if r.slot is not None:
                self.vm.unmap_slot(r.slot)
        by_key = {(r.start, r.end, r.attrs): r for r in old}
        new_runs: list[_Run] = []
        for s, e, a in merged:
            if (s, e, a) in by_key:
                new_runs.append(by_key[(s, e, a)])
                continue
            slot = None if a & NR else self.vm.map_memory(self.mem, s, e - s, readonly=bool(a & NW))
            new_runs.append(_Run(s, e, a, slot))
        self._runs[lo:hi + 1] = new_runs
        self._starts = [r.start for r in self._runs]


IoctlFn = Callable[[int, int, int], None]


class RwxBackend:
    """KVM_SET_MEMORY_ATTRIBUTES with RWX bits.  `set_attributes` defaults to the VM's
    ioctl; tests pass a fake because no mainline host has these attributes."""

    name = "rwx"

    def __init__(self, vm: Vm, mem_size: int, set_attributes: IoctlFn | None = None) -> None:
        self.vm = vm
        self.mem_size = mem_size
        self._set = set_attributes or vm.set_memory_attributes
        self._attrs: dict[int, int] = {}   # gfn -> attrs (absent = 0)
        self._ops = 0

    @property
    def ops(self) -> int:
        return self._ops

    def enforceable(self, attrs: int) -> int:
        return attrs & ALL

    def get(self, gpa: int) -> int:
        return self._attrs.get(gpa // PAGE_SIZE, 0)

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or gpa + size > self.mem_size:
            raise VmmError(f"range {gpa:#x}+{size:#x} is not page aligned or outside memory")
        if not valid_attributes(attrs):
            raise VmmError(f"invalid attribute combination {attrs:#x}")
        self._set(gpa, size, attrs)
        self._ops += 1
        for gfn in range(gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE):
            if attrs:
                self._attrs[gfn] = attrs
            else:
                self._attrs.pop(gfn, None)
