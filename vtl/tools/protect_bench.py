"""What protecting N guest pages read-only (NW) costs, measured on a real KVM VM.

Two layouts of the same N pages:

* contiguous:  one range of N pages;
* alternating: every other page, i.e. N one-page ranges spread over 2N pages,
  protected with one `set_range` call per range (what a page list does).

Two real backends (vmm/memattr.py, mainline KVM), each case on a fresh VM and
GuestMemory; only the protecting change is measured (the initial mapping is
excluded):

* memslot: read-only memslots, one memslot per run of equal attributes;
* host_mapping: mprotect(PROT_READ) on the VM's own alias of guest memory.

Recorded per case: kernel operations (`backend.ops` delta: memslot ioctls or
mprotects), wall time around the change, ns per page and per range, the share of
that time spent inside the ioctls / mprotect calls themselves (`syscall_share`: the
backend times them when `timing` is set), and flatness: the time of the last 1,000
ranges over the time of the first 1,000 (or halves, below 2,000 ranges), which stays
near 1 when the cost per range does not grow with the ranges already protected.
A case the host's limit makes impossible (memslots: KVM_CAP_NR_MEMSLOTS; host
mappings: vm.max_map_count, less headroom for the rest of the process) is attempted
for real and recorded as refused with the backend's ExhaustedError message, with the
numbers of what was applied before; none are invented.

The same cases are run against RwxBackend with a counting *fake* ioctl, because
this host has no KVM_SET_MEMORY_ATTRIBUTES with RWX bits; those rows are marked
`"fake": True` and say nothing about real kernel cost.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vmm.kvm import Kvm, Vm
from vmm.memattr import NW, VMA_LEDGER, ExhaustedError, HostMappingBackend, MemslotBackend, RwxBackend
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.uapi import KVM_CAP_NR_MEMSLOTS

MiB = 1 << 20
GiB = 1 << 30
# The protected pages start this far into guest memory and are followed by the same
# margin, so every layout has unrestricted memory on both sides.
BASE = 1 * MiB
MARGIN = 1 * MiB
LAYOUTS = ("contiguous", "alternating")
BACKENDS = ("memslot", "host_mapping")
INDEPENDENCE_PAGES = 1024
INDEPENDENCE_GUEST_SIZES = (256 * MiB, 4 * GiB)
FLAT_WINDOW = 1000        # ranges at the start and at the end whose times are compared
FLAT_TARGET = 1.5         # last window / first window

Case = dict[str, Any]


def layout_ranges(layout: str, pages: int, base: int = BASE) -> list[tuple[int, int]]:
    """The (gpa, size) ranges protecting `pages` pages in `layout`."""
    if pages <= 0:
        raise ValueError(f"pages must be positive, not {pages}")
    if layout == "contiguous":
        return [(base, pages * PAGE_SIZE)]
    if layout == "alternating":
        return [(base + 2 * i * PAGE_SIZE, PAGE_SIZE) for i in range(pages)]
    raise ValueError(f"unknown layout {layout!r}")


def memslots_needed(layout: str, pages: int) -> int:
    """Memslots in use once the layout is protected (one unrestricted run before and
    after the protected span): contiguous = 3, alternating = 2N + 1."""
    return 3 if layout == "contiguous" else 2 * pages + 1


def vmas_needed(layout: str, pages: int) -> int:
    """Host mappings (VMAs) the alias is split into once the layout is protected: the same
    count of runs as memslots_needed (NR/NW runs are VMAs too, unlike memslots)."""
    return memslots_needed(layout, pages)


def guest_size_for(pages: int) -> int:
    return BASE + 2 * pages * PAGE_SIZE + MARGIN


def host_kvm_info() -> dict[str, Any]:
    """Kernel, KVM modules and MMU mode: memslot costs depend on them."""
    modules = Path("/sys/module")
    kvm_modules = sorted(p.name for p in modules.glob("kvm*")) if modules.is_dir() else []
    tdp = modules / "kvm" / "parameters" / "tdp_mmu"
    return {"kernel": platform.release(), "kvm_modules": kvm_modules,
            "tdp_mmu": tdp.read_text().strip() if tdp.exists() else None}


def host_memslot_limit() -> int:
    kvm = Kvm()
    try:
        return kvm.check_extension(KVM_CAP_NR_MEMSLOTS)
    finally:
        kvm.close()


def host_vma_info() -> dict[str, int]:
    """The VMA limit host-mapping protections live under, as this process sees it now."""
    VMA_LEDGER.sample()
    room = VMA_LEDGER.room()
    return {"max_map_count": VMA_LEDGER.limit, "headroom": VMA_LEDGER.HEADROOM,
            "in_use": VMA_LEDGER.others + VMA_LEDGER.held, "room": room,
            # N alternating ranges add 2N VMAs to the alias's one.
            "max_alternating_pages": max(0, room // 2)}


def _per(seconds: float, n: int) -> float:
    return seconds * 1e9 / n if n else 0.0


def flatness(stamps: list[float], window: int = FLAT_WINDOW) -> dict[str, Any] | None:
    """Time of the last `window` ranges over the first `window` (halves if fewer than
    2 * window ranges); `stamps[i]` is the time before range i, `stamps[-1]` after the
    last.  None with fewer than 2 ranges."""
    n = len(stamps) - 1
    w = min(window, n // 2)
    if w < 1:
        return None
    first, last = stamps[w] - stamps[0], stamps[n] - stamps[n - w]
    return {"window": w, "first_s": first, "last_s": last, "ratio": last / first if first > 0 else None}


def _new_backend(kind: str, vm: Vm, mem: GuestMemory, size: int, max_slots: int | None,
                 vma_budget: int | None) -> MemslotBackend | HostMappingBackend:
    if kind == "memslot":
        return MemslotBackend(vm, mem, [(0, size)], max_slots=max_slots)
    if kind == "host_mapping":
        return HostMappingBackend(vm, mem, [(0, size)], vma_budget=vma_budget)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


def protect_case(kind: str, layout: str, pages: int, guest_size: int | None = None, *,
                 max_slots: int | None = None, vma_budget: int | None = None) -> Case:
    """Protect `pages` pages in `layout` with NW on a fresh VM through backend `kind`;
    the measured change only.  `max_slots` / `vma_budget` lower the backend's limit."""
    size = guest_size if guest_size is not None else guest_size_for(pages)
    ranges = layout_ranges(layout, pages)
    if ranges[-1][0] + ranges[-1][1] > size:
        raise ValueError(f"{layout} {pages} pages does not fit in a {size >> 20} MiB guest")
    kvm = Kvm()
    mem = GuestMemory(size)
    vm: Vm | None = None
    try:
        vm = kvm.create_vm()
        backend = _new_backend(kind, vm, mem, size, max_slots, vma_budget)
        case: Case = {"backend": kind, "pages": pages, "ranges": len(ranges), "guest_bytes": size}
        if isinstance(backend, MemslotBackend):
            case.update(memslots_needed=memslots_needed(layout, pages), memslot_limit=backend.max_slots)
        else:
            case.update(vmas_needed=vmas_needed(layout, pages),
                        vma_limit=vma_budget + 1 if vma_budget is not None else VMA_LEDGER.limit)
        backend.timing = True
        backend.syscall_ns = 0
        ops0 = backend.ops
        applied = 0
        # (ranges applied, seconds, kernel ops) every `step` ranges (at most ~16 marks).
        step = max(1, len(ranges) // 16)
        progress: list[tuple[int, float, int]] = []
        clock = time.perf_counter
        stamps = [clock()]
        t0 = stamps[0]
        try:
            for gpa, length in ranges:
                if applied % step == 0 and applied:
                    progress.append((applied, stamps[-1] - t0, backend.ops - ops0))
                backend.set_range(gpa, length, NW)
                applied += 1
                stamps.append(clock())
        except ExhaustedError as e:
            elapsed = stamps[-1] - t0
            progress.append((applied, elapsed, backend.ops - ops0))
            case.update(refused=str(e), applied_before_refusal=applied,
                        ops_before_refusal=backend.ops - ops0, seconds_before_refusal=elapsed,
                        syscall_s=backend.syscall_ns / 1e9,
                        syscall_share=backend.syscall_ns / 1e9 / elapsed if elapsed > 0 else None,
                        flatness=flatness(stamps), progress=progress)
            if isinstance(backend, MemslotBackend):
                case["memslots_at_refusal"] = len(vm.slots)
            else:
                case["vmas_at_refusal"] = backend.vmas
            return case
        elapsed = stamps[-1] - t0
        ops = backend.ops - ops0
        progress.append((applied, elapsed, ops))
        case.update(ops=ops, seconds=elapsed, ns_per_page=_per(elapsed, pages),
                    ns_per_range=_per(elapsed, len(ranges)), ns_per_op=_per(elapsed, ops),
                    syscall_s=backend.syscall_ns / 1e9,
                    syscall_share=backend.syscall_ns / 1e9 / elapsed if elapsed > 0 else None,
                    flatness=flatness(stamps), memslots_in_use=len(vm.slots), progress=progress)
        if isinstance(backend, HostMappingBackend):
            case["vmas_in_use"] = backend.vmas
        return case
    finally:
        if vm is not None:
            vm.close()
        mem.close()
        kvm.close()


def memslot_case(layout: str, pages: int, guest_size: int | None = None,
                 max_slots: int | None = None) -> Case:
    """Protect `pages` pages in `layout` with NW through read-only memslots."""
    return protect_case("memslot", layout, pages, guest_size, max_slots=max_slots)


def host_mapping_case(layout: str, pages: int, guest_size: int | None = None,
                      vma_budget: int | None = None) -> Case:
    """Protect `pages` pages in `layout` with NW through mprotect on the VM's alias."""
    return protect_case("host_mapping", layout, pages, guest_size, vma_budget=vma_budget)


def rwx_fake_case(layout: str, pages: int) -> Case:
    """The same change against RwxBackend with a counting fake ioctl (no real kernel)."""
    size = guest_size_for(pages)
    ranges = layout_ranges(layout, pages)
    calls = 0

    def fake_set_attributes(gpa: int, length: int, attrs: int) -> None:
        nonlocal calls
        calls += 1

    kvm = Kvm()
    vm: Vm | None = None
    try:
        vm = kvm.create_vm()
        backend = RwxBackend(vm, size, set_attributes=fake_set_attributes)
        ops0 = backend.ops
        t0 = time.perf_counter()
        for gpa, length in ranges:
            backend.set_range(gpa, length, NW)
        elapsed = time.perf_counter() - t0
        return {"pages": pages, "ranges": len(ranges), "fake": True, "ioctls": calls,
                "ops": backend.ops - ops0, "seconds": elapsed,
                "ns_per_page": _per(elapsed, pages), "ns_per_range": _per(elapsed, len(ranges))}
    finally:
        if vm is not None:
            vm.close()
        kvm.close()


def guest_size_independence(pages: int = INDEPENDENCE_PAGES,
                            guest_sizes: Iterable[int] = INDEPENDENCE_GUEST_SIZES) -> dict[str, Any]:
    """The same change on guests of different sizes: memslot operations must be equal."""
    sizes = list(guest_sizes)
    out: dict[str, Any] = {"pages": pages, "guest_bytes": sizes}
    for layout in LAYOUTS:
        ops: dict[int, int] = {}
        seconds: dict[int, float] = {}
        for size in sizes:
            case = memslot_case(layout, pages, guest_size=size)
            ops[size] = int(case["ops"])
            seconds[size] = float(case["seconds"])
        # Only the operation count is claimed independent; the time is recorded as measured.
        out[layout] = {"ops": ops, "seconds": seconds, "equal": len(set(ops.values())) == 1}
    out["equal"] = all(out[layout]["equal"] for layout in LAYOUTS)
    return out


def protection_costs(sizes: Iterable[int] = (1024, 16384, 65536),
                     independence_pages: int = INDEPENDENCE_PAGES,
                     max_slots: int | None = None) -> dict[str, Any]:
    """Costs of protecting N pages NW, per backend, layout and N; see the module docstring.

    `max_slots` lowers the memslot limit the memslot backend enforces (default: the
    host's KVM_CAP_NR_MEMSLOTS)."""
    ns = list(sizes)
    limit = host_memslot_limit()
    real: dict[str, dict[str, dict[int, Case]]] = {b: {layout: {} for layout in LAYOUTS} for b in BACKENDS}
    rwx: dict[str, Any] = {"fake": True,
                           "note": "this host lacks KVM_SET_MEMORY_ATTRIBUTES with RWX bits; "
                                   "counting fake ioctl, times are Python bookkeeping only"}
    for layout in LAYOUTS:
        rwx[layout] = {}
        for n in ns:
            real["memslot"][layout][n] = memslot_case(layout, n, max_slots=max_slots)
            real["host_mapping"][layout][n] = host_mapping_case(layout, n)
            rwx[layout][n] = rwx_fake_case(layout, n)
    return {
        "host": {**host_kvm_info(), "page_size": PAGE_SIZE, "memslot_limit": limit,
                 "memslot_limit_used": max_slots or limit,
                 "max_alternating_pages": max_alternating_pages(max_slots or limit),
                 "vma": host_vma_info()},
        "memslot": real["memslot"],
        "host_mapping": real["host_mapping"],
        "rwx_fake": rwx,
        "guest_size_independence": guest_size_independence(independence_pages),
        "flat_target": FLAT_TARGET,
    }


def segment_rates(progress: list[tuple[int, float, int]]) -> list[tuple[int, int, float]]:
    """(first range, last range, ns per memslot op) for each stretch between progress marks."""
    out: list[tuple[int, int, float]] = []
    prev = (0, 0.0, 0)
    for mark in progress:
        if mark[2] > prev[2]:
            out.append((prev[0], mark[0], _per(mark[1] - prev[1], mark[2] - prev[2])))
        prev = mark
    return out


def max_alternating_pages(memslot_limit: int) -> int:
    """The largest alternating layout the memslot backend can hold (2N + 1 memslots)."""
    return (memslot_limit - 1) // 2


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def _fmt_share(c: Case) -> str:
    share = c.get("syscall_share")
    return f"{share * 100:.0f}%" if share is not None else "-"


def _fmt_flat(c: Case) -> str:
    f = c.get("flatness")
    if not f or f.get("ratio") is None:
        return "-"
    mark = "" if f["ratio"] <= FLAT_TARGET else " (!)"
    return f"{f['ratio']:.2f}" + ("" if f["window"] == FLAT_WINDOW else f" ({f['window']})") + mark


def format_costs(d: dict[str, Any]) -> str:
    """A human-readable table of `protection_costs()` output."""
    head = ("backend", "layout", "pages", "ranges", "kernel ops", "total ms", "ns/page", "ns/range",
            "in syscalls", "last/first 1k")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for kind, unit in (("memslot", "memslots"), ("host_mapping", "host mappings (VMAs)")):
        for layout, cases in d.get(kind, {}).items():
            for n, c in cases.items():
                if "refused" in c:
                    needed = c.get("memslots_needed", c.get("vmas_needed"))
                    rows.append((kind, layout, str(n), str(c["ranges"]),
                                 f"REFUSED: {c['refused']} (needs {needed} {unit}; refused after "
                                 f"{c['applied_before_refusal']} ranges, "
                                 f"{_fmt_ms(c['seconds_before_refusal'])} ms, {_fmt_share(c)} in syscalls, "
                                 f"last/first 1k {_fmt_flat(c)})",
                                 "", "", "", "", ""))
                else:
                    rows.append((kind, layout, str(n), str(c["ranges"]), str(c["ops"]),
                                 _fmt_ms(c["seconds"]), f"{c['ns_per_page']:.0f}",
                                 f"{c['ns_per_range']:.0f}", _fmt_share(c), _fmt_flat(c)))
    rwx = d.get("rwx_fake", {})
    for layout in LAYOUTS:
        for n, c in rwx.get(layout, {}).items():
            rows.append(("rwx (FAKE)", layout, str(n), str(c["ranges"]), str(c["ioctls"]),
                         _fmt_ms(c["seconds"]), f"{c['ns_per_page']:.0f}", f"{c['ns_per_range']:.0f}",
                         "-", "-"))
    if rwx.get("note"):
        notes.append(f"rwx (FAKE): {rwx['note']}")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    # A refusal reason is long: do not let it widen the column for every row.
    widths[4] = max([len(head[4]), *(len(r[4]) for r in rows if not r[4].startswith("REFUSED"))])
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        if r[4].startswith("REFUSED"):
            lines.append("  ".join(v.ljust(w) for v, w in zip(r[:4], widths[:4], strict=True)) + "  " + r[4])
        else:
            lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    lines.append(f"in syscalls: share of the wall time spent inside the memslot ioctls / mprotect calls; "
                 f"last/first 1k: time of the last {FLAT_WINDOW} ranges over the first {FLAT_WINDOW} "
                 f"(window in brackets when smaller; target <= {FLAT_TARGET}, (!) above it)")
    gi = d.get("guest_size_independence")
    if gi:
        sizes = ", ".join(f"{s >> 20} MiB" for s in gi["guest_bytes"])
        parts = [f"{layout} " + "/".join(str(v) for v in gi[layout]["ops"].values())
                 for layout in LAYOUTS if layout in gi]
        lines.append("")
        lines.append(f"guest-size independence ({gi['pages']} pages on {sizes}): memslot ops "
                     + "; ".join(parts) + (" -> equal" if gi["equal"] else " -> NOT EQUAL"))
        times = [f"{layout} " + "/".join(f"{_fmt_ms(v)}" for v in gi[layout]["seconds"].values())
                 for layout in LAYOUTS if layout in gi and "seconds" in gi[layout]]
        if times:
            lines.append(f"  same changes, total ms: {'; '.join(times)}")
    for n, c in d.get("memslot", {}).get("alternating", {}).items():
        rates = segment_rates(c.get("progress", []))
        if len(rates) >= 2:
            (a0, a1, ns_op_a), (b0, b1, ns_op_b) = rates[0], rates[-1]
            lines.append(f"memslot alternating {n}: ns/memslot op {ns_op_a:.0f} for ranges {a0}..{a1}, "
                         f"{ns_op_b:.0f} for ranges {b0}..{b1}"
                         + (" (before refusal)" if "refused" in c else ""))
    host = d.get("host")
    if host:
        lines.append(f"host: kernel {host['kernel']}, KVM modules {','.join(host.get('kvm_modules', []))}, "
                     f"tdp_mmu {host.get('tdp_mmu')}, memslot limit {host['memslot_limit']} "
                     f"(alternating layouts fit up to {host.get('max_alternating_pages')} pages)")
        vma = host.get("vma")
        if vma:
            lines.append(f"host mappings: vm.max_map_count {vma['max_map_count']}, {vma['in_use']} in use, "
                         f"{vma['headroom']} kept for the rest of the process (alternating layouts fit up "
                         f"to {vma['max_alternating_pages']} pages)")
    lines.extend(notes)
    return "\n".join(lines)
