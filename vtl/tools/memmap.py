"""`vtl memmap`: VTL0's and VTL1's view of guest memory after a hardened boot
(scenario `harden`: attributes per section, page tables locked, end of boot)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydantic import BaseModel

from vmm.memattr import NR, NW, NX, describe
from vmm.memory import PAGE_SIZE
from vtl import control
from vtl.events import EventLog
from vtl.partition import Partition, PartitionConfig

COLOURS = {  # attrs -> RGB; VTL1-only memory is -1
    0: (235, 235, 235), NX: (110, 190, 110), NW: (80, 120, 220), NW | NX: (240, 200, 60),
    NR | NW | NX: (40, 40, 40), -1: (200, 60, 60)}
LEGEND = {"rwx": "no restriction", "rw-": "data (NX)", "r-x": "text", "r--": "read-only",
          "---": "no access", "VTL1": "VTL1's region: not mapped in VTL0's VM"}


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


def build(vtl0: Path, vtl1: Path, mem_size: int = 256 << 20) -> tuple[MemMap, bytes]:
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario="harden", mem_size=mem_size)
    with Partition(cfg, EventLog()) as p:
        result, _ = control.run(p, None, 60.0)
        if result.status != 0:
            raise RuntimeError(f"the hardened boot failed: {result.message}")
        runs = p.protection.runs()
        attr_map = bytes(p.protection.map)
        syms = p.vtl0_image.symbols()
        backend = p.protection.kind
        layout = p.layout
    regions = [Region(start=start, end=end, vtl0="none" if a == -1 else describe(a), vtl1="rwx",
                      label=_labels(syms, start, a)) for start, end, a in runs]
    nx = ("KVM attributes" if backend == "rwx" else
          "VTL0's page tables (NX bits) locked r-- by VTL1, EFER.NXE pinned by the MSR filter")
    img = [(-1 if layout.in_vtl1(i * PAGE_SIZE) else a) for i, a in enumerate(attr_map)]
    return MemMap(mem_size=mem_size, backend=backend, regions=regions, nx_enforced_by=nx), \
        png(img, cols=128, limit=(32 << 20) // PAGE_SIZE)


def png(attrs: list[int], cols: int, limit: int, scale: int = 4) -> bytes:
    """One square per 4 KiB page, `cols` pages a row, the first `limit` pages."""
    pages = attrs[:limit]
    rows = -(-len(pages) // cols)
    w, h = cols * scale, rows * scale
    raw = bytearray()
    for r in range(rows):
        line = bytearray()
        for c in range(cols):
            i = r * cols + c
            rgb = COLOURS.get(pages[i], (255, 0, 255)) if i < len(pages) else (255, 255, 255)
            px = bytes(rgb) if (c * scale) % (scale * 32) else bytes(int(v * 0.8) for v in rgb)
            line += px + bytes(rgb) * (scale - 1)
        for _ in range(scale):
            raw += b"\x00" + line

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))


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
