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
from vtl.run import control
from vtl.run.result import raise_if_interrupted

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


class MemMap(BaseModel):
    mem_size: int
    backend: str
    regions: list[Region]
    nx_enforced_by: str
    vtl1_base: int
    vtl1_end: int


def _labels(syms: dict[str, int], start: int, attrs: int) -> str:
    if attrs == -1:
        return "VTL1 region"
    for lo, hi, name in (("_text_start", "_text_end", "kernel text"),
                         ("_text_end", "_scenarios_page_end", "rodata"),
                         ("_ro_after_init_start", "_ro_after_init_end", "ro_after_init"),
                         ("_data_start", "_image_end", "data + bss")):
        if lo in syms and hi in syms and syms[lo] <= start < syms[hi]:
            # Read-only pages inside data+bss are the locked page tables.
            return "page tables (locked)" if name == "data + bss" and attrs == NW | NX else name
    return "free memory" if start >= syms.get("_image_end", 0) else "low memory"


def build(vtl0: Path, vtl1: Path, mem_size: int = 256 << 20, backend: Backend | None = None) -> MemMap:
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario="harden", mem_size=mem_size,
                          attr_backend=backend)
    with Partition(cfg, EventLog()) as p:
        result, _ = control.run(p, None, 60.0)
        raise_if_interrupted(result)
        if result.status != 0:
            raise RuntimeError(f"the hardened boot failed: {result.message}")
        runs = p.vtl0_runs()
        syms = p.vtl0_image.symbols()
        backend_name = p.backend_name
        layout = p.layout
    regions = [Region(start=start, end=end, vtl0="none" if a == -1 else describe(a), vtl1="rwx",
                      label=_labels(syms, start, a)) for start, end, a in runs]
    nx = ("KVM attributes" if backend_name == "rwx" else
          "VTL0's page tables (NX bits) locked r-- by VTL1, EFER.NXE pinned by the MSR filter")
    return MemMap(mem_size=mem_size, backend=backend_name, regions=regions, nx_enforced_by=nx,
                  vtl1_base=layout.vtl1_base, vtl1_end=layout.vtl1_end)


IMAGE_LABELS = ("kernel text", "rodata", "ro_after_init", "data + bss", "page tables (locked)")


def draw_png(m: MemMap, path: Path, limit: int = 32 << 20) -> None:
    """Draw the map: above, the first `limit` bytes of guest-physical memory, one bar per
    VTL's VM; below, VTL0's kernel image up close.  An address axis, each region coloured
    by what the VTL may do there and labelled, a legend of the attributes, VTL1's region
    marked."""
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
    fig, (top, zoom) = plt.subplots(2, 1, figsize=(13, 7.5), dpi=110, height_ratios=[1.3, 1])

    def bars(ax: Any, lo: int, hi: int, rows: tuple[tuple[int, str], ...], unit: int,
             min_label: float) -> None:
        shown = [r for r in m.regions if r.end > lo and r.start < hi]
        for row, vtl in rows:
            for r in shown:
                start, end = max(r.start, lo), min(r.end, hi)
                ax.barh(row, (end - start) / unit, left=start / unit, height=0.6,
                        color=COLOURS_BY_NAME.get(getattr(r, vtl), "#ff00ff"), edgecolor="white",
                        linewidth=0.4)
        top_row = max(row for row, _ in rows)
        labelled = [r for r in shown if (min(r.end, hi) - max(r.start, lo)) >= (hi - lo) * min_label]
        for i, r in enumerate(labelled):
            mid = (max(r.start, lo) + min(r.end, hi)) / 2 / unit
            above = i % 2 == 0
            y, y_text = (0.3, 0.62) if above else (-0.3, -0.62)
            ax.annotate(f"{r.label}\n{'unmapped' if r.vtl0 == 'none' else r.vtl0}",
                        (mid, top_row + y), xytext=(mid, top_row + y_text),
                        ha="center", va="center", fontsize=7,
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#555555"})
        ax.set_xlim(lo / unit, hi / unit)

    bars(top, 0, limit, ((1, "vtl0"), (0, "vtl1")), MiB, 1 / 40)
    top.axvspan(m.vtl1_base / MiB, min(m.vtl1_end, limit) / MiB, fill=False, hatch="//",
                edgecolor="#b03030", linewidth=0)
    top.text((m.vtl1_base + min(m.vtl1_end, limit)) / 2 / MiB, -0.62,
             "VTL1's region: VTL1's own memory, never mapped in VTL0's VM", ha="center", fontsize=8,
             color="#b03030")
    top.set_yticks([0, 1], ["VTL1's VM", "VTL0's VM"])
    top.set_ylim(-0.9, 1.9)
    top.set_xlabel("guest-physical address (MiB)")
    top.set_title(f"Memory attributes after a hardened boot ({m.backend} backend)", fontsize=10)
    if image:
        lo, hi = min(r.start for r in image), max(r.end for r in image)
        bars(zoom, lo, hi, ((0, "vtl0"),), 1024, 0.0)
        zoom.set_yticks([0], ["VTL0's VM"])
        zoom.set_ylim(-1.0, 1.0)
        zoom.set_xlabel("guest-physical address (KiB): VTL0's kernel image")
        zoom.set_title(f"VTL0's image up close; NX: {m.nx_enforced_by}", fontsize=9)
    else:
        zoom.set_axis_off()
    fig.legend(handles=[Patch(color=c, label=f"{k}: {LEGEND[k]}") for k, c in COLOURS_BY_NAME.items()],
               loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def render(m: MemMap) -> str:
    lines = [f"VTL0's memory as VTL1 left it after a hardened boot ({m.mem_size >> 20} MiB, "
             f"{m.backend} backend); VTL1's VM maps all of it rwx",
             f"  {'start':>10}  {'end':>10}  {'pages':>6}  VTL0  label"]
    for r in m.regions:
        lines.append(f"  {r.start:#10x}  {r.end:#10x}  {(r.end - r.start) // PAGE_SIZE:6}  "
                     f"{r.vtl0:<4}  {r.label}")
    lines.append(f"NX is enforced by: {m.nx_enforced_by}")
    lines.append("legend: " + ", ".join(f"{k} {v}" for k, v in LEGEND.items()))
    return "\n".join(lines)
