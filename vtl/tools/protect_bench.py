"""What protecting N guest pages read-only (NW) costs, measured on a real KVM VM.

Two layouts of the same N pages:

* contiguous:  one range of N pages;
* alternating: every other page, i.e. N one-page ranges spread over 2N pages,
  protected with one `set_range` call per range (what a page list does).

For the memslot backend (vmm/memattr.py, mainline KVM) each case runs on a fresh
VM and GuestMemory; only the protecting change is measured (the initial mapping
is excluded): memslot operations (`backend.ops` delta), wall time around the change,
ns per page and per range, and memslots in use afterwards.  A case the host's
memslot limit makes impossible is attempted for real and recorded as refused with
the backend's ExhaustedError message; no numbers are invented for it.

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
from vmm.memattr import NW, ExhaustedError, MemslotBackend, RwxBackend
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.uapi import KVM_CAP_NR_MEMSLOTS

MiB = 1 << 20
GiB = 1 << 30
# The protected pages start this far into guest memory and are followed by the same
# margin, so every layout has unrestricted memory on both sides.
BASE = 1 * MiB
MARGIN = 1 * MiB
LAYOUTS = ("contiguous", "alternating")
INDEPENDENCE_PAGES = 1024
INDEPENDENCE_GUEST_SIZES = (256 * MiB, 4 * GiB)

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


def _per(seconds: float, n: int) -> float:
    return seconds * 1e9 / n if n else 0.0


def memslot_case(layout: str, pages: int, guest_size: int | None = None,
                 max_slots: int | None = None) -> Case:
    """Protect `pages` pages in `layout` with NW on a fresh VM; the measured change only."""
    size = guest_size if guest_size is not None else guest_size_for(pages)
    ranges = layout_ranges(layout, pages)
    if ranges[-1][0] + ranges[-1][1] > size:
        raise ValueError(f"{layout} {pages} pages does not fit in a {size >> 20} MiB guest")
    kvm = Kvm()
    mem = GuestMemory(size)
    vm: Vm | None = None
    try:
        vm = kvm.create_vm()
        backend = MemslotBackend(vm, mem, [(0, size)], max_slots=max_slots)
        needed = memslots_needed(layout, pages)
        case: Case = {"pages": pages, "ranges": len(ranges), "guest_bytes": size,
                      "memslots_needed": needed, "memslot_limit": backend.max_slots}
        ops0 = backend.ops
        applied = 0
        # (ranges applied, seconds, memslot ops) every `step` ranges: shows whether the
        # cost per range grows as memslots accumulate (at most ~16 perf_counter calls).
        step = max(1, len(ranges) // 16)
        progress: list[tuple[int, float, int]] = []
        t0 = time.perf_counter()
        try:
            for gpa, length in ranges:
                if applied % step == 0 and applied:
                    progress.append((applied, time.perf_counter() - t0, backend.ops - ops0))
                backend.set_range(gpa, length, NW)
                applied += 1
        except ExhaustedError as e:
            elapsed = time.perf_counter() - t0
            progress.append((applied, elapsed, backend.ops - ops0))
            case.update(refused=str(e), applied_before_refusal=applied,
                        ops_before_refusal=backend.ops - ops0,
                        seconds_before_refusal=elapsed, memslots_at_refusal=len(vm.slots),
                        progress=progress)
            return case
        elapsed = time.perf_counter() - t0
        ops = backend.ops - ops0
        progress.append((applied, elapsed, ops))
        case.update(ops=ops, seconds=elapsed, ns_per_page=_per(elapsed, pages),
                    ns_per_range=_per(elapsed, len(ranges)), ns_per_op=_per(elapsed, ops),
                    memslots_in_use=len(vm.slots), progress=progress)
        return case
    finally:
        if vm is not None:
            vm.close()
        mem.close()
        kvm.close()


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
    """Costs of protecting N pages NW, per layout and N; see the module docstring.

    `max_slots` lowers the memslot limit the memslot backend enforces (default: the
    host's KVM_CAP_NR_MEMSLOTS)."""
    ns = list(sizes)
    limit = host_memslot_limit()
    memslot: dict[str, dict[int, Case]] = {layout: {} for layout in LAYOUTS}
    rwx: dict[str, Any] = {"fake": True,
                           "note": "this host lacks KVM_SET_MEMORY_ATTRIBUTES with RWX bits; "
                                   "counting fake ioctl, times are Python bookkeeping only"}
    for layout in LAYOUTS:
        rwx[layout] = {}
        for n in ns:
            memslot[layout][n] = memslot_case(layout, n, max_slots=max_slots)
            rwx[layout][n] = rwx_fake_case(layout, n)
    return {
        "host": {**host_kvm_info(), "page_size": PAGE_SIZE, "memslot_limit": limit,
                 "memslot_limit_used": max_slots or limit,
                 "max_alternating_pages": max_alternating_pages(max_slots or limit)},
        "memslot": memslot,
        "rwx_fake": rwx,
        "guest_size_independence": guest_size_independence(independence_pages),
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


def format_costs(d: dict[str, Any]) -> str:
    """A human-readable table of `protection_costs()` output."""
    head = ("backend", "layout", "pages", "ranges", "memslot ops / ioctls", "total ms", "ns/page",
            "ns/range")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for layout, cases in d.get("memslot", {}).items():
        for n, c in cases.items():
            if "refused" in c:
                rows.append(("memslot", layout, str(n), str(c["ranges"]),
                             f"REFUSED: {c['refused']} (needs {c['memslots_needed']}; "
                             f"refused after {c['applied_before_refusal']} ranges, "
                             f"{_fmt_ms(c['seconds_before_refusal'])} ms)", "", "", ""))
            else:
                rows.append(("memslot", layout, str(n), str(c["ranges"]), str(c["ops"]),
                             _fmt_ms(c["seconds"]), f"{c['ns_per_page']:.0f}",
                             f"{c['ns_per_range']:.0f}"))
    rwx = d.get("rwx_fake", {})
    for layout in LAYOUTS:
        for n, c in rwx.get(layout, {}).items():
            rows.append(("rwx (FAKE)", layout, str(n), str(c["ranges"]), str(c["ioctls"]),
                         _fmt_ms(c["seconds"]), f"{c['ns_per_page']:.0f}", f"{c['ns_per_range']:.0f}"))
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
    lines.extend(notes)
    return "\n".join(lines)
