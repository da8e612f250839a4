"""`vtl memmap`: VTL0's and VTL1's view of guest memory after a hardened boot
(scenario `harden`: attributes per section, page tables locked, end of boot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmm.memattr import NW, NX, describe
from vmm.memory import PAGE_SIZE
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.tools.figures import save_png

# What a VTL may do in a region -> colour, and what it means.
COLOURS_BY_NAME = {"rwx": "#e6e6e6", "rw-": "#6ebe6e", "r-x": "#5078dc", "r--": "#f0c83c",
                   "---": "#282828", "none": "#c83c3c"}
LEGEND = {"rwx": "no restriction", "rw-": "data (NX)", "r-x": "text", "r--": "read-only",
          "---": "no access", "none": "not mapped (VTL1's region)"}


class Region(BaseModel):
    start: int
    end: int
    vtl0: str      # what VTL0 may do: rwx / rw- / r-x / r-- / --- / "none" (VTL1 region)
    vtl1: str      # VTL1's VM maps everything without restriction
    label: str


class VpRegisters(BaseModel):
    """One VP after the hardened boot: what VTL1 judges of its register writes (its own
    lock: per VP) and the control registers KVM holds for its VTL0."""
    index: int
    judged: list[str]
    cr0: int
    cr4: int
    efer: int


class MemMap(BaseModel):
    mem_size: int
    backend: str
    regions: list[Region]
    nx_enforced_by: str
    vtl1_base: int
    vtl1_end: int
    mode: str = "vtl"      # vtl | heki (one VM: the host-owned Heki policy, docs/heki-mode.md)
    vps: list[VpRegisters] = []


PRIV_LABEL = "privileged section"


def _labels(syms: dict[str, int], start: int, attrs: int, priv: tuple[int, int]) -> str:
    if attrs == -1:
        return "VTL1 region"
    if priv[0] <= start < priv[1]:
        return PRIV_LABEL          # inside the text, but VTL1 locked it apart (VTL0 sees ---)
    for lo, hi, name in (("_text_start", "_text_end", "kernel text"),
                         ("_text_end", "_scenarios_page_end", "rodata"),
                         ("_ro_after_init_start", "_ro_after_init_end", "ro_after_init"),
                         ("_data_start", "_image_end", "data + bss")):
        if lo in syms and hi in syms and syms[lo] <= start < syms[hi]:
            # Read-only pages inside data+bss are the locked page tables.
            return "page tables (locked)" if name == "data + bss" and attrs == NW | NX else name
    return "free memory" if start >= syms.get("_image_end", 0) else "low memory"


def build(vtl0: Path, vtl1: Path, mem_size: int = 256 << 20, backend: Backend | None = None,
          vps: int = 1) -> MemMap:
    """VTL mode's map (Heki mode's: vtl/tools/heki_memmap.py)."""
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario="harden", mem_size=mem_size,
                          attr_backend=backend, nr_vps=vps)
    with Partition(cfg, EventLog()) as p:
        result, _ = control.run(p, None, 60.0)
        raise_if_interrupted(result)
        if result.status != 0:
            raise RuntimeError(f"the hardened boot failed: {result.message}")
        runs = p.vtl0_runs()
        syms = p.vtl0_image.symbols()
        backend_name = p.backend_name
        layout = p.layout
        ictl = p.intercept_control
        per_vp = [_vp_registers(p, vp.index) for vp in p.vps]
    # The privileged section as VTL1 declared it (VTL_HC_SET_INTERCEPT_CONTROL), else as
    # the image's symbols place it.
    priv = ((ictl.priv_gpa, ictl.priv_end) if ictl is not None and ictl.priv_pages else
            (syms.get("_priv_start", 0), syms.get("_priv_end", 0)))
    regions = [Region(start=start, end=end, vtl0="none" if a == -1 else describe(a), vtl1="rwx",
                      label=_labels(syms, start, a, priv)) for start, end, a in runs]
    nx = ("KVM attributes" if backend_name == "rwx" else
          "VTL0's page tables (NX bits) locked r-- by VTL1, EFER.NXE pinned by the MSR filter")
    return MemMap(mem_size=mem_size, backend=backend_name, regions=regions, nx_enforced_by=nx,
                  vtl1_base=layout.vtl1_base, vtl1_end=layout.vtl1_end, vps=per_vp)


def _vp_registers(p: Partition, index: int) -> VpRegisters:
    ctl = p.intercept_controls.of(index)
    vcpu = p.vps[index].vcpus[Vtl.VTL0]
    s = vcpu.get_sregs() if vcpu is not None else None
    return VpRegisters(index=index, judged=ctl.registers if ctl is not None else [],
                       cr0=int(s.cr0) if s else 0, cr4=int(s.cr4) if s else 0, efer=int(s.efer) if s else 0)


IMAGE_LABELS = ("kernel text", PRIV_LABEL, "rodata", "ro_after_init", "data + bss", "page tables (locked)")
VTL1_RED = "#b03030"


def _mib(n: int) -> str:
    return f"{n >> 20} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.1f} MiB"


def draw_png(m: MemMap, path: Path, detail: int = 32 << 20) -> None:
    """Draw the map, three panels, each titled with the range it shows: all of guest-physical
    memory; its first `detail` bytes (low memory, VTL0's image, VTL1's region); VTL0's
    kernel image up close.  One bar per VTL's VM, each region coloured by what the VTL may
    do there and labelled (labels never overlap or leave the panel); VTL1's region hatched
    on VTL0's bar (VTL0's VM does not map it), shown as VTL1's own memory on VTL1's bar.
    Written through vmm/files.py (never over an input); any write error is an
    OutputFileError."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("--png needs matplotlib (pip install '.[plot]'; `make setup` installs it)") \
            from None
    MiB = 1 << 20
    image = [r for r in m.regions if r.label in IMAGE_LABELS]
    detail = min(detail, m.mem_size)
    fig, axes = plt.subplots(3, 1, figsize=(13, 10), dpi=110, height_ratios=[1, 1.3, 1])
    whole, top, zoom = axes
    renderer = fig.canvas.get_renderer()     # type: ignore[attr-defined]

    def place_labels(ax: Any, labels: list[tuple[str, list[tuple[int, float]]]], row: float) -> None:
        """One text per label (arrows to each of its regions), on the first of four levels
        (above, below, then further out) where it overlaps no other text, shifted to stay
        inside the panel."""
        ax_box = ax.get_window_extent(renderer)
        placed: list[Any] = []
        levels = (0.62, -0.62, 0.95, -0.95)
        for text, members in labels:
            xs = [x for _, x in members]
            mid = max(members)[1]
            for n, dy in enumerate(levels):
                t = ax.text(mid, row + dy, text, ha="center", va="center", fontsize=7, zorder=5)
                box = t.get_window_extent(renderer)
                shift = max(0.0, ax_box.x0 + 2 - box.x0) - max(0.0, box.x1 - (ax_box.x1 - 2))
                if shift:
                    x_disp = ax.transData.transform((mid, 0))[0] + shift
                    t.set_x(ax.transData.inverted().transform((x_disp, 0))[0])
                    box = t.get_window_extent(renderer)
                if n == len(levels) - 1 or not any(box.overlaps(o) for o in placed):
                    break
                t.remove()
            placed.append(box.expanded(1.05, 1.1))
            for x in xs:
                ax.annotate("", (x, row + (0.3 if dy > 0 else -0.3)), xytext=(t.get_position()[0], row + dy
                            - (0.12 if dy > 0 else -0.12)),
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#555555"})

    def bars(ax: Any, lo: int, hi: int, rows: tuple[tuple[int, str], ...], unit: int,
             min_label: float) -> None:
        shown = [r for r in m.regions if r.end > lo and r.start < hi]
        for row, vtl in rows:
            for r in shown:
                start, end = max(r.start, lo), min(r.end, hi)
                unmapped = getattr(r, vtl) == "none"
                ax.barh(row, (end - start) / unit, left=start / unit, height=0.6,
                        color=COLOURS_BY_NAME.get(getattr(r, vtl), "#ff00ff"),
                        edgecolor=VTL1_RED if unmapped else "white", linewidth=0 if unmapped else 0.4,
                        hatch="//" if unmapped else None)
        top_row = max(row for row, _ in rows)
        # Regions of the same name and access whose middles lie within a tenth of the panel
        # share one label, placed over the widest of them, with a line to each.
        labels: list[tuple[str, list[tuple[int, float]]]] = []
        group: dict[str, list[tuple[int, float]]] = {}
        for r in shown:
            a, b = max(r.start, lo), min(r.end, hi)
            if b - a < (hi - lo) * min_label:
                continue
            text = f"{r.label}\n{'unmapped' if r.vtl0 == 'none' else r.vtl0}"
            mid = (a + b) / 2 / unit
            if text not in group or mid - group[text][0][1] > (hi - lo) / unit / 10:
                group[text] = []
                labels.append((text, group[text]))
            group[text].append((b - a, mid))
        ax.set_xlim(lo / unit, hi / unit)
        ax.set_ylim(min(row for row, _ in rows) - 1.2, top_row + 1.2)
        pending.append((ax, labels, top_row))

    def vtl1_note(ax: Any, lo: int, hi: int, unit: int) -> None:
        a, b = max(m.vtl1_base, lo), min(m.vtl1_end, hi)
        if a < b:
            ax.text((a + b) / 2 / unit, 0, "VTL1's own memory", ha="center", va="center",
                    fontsize=7, color=VTL1_RED, zorder=5)

    pending: list[tuple[Any, list[tuple[str, list[tuple[int, float]]]], float]] = []
    heki = m.mode == "heki"
    rows = ((0, "vtl0"),) if heki else ((1, "vtl0"), (0, "vtl1"))
    ticks: tuple[list[int], list[str]] = (([0], ["the VM (Heki)"]) if heki else
                                          ([0, 1], ["VTL1's VM", "VTL0's VM"]))
    bars(whole, 0, m.mem_size, rows, MiB, 1 / 20)
    if not heki:
        vtl1_note(whole, 0, m.mem_size, MiB)
    whole.set_yticks(*ticks)
    whole.set_xlabel(f"guest-physical address (MiB): all {_mib(m.mem_size)} of guest memory")
    whole.set_title(f"Memory attributes after a hardened boot ({m.backend} backend); " + (
                    "Heki mode, the host's page permissions as enforced here (hatched: not guest memory)"
                    if heki else
                    "VTL1's region (hatched on VTL0's bar) is never mapped in VTL0's VM"), fontsize=10)
    bars(top, 0, detail, rows, MiB, 1 / 40)
    if not heki:
        vtl1_note(top, 0, detail, MiB)
    top.set_yticks(*ticks)
    rest = f" of {_mib(m.mem_size)}" if detail < m.mem_size else ""
    top.set_xlabel(f"guest-physical address (MiB): the first {_mib(detail)}{rest}")
    if image:
        lo, hi = min(r.start for r in image), max(r.end for r in image)
        bars(zoom, lo, hi, ((0, "vtl0"),), 1024, 0.0)
        zoom.set_yticks([0], ["the VM (Heki)" if heki else "VTL0's VM"])
        zoom.set_xlabel(f"guest-physical address (KiB): VTL0's kernel image, {lo:#x}-{hi:#x}")
        zoom.set_title(f"NX: {m.nx_enforced_by}", fontsize=9)
    else:
        zoom.set_axis_off()
    fig.legend(handles=[Patch(color=c, label=f"{k}: {LEGEND[k]}") for k, c in COLOURS_BY_NAME.items()],
               loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.canvas.draw()                        # the panels are where they stay: place the labels
    for ax, labels, row in pending:
        place_labels(ax, labels, row)
    save_png(fig, path)


def render(m: MemMap) -> str:
    head = (f"Heki mode: the guest's memory as the host-owned Heki policy left it after a hardened boot "
            f"({m.mem_size >> 20} MiB, {m.backend} backend), as this host enforces it; no VTL1"
            if m.mode == "heki" else
            f"VTL0's memory as VTL1 left it after a hardened boot ({m.mem_size >> 20} MiB, "
            f"{m.backend} backend); VTL1's VM maps all of it rwx")
    lines = [head,
             f"  {'start':>10}  {'end':>10}  {'pages':>6}  VTL0  label"]
    for r in m.regions:
        lines.append(f"  {r.start:#10x}  {r.end:#10x}  {(r.end - r.start) // PAGE_SIZE:6}  "
                     f"{r.vtl0:<4}  {r.label}")
    lines.append(f"NX is enforced by: {m.nx_enforced_by}")
    for v in m.vps:
        judged = " ".join(v.judged) or "nothing (not locked)"
        lines.append(f"{'registers' if v.index == 0 else '':<9} vp{v.index}: VTL1 judges {judged}; "
                     f"CR0 {v.cr0:#x} CR4 {v.cr4:#x} EFER {v.efer:#x}")
    lines.append("legend: " + ", ".join(f"{k} {v}" for k, v in LEGEND.items()))
    return "\n".join(lines)
