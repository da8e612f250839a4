"""Per-page memory attributes (NR/NW/NX) applied to one KVM VM.

Three backends with one interface (`AttributeBackend`):

* HostMappingBackend (mainline KVM, preferred where `probe_host_mapping` says it
  works): the VM's memslots point at its own alias of the guest memfd
  (GuestMemory.alias()); NW is mprotect(PROT_READ) on that alias, NR is PROT_NONE.
  KVM cannot get a writable (or any) host page for such a GPA, so a guest write
  exits like a write to a read-only memslot, a read or fetch like an unmapped GPA
  (or, on EPT hosts, as KVM_RUN -EFAULT with KVM_EXIT_MEMORY_FAULT).  The VMM and
  other VMs use the main mapping and are unaffected.  One mprotect per change;
  bounded by the process's VMA limit (vm.max_map_count), not by memslots.
* MemslotBackend (mainline fallback): the VM's memory is cut into runs of pages with
  equal attributes; a run with no restriction is a normal memslot, NW is a
  KVM_MEM_READONLY memslot, NR has no memslot at all.  A change touches only the
  runs it overlaps (plus neighbours it merges with), so memslot operations grow
  with the ranges changed, never with the size of the guest.
* RwxBackend (kernels with the Hyper-V VSM series): KVM_SET_MEMORY_ATTRIBUTES with
  the RWX attribute bits on the VM; violations arrive as KVM_EXIT_MEMORY_FAULT.

Neither mainline backend can express NX: `enforceable()` says what is enforced.
`make_backend` picks the backend for a VM (by probing the host when not told).
"""

from __future__ import annotations

import bisect
import errno
import os
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from vmm.errors import VmmError
from vmm.kvm import Vm
from vmm.memory import PAGE_SIZE, GuestMemory, MemoryAlias
from vmm.uapi import (
    KVM_CAP_NR_MEMSLOTS,
    PROT_NONE,
    PROT_READ,
    PROT_WRITE,
    ffi,
    hotlib,
)
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NR as NR
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NW as NW
from vmm.uapi import KVM_MEMORY_ATTRIBUTE_NX as NX

ALL = NR | NW | NX
BACKEND_KINDS = ("rwx", "host_mapping", "memslot")

Range = tuple[int, int]             # (gpa, size)
RunTuple = tuple[int, int, int]     # (start, end, attrs)


def valid_attributes(attrs: int) -> bool:
    """0 = unrestricted.  Readable-but-not-writable is fine; W or X without R is not."""
    if attrs & ~ALL:
        return False
    return not (attrs & NR) or attrs == ALL


def describe(attrs: int) -> str:
    return "".join(c if not attrs & bit else "-" for c, bit in (("r", NR), ("w", NW), ("x", NX)))


class AttributeBackend(Protocol):
    name: str
    # Is one set_range atomic for vCPUs running meanwhile?  A memslot split deletes the slot
    # and then creates its pieces (KVM cannot resize one): a vCPU that touches the range in
    # between finds no memory there, so its owner must keep every vCPU out of KVM_RUN.
    atomic: bool
    # When `timing` is set, the backend adds the time spent inside its KVM ioctls /
    # mprotect calls to `syscall_ns` (benchmarks: kernel time vs Python bookkeeping).
    timing: bool
    syscall_ns: int

    @property
    def ops(self) -> int: ...      # kernel operations issued so far (memslot ioctls, mprotects, ...)

    def set_range(self, gpa: int, size: int, attrs: int) -> None: ...
    def get(self, gpa: int) -> int: ...
    def enforceable(self, attrs: int) -> int: ...
    def runs(self) -> list[RunTuple]: ...


class ExhaustedError(VmmError):
    """The change would need more memslots / host mappings than the host allows; nothing
    was changed."""


# --- the run map shared by the memslot and host-mapping backends -------------------------
class _Change:
    """A planned set_range: runs[lo:hi+1] (`old`) become `merged`."""

    __slots__ = ("lo", "hi", "old", "merged")

    def __init__(self, lo: int, hi: int, old: list[RunTuple], merged: list[RunTuple]) -> None:
        self.lo, self.hi, self.old, self.merged = lo, hi, old, merged

    @property
    def removed(self) -> list[RunTuple]:
        """Old runs that do not survive unchanged."""
        keep = set(self.merged)
        return [r for r in self.old if r not in keep]

    @property
    def added(self) -> list[RunTuple]:
        """New runs that did not exist before."""
        had = set(self.old)
        return [m for m in self.merged if m not in had]


class RunMap:
    """Sorted, coalesced (start, end, attrs) runs over the ranges a VM may map.

    Lookups bisect `starts`; a change replaces only its window of runs (slice assignment
    on both lists), so bookkeeping per change does not grow with the number of runs
    (beyond the list memmove of the tail, which is C-fast).  Runs are plain int tuples:
    the garbage collector stops tracking those, so tens of thousands of runs do not make
    its full collections (and the cost per change) grow."""

    def __init__(self, ranges: Iterable[Range], mem_size: int) -> None:
        rs = sorted((g, s) for g, s in ranges if s != 0)
        for gpa, size in rs:
            if gpa < 0 or size < 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or gpa + size > mem_size:
                raise VmmError(f"range {gpa:#x}+{size:#x} is not page aligned or outside guest memory "
                               f"(0..{mem_size:#x})")
        for (g1, s1), (g2, _) in zip(rs, rs[1:], strict=False):
            if g1 + s1 > g2:
                raise VmmError(f"ranges overlap at {g2:#x}")
        self.runs: list[RunTuple] = [(g, g + s, 0) for g, s in rs]
        self.starts: list[int] = [g for g, _ in rs]

    def index(self, gpa: int) -> int:
        i = bisect.bisect_right(self.starts, gpa) - 1
        if i < 0 or gpa >= self.runs[i][1]:
            raise VmmError(f"GPA {gpa:#x} is not memory this VM may map")
        return i

    def get(self, gpa: int) -> int:
        return self.runs[self.index(gpa)][2]

    def plan(self, gpa: int, size: int, attrs: int) -> _Change:
        if type(gpa) is not int or type(size) is not int or gpa % PAGE_SIZE or size % PAGE_SIZE \
                or size <= 0:
            raise VmmError(f"range {gpa!r}+{size!r} is not page aligned")
        if attrs & ~ALL or (attrs & NR and attrs != ALL):       # valid_attributes, inlined
            raise VmmError(f"invalid attribute combination {attrs:#x}")
        runs = self.runs
        end = gpa + size
        first = self.index(gpa)
        last = first if end <= runs[first][1] else self.index(end - 1)
        # Every page of [gpa, end) must be mappable memory: no gaps between runs.
        for i in range(first, last):
            if runs[i][1] != runs[i + 1][0]:
                raise VmmError(f"range {gpa:#x}+{size:#x} crosses memory this VM may not map")
        # Widen the window to neighbours we may merge with.
        lo = first - 1 if first > 0 and runs[first - 1][1] == runs[first][0] else first
        hi = last + 1 if last + 1 < len(runs) and runs[last][1] == runs[last + 1][0] else last
        old = runs[lo:hi + 1]
        # In address order: what stays before the range, the range, what stays after it.
        pieces = [(s, e if e < gpa else gpa, a) for s, e, a in old if s < gpa]
        pieces.append((gpa, end, attrs))
        pieces += [(s if s > end else end, e, a) for s, e, a in old if e > end]
        merged = [pieces[0]]
        for p in pieces[1:]:
            m = merged[-1]
            if m[1] == p[0] and m[2] == p[2]:
                merged[-1] = (m[0], p[1], p[2])
            else:
                merged.append(p)
        return _Change(lo, hi, old, merged)

    def commit(self, ch: _Change) -> None:
        self.runs[ch.lo:ch.hi + 1] = ch.merged
        self.starts[ch.lo:ch.hi + 1] = [m[0] for m in ch.merged]


class _RunMapBackend:
    """What the memslot and host-mapping backends share: a RunMap of the attributes they
    applied, and no way to express NX (that takes page tables or RWX attributes)."""
    _map: RunMap

    def enforceable(self, attrs: int) -> int:
        return attrs & (NR | NW)

    def runs(self) -> list[RunTuple]:
        return list(self._map.runs)

    def get(self, gpa: int) -> int:
        return self._map.get(gpa)


class MemslotBackend(_RunMapBackend):
    name = "memslot"
    atomic = False

    def __init__(self, vm: Vm, mem: GuestMemory, ranges: list[Range],
                 max_slots: int | None = None) -> None:
        """`ranges`: the (gpa, size) the VM may ever map; they are mapped unrestricted now
        (those memslot ioctls count in `ops`)."""
        self.vm, self.mem = vm, mem
        self.max_slots = max_slots or vm.check_extension(KVM_CAP_NR_MEMSLOTS) or 32764
        self.timing = False
        self.syscall_ns = 0
        self._ops = 0
        self._map = RunMap(ranges, mem.size)
        self._slot: dict[int, int] = {}      # run start -> memslot id (NR runs have none)
        try:
            for r in self._map.runs:
                self._slot[r[0]] = self._add(r)
        except BaseException:
            for slot in self._slot.values():
                vm.unmap_slot(slot)
            raise

    @property
    def ops(self) -> int:
        """Memslot ioctls issued (adds and deletes, including any undo after a failure)."""
        return self._ops


    def slot_of(self, gpa: int) -> int | None:
        """The memslot holding `gpa` (None: not mapped, NR)."""
        return self._slot.get(self._map.runs[self._map.index(gpa)][0])

    def _add(self, run: RunTuple, slot: int | None = None) -> int:
        start, end, attrs = run
        self._ops += 1
        if self.timing:
            t = time.perf_counter_ns()
            try:
                return self.vm.map_memory(self.mem, start, end - start, readonly=bool(attrs & NW), slot=slot)
            finally:
                self.syscall_ns += time.perf_counter_ns() - t
        return self.vm.map_memory(self.mem, start, end - start, readonly=bool(attrs & NW), slot=slot)

    def _delete(self, slot: int) -> None:
        self._ops += 1
        if self.timing:
            t = time.perf_counter_ns()
            try:
                self.vm.unmap_slot(slot)
            finally:
                self.syscall_ns += time.perf_counter_ns() - t
        else:
            self.vm.unmap_slot(slot)

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        """Apply `attrs` to [gpa, gpa+size): all or nothing.  If KVM refuses a memslot
        change half-way, the changes made so far are undone (the removed memslots come
        back with their old ids) before the error is raised."""
        ch = self._map.plan(gpa, size, attrs)
        removed, added = ch.removed, ch.added
        if not added:
            return
        slots_after = len(self.vm.slots) - sum(1 for r in removed if not r[2] & NR) + \
            sum(1 for m in added if not m[2] & NR)
        if slots_after > self.max_slots:
            raise ExhaustedError(f"the change needs {slots_after} memslots; this host allows "
                                 f"{self.max_slots}")
        deleted: list[tuple[RunTuple, int]] = []
        created: list[tuple[RunTuple, int]] = []
        try:
            # KVM memslots may not overlap: delete the old runs before adding the new ones.
            for r in removed:
                if not r[2] & NR:
                    slot = self._slot[r[0]]
                    self._delete(slot)
                    deleted.append((r, slot))
            for m in added:
                if not m[2] & NR:
                    created.append((m, self._add(m)))
        except BaseException as err:
            self._undo(created, deleted, err)
            raise
        for r, _ in deleted:
            del self._slot[r[0]]
        for m, slot in created:
            self._slot[m[0]] = slot
        self._map.commit(ch)

    def _undo(self, created: list[tuple[RunTuple, int]], deleted: list[tuple[RunTuple, int]],
              err: BaseException) -> None:
        try:
            for _, slot in reversed(created):
                self._delete(slot)
            for r, slot in reversed(deleted):
                self._add(r, slot=slot)
        except Exception as undo_err:
            raise VmmError(f"a memslot change failed ({err}) and so did undoing it ({undo_err}): the "
                           "VM's memslots no longer match its attribute map") from undo_err


# --- host-mapping protections ---------------------------------------------------------------
_RW = PROT_READ | PROT_WRITE
# Alias protection per attribute value: NX has no host-mapping equivalent.
_PROT = {a: PROT_NONE if a & NR else PROT_READ if a & NW else _RW for a in range(ALL + 1)}


def _count_vmas() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


class _VmaLedger:
    """The process's mappings (VMAs): every protected range of an alias splits it, and
    the kernel refuses a split (mprotect -> ENOMEM) past vm.max_map_count.  That limit
    is shared with everything else the process maps (libraries, thread stacks, malloc
    arenas, kvm_run pages), so the host-mapping backends together stay HEADROOM below
    it.  `held`: VMAs the live backends added; `others`: everything else, sampled from
    /proc/self/maps when a backend is created and again before a refusal."""

    HEADROOM = 2048

    def __init__(self) -> None:
        self.held = 0
        self.others = 0
        self._limit: int | None = None

    @property
    def limit(self) -> int:
        if self._limit is None:
            try:
                with open("/proc/sys/vm/max_map_count") as f:
                    self._limit = int(f.read().strip())
            except (OSError, ValueError):
                self._limit = 65530          # the kernel's default (DEFAULT_MAX_MAP_COUNT)
        return self._limit

    def sample(self) -> None:
        self.others = max(0, _count_vmas() - self.held)

    def room(self) -> int:
        return self.limit - self.HEADROOM - self.others - self.held


VMA_LEDGER = _VmaLedger()


def _splits(prots: list[int]) -> int:
    """VMA boundaries along `prots` (-1 = the alias ends): the kernel merges neighbours of
    equal protection into one VMA."""
    n = 0
    prev = prots[0]
    for p in prots[1:]:
        if p != prev and p >= 0 and prev >= 0:
            n += 1
        prev = p
    return n


class HostMappingBackend(_RunMapBackend):
    """NW/NR through mprotect on this VM's own alias of the guest memory (see module doc).

    `vma_budget` caps the VMAs this backend may add (default: what the process-wide
    ledger allows); tests use it to reach the refusal path quickly."""

    name = "host_mapping"
    atomic = True           # one mprotect: the page tables change under mmap_lock

    def __init__(self, vm: Vm, mem: GuestMemory, ranges: list[Range], *,
                 vma_budget: int | None = None) -> None:
        self.vm, self.mem = vm, mem
        self.timing = False
        self.syscall_ns = 0
        self._ops = 0
        self.vma_budget = vma_budget
        self._map = RunMap(ranges, mem.size)
        self.alias: MemoryAlias = mem.alias()
        # The mprotect entry point and the alias base, resolved once for the hot path
        # (tests replace _sys_mprotect to inject failures).
        self._sys_mprotect: Callable[[int, int, int], int] = hotlib.mprotect
        self._base = self.alias.host_addr
        self.slots: list[int] = []
        self._extra_vmas = 0        # VMAs beyond the alias's first, held in VMA_LEDGER
        try:
            for start, end, _ in self._map.runs:
                self.slots.append(vm.map_memory(self.alias, start, end - start))
                self._ops += 1
        except BaseException:
            for slot in self.slots:
                vm.unmap_slot(slot)
            self.alias.close()
            raise
        self.alias.on_close(self._release_vmas)
        VMA_LEDGER.sample()

    @property
    def ops(self) -> int:
        """Kernel operations: the memslot ioctls at construction, then one mprotect per change
        (plus any undo)."""
        return self._ops

    @property
    def vmas(self) -> int:
        """Host mappings (VMAs) the alias is split into."""
        return 0 if self.alias.closed else 1 + self._extra_vmas


    def close(self) -> None:
        """Give the alias back (its VMAs leave the ledger), deleting this backend's memslots
        first if the VM is still open.  For a VM torn down while the memory lives on (a
        reset); closing the memory closes the alias too.  Idempotent."""
        if self.alias.closed:
            return
        if self.vm.fd >= 0:
            for slot in self.slots:
                if slot in self.vm.slots:
                    self.vm.unmap_slot(slot)
        self.slots = []
        self.mem.drop_alias(self.alias)

    def _release_vmas(self) -> None:
        VMA_LEDGER.held -= self._extra_vmas
        self._extra_vmas = 0

    def _outer_prots(self, ch: _Change) -> tuple[int, int]:
        """Protections just outside the window (-1: the alias ends there).  Alias pages
        outside every range are never protected (read-write)."""
        runs = self._map.runs
        ws, we = ch.old[0][0], ch.old[-1][1]
        if ch.lo > 0 and runs[ch.lo - 1][1] == ws:
            left = _PROT[runs[ch.lo - 1][2]]
        else:
            left = _RW if ws > 0 else -1
        if ch.hi + 1 < len(runs) and runs[ch.hi + 1][0] == we:
            right = _PROT[runs[ch.hi + 1][2]]
        else:
            right = _RW if we < self.alias.size else -1
        return left, right

    def _reserve(self, delta: int) -> None:
        if self.vma_budget is not None and self._extra_vmas + delta > self.vma_budget:
            raise ExhaustedError(f"the change needs {self._extra_vmas + delta} extra host mappings; "
                                 f"this backend may add {self.vma_budget}")
        if delta > VMA_LEDGER.room():
            VMA_LEDGER.sample()          # others may have shrunk since the last sample
            if delta > VMA_LEDGER.room():
                raise ExhaustedError(
                    f"the change needs {delta} more host mappings (VMAs); the process may add "
                    f"{max(0, VMA_LEDGER.room())} more: vm.max_map_count {VMA_LEDGER.limit}, "
                    f"{VMA_LEDGER.HEADROOM} kept for the rest of the process, {VMA_LEDGER.others} "
                    f"in use elsewhere, {VMA_LEDGER.held} held by protections")

    def _mprotect(self, gpa: int, size: int, prot: int) -> int:
        """mprotect on the alias (range already validated by the run map); 0 or errno.
        With `timing`, only the C call itself is timed."""
        self._ops += 1
        if self.timing:
            t = time.perf_counter_ns()
            rc = self._sys_mprotect(self._base + gpa, size, prot)
            self.syscall_ns += time.perf_counter_ns() - t
        else:
            rc = self._sys_mprotect(self._base + gpa, size, prot)
        return int(ffi.errno) if rc else 0

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        """Apply `attrs` to [gpa, gpa+size) with one mprotect: all or nothing (a failed
        mprotect is undone page range by page range before the error is raised)."""
        if not self.alias.host_addr:
            raise VmmError("the host-mapping backend's memory is closed")
        ch = self._map.plan(gpa, size, attrs)
        old, merged = ch.old, ch.merged
        if old == merged:
            return                       # already so: nothing to do
        end = gpa + size
        prot = _PROT[attrs]
        left, right = self._outer_prots(ch)
        delta = (_splits([left] + [_PROT[m[2]] for m in merged] + [right])
                 - _splits([left] + [_PROT[r[2]] for r in old] + [right]))
        if delta > 0:
            self._reserve(delta)
        # Only pages whose protection changes need the syscall (NX alone changes none).
        old_pieces = [(s if s > gpa else gpa, e if e < end else end, _PROT[a]) for s, e, a in old
                      if s < end and e > gpa]
        if any(p != prot for _, _, p in old_pieces):
            err = self._mprotect(gpa, size, prot)
            if err:
                self._undo(old_pieces, err)
        VMA_LEDGER.held += delta
        self._extra_vmas += delta
        self._map.commit(ch)

    def _undo(self, old_pieces: list[tuple[int, int, int]], err: int) -> None:
        """mprotect may fail after changing part of the range: put every page back, raise."""
        for s, e, p in old_pieces:
            rb = self._mprotect(s, e - s, p)
            if rb:
                raise VmmError(f"mprotect failed ({errno.errorcode.get(err, err)}) and so did undoing it "
                               f"at {s:#x}+{e - s:#x} ({errno.errorcode.get(rb, rb)}): the VM's view of "
                               "memory no longer matches its attribute map")
        what = f"mprotect failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
        if err == errno.ENOMEM:
            raise ExhaustedError(what + f"; vm.max_map_count is {VMA_LEDGER.limit}. Nothing was changed")
        raise VmmError(what + "; nothing was changed")


# --- RWX attributes ---------------------------------------------------------------------------
IoctlFn = Callable[[int, int, int], None]


class RwxBackend:
    """KVM_SET_MEMORY_ATTRIBUTES with RWX bits.  `set_attributes` defaults to the VM's
    ioctl; tests pass a fake because no mainline host has these attributes."""

    name = "rwx"
    atomic = True           # KVM_SET_MEMORY_ATTRIBUTES updates the range under the MMU lock

    def __init__(self, vm: Vm, mem_size: int, set_attributes: IoctlFn | None = None,
                 ranges: list[Range] | None = None) -> None:
        self.vm = vm
        self.mem_size = mem_size
        self._set = set_attributes or vm.set_memory_attributes
        self._attrs: dict[int, int] = {}   # gfn -> attrs (absent = 0)
        self._ops = 0
        self.timing = False
        self.syscall_ns = 0
        self._ranges = sorted(ranges) if ranges is not None else [(0, mem_size)]

    @property
    def ops(self) -> int:
        return self._ops

    def enforceable(self, attrs: int) -> int:
        return attrs & ALL

    def get(self, gpa: int) -> int:
        return self._attrs.get(gpa // PAGE_SIZE, 0)

    def runs(self) -> list[RunTuple]:
        """(start, end, attrs) over the ranges given at construction, coalesced."""
        out: list[RunTuple] = []
        for gpa, size in self._ranges:
            for gfn in range(gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE):
                a, s = self._attrs.get(gfn, 0), gfn * PAGE_SIZE
                if out and out[-1][1] == s and out[-1][2] == a:
                    out[-1] = (out[-1][0], s + PAGE_SIZE, a)
                else:
                    out.append((s, s + PAGE_SIZE, a))
        return out

    def set_range(self, gpa: int, size: int, attrs: int) -> None:
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0 or gpa < 0 or gpa + size > self.mem_size:
            raise VmmError(f"range {gpa:#x}+{size:#x} is not page aligned or outside memory")
        if not valid_attributes(attrs):
            raise VmmError(f"invalid attribute combination {attrs:#x}")
        # One ioctl: KVM reserves its attribute entries first, so it applies whole or not at all;
        # the map below changes only once it succeeded.
        self._ops += 1
        if self.timing:
            t = time.perf_counter_ns()
            self._set(gpa, size, attrs)
            self.syscall_ns += time.perf_counter_ns() - t
        else:
            self._set(gpa, size, attrs)
        for gfn in range(gpa // PAGE_SIZE, (gpa + size) // PAGE_SIZE):
            if attrs:
                self._attrs[gfn] = attrs
            else:
                self._attrs.pop(gfn, None)
