"""`vtl memmap`: VTL0's and VTL1's view of guest memory after a hardened boot
(scenario `harden`: attributes per section, page tables locked, end of boot)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from vmm.memattr import NW, NX, describe
from vmm.memory import PAGE_SIZE
from vtl.core.config import Backend, PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.run import control

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


def draw_png(m: MemMap, path: Path, limit: int = 32 << 20) -> None:
    """Draw the first `limit` bytes of guest-physical memory as one bar per VTL: an address
    axis, each region coloured by what that VTL may do and labelled, a legend of the
    attributes, VTL1's region marked."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError("--png needs matplotlib (pip install '.[plot]'; `make setup` installs it)") \
            from None
    MiB = 1 << 20
    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    shown = [r for r in m.regions if r.start < limit]
    for row, vtl in ((1, "vtl0"), (0, "vtl1")):
        for r in shown:
            attrs = getattr(r, vtl)
            end = min(r.end, limit)
            ax.barh(row, (end - r.start) / MiB, left=r.start / MiB, height=0.6,
                    color=COLOURS_BY_NAME.get(attrs, "#ff00ff"), edgecolor="white", linewidth=0.4)
    # Label each VTL0 region wide enough to carry text, alternating above and below.
    for i, r in enumerate(x for x in shown if (min(x.end, limit) - x.start) >= limit / 64):
        mid = (r.start + min(r.end, limit)) / 2 / MiB
        y = 1.42 if i % 2 == 0 else 0.58
        ax.annotate(f"{r.label}\n{r.vtl0 if r.vtl0 != 'none' else 'unmapped'}", (mid, 1.3 if y > 1 else 0.7),
                    xytext=(mid, y), ha="center", va="center", fontsize=7,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "#555555"})
    ax.axvspan(m.vtl1_base / MiB, min(m.vtl1_end, limit) / MiB, ymin=0, ymax=1, fill=False, hatch="//",
               edgecolor="#b03030", linewidth=0)
    ax.text((m.vtl1_base + min(m.vtl1_end, limit)) / 2 / MiB, -0.55,
            "VTL1's region (never mapped in VTL0's VM)", ha="center", fontsize=8, color="#b03030")
    ax.set_yticks([0, 1], ["VTL1's VM", "VTL0's VM"])
    ax.set_ylim(-0.8, 1.8)
    ax.set_xlim(0, limit / MiB)
    ax.set_xlabel("guest-physical address (MiB)")
    ax.set_title(f"Memory attributes after a hardened boot ({m.backend} backend; NX: {m.nx_enforced_by})",
                 fontsize=9)
    ax.legend(handles=[Patch(color=c, label=f"{k}: {LEGEND[k]}") for k, c in COLOURS_BY_NAME.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
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
