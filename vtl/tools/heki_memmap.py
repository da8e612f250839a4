"""`vtl memmap --mode heki`: the guest's memory after a hardened boot in Heki mode (one VM,
the host-owned Heki policy, docs/heki-mode.md), as the attribute backend enforces it on this
host: pages Heki made read-only are r-x (no-exec needs MBEC, which this host lacks, so
nothing is made non-executable by Heki), the privileged section (the stand-in for KVM's CR
masks) is --- for the guest."""

from __future__ import annotations

from vmm.memattr import describe
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.modes.heki import HekiScheduler, heki_config
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.tools.memmap import MemMap, Region, _labels

NX_HEKI = ("the kernel's own page tables (Heki does not lock them); MEM_ATTR_EXEC is not enforced on this "
           "host (needs MBEC): Heki makes no page non-executable here")


def heki_build(config: PartitionConfig) -> MemMap:
    with Partition(heki_config(config), EventLog()) as p:
        result, sched = control.run(p, None, 60.0, scheduler=HekiScheduler)
        raise_if_interrupted(result)
        if result.status != 0:
            raise RuntimeError(f"the hardened boot in Heki mode failed: {result.message}")
        runs = p.vtl0_runs()
        syms = p.vtl0_image.symbols()
        backend_name, layout = p.backend_name, p.layout
        section = sched.heki.state.section if isinstance(sched, HekiScheduler) else None
    priv = (section[0], section[0] + section[1] * 4096) if section else (0, 0)
    # Heki leaves data and the memory after the image alike (RW-, executable here): split the
    # runs at the image's end so that the labels (and the picture's close-up) say which is which.
    end = syms.get("_image_end", 0)
    runs = [piece for start, stop, a in runs
            for piece in ([(start, end, a), (end, stop, a)] if start < end < stop else [(start, stop, a)])]
    regions = [Region(start=start, end=end, vtl0="none" if a == -1 else describe(a), vtl1="none",
                      label="not guest memory (VTL mode's VTL1 region)" if a == -1 else
                      _labels(syms, start, a, priv)) for start, end, a in runs]
    return MemMap(mem_size=config.mem_size, backend=backend_name, regions=regions, nx_enforced_by=NX_HEKI,
                  vtl1_base=layout.vtl1_base, vtl1_end=layout.vtl1_end, mode="heki")
