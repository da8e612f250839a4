"""`vtl compare`: the two designs side by side on the same VTL0 kernel, in one run.

1. Every attack and lifecycle scenario of the image in both modes, each in a fresh
   partition: VTL mode (VTL1 owns the policy) and Heki mode (one VM, the VMM as KVM with
   the Heki patches, docs/heki-mode.md).  Each outcome is what the VMM observed
   (vtl/tools/attack.py, heki_attack.py, lifecycle_compare.py), then compared with what
   that mode's design should give (vtl/tools/expectations.py); the table says where the
   two modes' outcomes differ.
2. Costs in both modes, each figure from the guest's RDTSC batches (or the VMM's own
   clock where the guest cannot see the work), beside floors measured in the same run
   (vmm/floor.py): the Python and C KVM_RUN ping-pong between two VMs (what any userspace
   exit costs here) and the in-kernel exit floor, a guest instruction KVM handles without
   leaving the kernel (MOV to CR0, CPUID), which is what a CR write or a hypercall costs
   in-KVM Heki on this host.  So each Heki row reads both "as emulated here" (the stand-in
   in userspace) and "what in-KVM would cost".
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from vmm.elf import read_image
from vmm.errors import VmmError
from vmm.floor import FloorResult, c_floor, inkernel_floor, python_floor
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI, abi_ffi
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import REPO, UnknownScenario, near_names, scenarios
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.modes.heki import HekiScheduler, heki_config
from vtl.run import control
from vtl.run.result import raise_if_interrupted
from vtl.run.scheduler import Scheduler
from vtl.services.protection import Vtl0Protection
from vtl.tools.attack import attack_scenarios, run_attack
from vtl.tools.expectations import LIFECYCLE
from vtl.tools.figures import save_png
from vtl.tools.heki_attack import run_heki_attack
from vtl.tools.lifecycle_compare import IN_GUEST, abridge_in_guest, run_lifecycle
from vtl.tools.progress import QUIET, Step

MODES = ("vtl", "heki")
C_FLOOR = REPO / "bench" / "floor_c"
PROTECT_PAGES = 4096
COMMAND = "python3 -m vtl compare"


class ModeOutcome(BaseModel):
    outcome: str
    mechanism: str
    expected_outcome: str
    as_expected: bool


class ScenarioRow(BaseModel):
    scenario: str
    kind: str  # attack | lifecycle
    category: str  # vtl/tools/expectations.py (Heki's view of the scenario)
    vtl: ModeOutcome
    heki: ModeOutcome
    differ: bool  # the observed outcomes differ


class Timing(BaseModel):
    median_ns: float
    p10_ns: float
    p90_ns: float
    n: int


class CostRow(BaseModel):
    key: str
    what: str
    vtl: Timing | None
    heki: Timing | None
    heki_in_kvm_ns: float | None = None  # the in-kernel floor that stands for in-KVM Heki's cost
    how: str


class Floor(BaseModel):
    key: str
    what: str
    median_ns: float
    p10_ns: float
    p90_ns: float


class PartitionCost(BaseModel):
    vms: int
    vcpus: int
    rss_mib: float  # VmRSS this process gained for the partition, booted and hardened


class CompareReport(BaseModel):
    host: str
    command: str
    scenarios: list[ScenarioRow]
    costs: list[CostRow]
    floors: list[Floor]
    partition: dict[str, PartitionCost]
    not_measured: dict[str, str]
    wall_s: float

    def summary(self) -> dict[str, Any]:
        rows = self.scenarios
        return {
            "scenarios": len(rows),
            "differ": sum(r.differ for r in rows),
            "as_expected": {m: sum(getattr(r, m).as_expected for r in rows) for m in MODES},
        }


# --- scenarios -----------------------------------------------------------------------
def compare_scenarios(vtl0: Path, only: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(name, kind, VTL mode's expectation text) of every attack and lifecycle scenario."""
    # One-VP scenarios: Heki mode has one VP, and the cross-VP attacks need VTL1 on several.
    found = [(n, "attack", e) for n, e in attack_scenarios(vtl0, max_vps=1)]
    names = {s.name for s in scenarios(read_image(vtl0))}
    found += [(n, "lifecycle", "") for n in LIFECYCLE if n in names]
    if only:
        known = [n for n, _, _ in found]
        unknown = [n for n in only if n not in known]
        if unknown:
            raise UnknownScenario(
                f"{unknown[0]!r} is not an attack or lifecycle scenario of {vtl0}; "
                f"{near_names(unknown[0], known)}`vtl scenarios` lists all"
            )
        found = [f for f in found if f[0] in only]
    return found


def run_scenario_both(
    name: str, kind: str, expected: str, vtl0: Path, vtl1: Path, step: Step = QUIET
) -> ScenarioRow:
    out: dict[str, ModeOutcome] = {}
    cat = ""
    for mode in MODES:
        step(f"{name} ({mode})")
        if kind == "lifecycle":
            lr = run_lifecycle(name, mode, vtl0, vtl1)
            out[mode] = ModeOutcome(
                outcome=lr.outcome,
                mechanism=lr.mechanism,
                expected_outcome=lr.expected_outcome,
                as_expected=lr.as_expected,
            )
            cat = lr.category
        else:
            ar = run_heki_attack(name, vtl0) if mode == "heki" else run_attack(name, expected, vtl0, vtl1)
            out[mode] = ModeOutcome(
                outcome=ar.outcome,
                mechanism=ar.mechanism,
                expected_outcome=ar.expected_outcome,
                as_expected=ar.as_expected,
            )
            cat = ar.category if mode == "heki" else cat
        step(f"{name} ({mode})", out[mode].outcome)
    return ScenarioRow(
        scenario=name,
        kind=kind,
        category=cat,
        vtl=out["vtl"],
        heki=out["heki"],
        differ=out["vtl"].outcome != out["heki"].outcome,
    )


# --- costs ---------------------------------------------------------------------------
def _config(mode: str, vtl0: Path, vtl1: Path, scenario: str, param: int = 0) -> PartitionConfig:
    cfg = PartitionConfig(vtl0_image=vtl0, vtl1_image=vtl1, scenario=scenario, param=param)
    return heki_config(cfg) if mode == "heki" else cfg


def _run(mode: str, cfg: PartitionConfig) -> tuple[Any, Any, Partition]:
    p = Partition(cfg, EventLog(keep=0))
    result, sched = control.run(p, None, 600.0, scheduler=HekiScheduler if mode == "heki" else Scheduler)
    raise_if_interrupted(result)
    return result, sched, p


def _timing(per: list[float]) -> Timing:
    s = sorted(per)
    return Timing(
        median_ns=statistics.median(s),
        p10_ns=s[int(0.1 * len(s))],
        p90_ns=s[min(len(s) - 1, int(0.9 * len(s)))],
        n=len(s),
    )


def stamped(mode: str, scenario: str, key: str, param: int, vtl0: Path, vtl1: Path) -> Timing:
    """Per operation, from the guest's STAMPS report `key` (RDTSC every batch)."""
    result, sched, p = _run(mode, _config(mode, vtl0, vtl1, scenario, param))
    with p:
        vcpu = p.vps[0].vcpus[Vtl.VTL0]
        khz = vcpu.tsc_khz() if vcpu is not None else 0
    found = [r for r in sched.reports.of_kind("stamps") if r.name == key]
    if result.status != 0 or not found or not khz:
        raise VmmError(f"{scenario} in {mode} mode reported no timing: {result.message}")
    stamps, batch = found[-1].u64s(), found[-1].value[0]
    per = [(b - a) * 1e6 / khz / batch for a, b in zip(stamps, stamps[1:], strict=False)]
    if not per:
        raise VmmError(f"{scenario} in {mode} mode reported {len(stamps)} stamps")
    t = _timing(per)
    return t.model_copy(update={"n": t.n * batch})


def hardened_boot(mode: str, vtl0: Path, vtl1: Path, repeats: int = 3) -> tuple[Timing, PartitionCost]:
    """The `harden` scenario (boot, harden, exit), wall time per run; and what the booted,
    hardened partition holds: VMs, vCPUs, and the VmRSS this process gained for it."""
    per: list[float] = []
    cost = PartitionCost(vms=0, vcpus=0, rss_mib=0.0)
    for i in range(repeats):
        rss0 = _rss_kib()
        t0 = time.perf_counter()
        result, _, p = _run(mode, _config(mode, vtl0, vtl1, "harden"))
        per.append((time.perf_counter() - t0) * 1e9)
        with p:
            if result.status != 0:
                raise VmmError(f"harden in {mode} mode failed: {result.message}")
            if i == 0:
                vms = sum(1 for vm in p.vms if vm is not None)
                vcpus = sum(1 for vp in p.vps for c in vp.vcpus if c is not None)
                cost = PartitionCost(vms=vms, vcpus=vcpus, rss_mib=round((_rss_kib() - rss0) / 1024, 1))
    return _timing(per), cost


def _rss_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def protect_cost(mode: str, layout: str, pages: int, vtl0: Path, vtl1: Path, repeats: int = 5) -> Timing:
    """The VMM's share of protecting `pages` pages read-only in one request, contiguous
    (one range) or alternating (every other page): VTL mode's VTL_HC_MODIFY_VTL_PROTECTION
    (as VTL1 issues it, repeated per VTL_PROTECT_MAX_PER_CALL entries), Heki mode's
    KVM_HC_PROTECT_MEMORY (page lists of 169 entries, chained), each through the same
    attribute backend, timed on the VMM's clock on a fresh partition per sample."""
    per: list[float] = []
    base = 64 << 20  # free VTL0 memory in both layouts
    gpas = (
        [base + i * PAGE_SIZE for i in range(pages)]
        if layout == "contiguous"
        else [base + 2 * i * PAGE_SIZE for i in range(pages)]
    )
    for _ in range(repeats):
        with Partition(_config(mode, vtl0, vtl1, "harden"), EventLog(keep=0)) as p:
            if mode == "heki":
                sched = HekiScheduler(p)
                list_pa = _heki_lists(p, gpas, layout)
                t0 = time.perf_counter()
                ret = sched.heki.protect_memory(p.vps[0], list_pa)[0]
                dt = time.perf_counter() - t0
                if ret != 0:
                    raise VmmError(f"KVM_HC_PROTECT_MEMORY of {pages} pages refused: {ret:#x}")
            else:
                prot = Vtl0Protection(p)
                req = _vtl_request(p, gpas, layout)
                t0 = time.perf_counter()
                res = prot.modify(req, Vtl.VTL1)
                while res.status == ABI.VTL_OK and res.next_index < _count(p, req):
                    _set_start(p, req, res.next_index)
                    res = prot.modify(req, Vtl.VTL1)
                dt = time.perf_counter() - t0
                if res.status != ABI.VTL_OK:
                    raise VmmError(f"VTL_HC_MODIFY_VTL_PROTECTION of {pages} pages refused: {res.reason}")
            per.append(dt * 1e9)
    return _timing(per)


def _heki_lists(p: Partition, gpas: list[int], layout: str) -> int:
    entries = (
        [(gpas[0], gpas[-1] + PAGE_SIZE)] if layout == "contiguous" else [(g, g + PAGE_SIZE) for g in gpas]
    )
    per_list = ABI.HEKI_PAGE_LIST_MAX_PAGES
    at = 32 << 20  # the lists' pages
    chunks = [entries[i : i + per_list] for i in range(0, len(entries), per_list)]
    first = at
    for n, chunk in enumerate(chunks):
        nxt = at + PAGE_SIZE if n + 1 < len(chunks) else 0
        raw = b"".join(x.to_bytes(8, "little") for x in (nxt, nxt, len(chunk)))
        perms = ABI.MEM_ATTR_READ | ABI.MEM_ATTR_EXEC
        raw += b"".join(
            a.to_bytes(8, "little") + b.to_bytes(8, "little") + perms.to_bytes(8, "little") for a, b in chunk
        )
        p.mem.write(at, raw)
        at += PAGE_SIZE
    return first


REQ = abi_ffi.sizeof("struct vtl_protect_request")


def _vtl_request(p: Partition, gpas: list[int], layout: str) -> int:
    """A request in VTL1's memory, as VTL1 builds it: one range, or a page list."""
    req, lst = p.layout.vtl1_base + (8 << 20), p.layout.vtl1_base + (8 << 20) + PAGE_SIZE
    if layout == "contiguous":
        flags, count = ABI.VTL_PROTECT_F_RANGES, 1
        p.mem.write(lst, gpas[0].to_bytes(8, "little") + len(gpas).to_bytes(8, "little"))
    else:
        flags, count = 0, len(gpas)
        p.mem.write(lst, b"".join(g.to_bytes(8, "little") for g in gpas))
    raw = (
        (0).to_bytes(4, "little")
        + int(ABI.VTL_MEM_NW).to_bytes(4, "little")
        + int(flags).to_bytes(4, "little")
        + count.to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + lst.to_bytes(8, "little")
    )
    p.mem.write(req, raw)
    return req


def _count(p: Partition, req: int) -> int:
    return int.from_bytes(p.mem.read(req + 12, 4), "little")


def _set_start(p: Partition, req: int, start: int) -> None:
    p.mem.write(req + 16, start.to_bytes(8, "little"))


def _floor(key: str, what: str, f: FloorResult) -> Floor:
    return Floor(key=key, what=what, median_ns=f.median_ns, p10_ns=f.p10_ns, p90_ns=f.p90_ns)




def cost_steps(modes: tuple[str, ...] = MODES) -> int:
    """How many times run_costs tells its Step of a new piece of work."""
    return 4 + 5 * len(modes)


def run_costs(
    vtl0: Path, vtl1: Path, ops: int = 1000, calls: int = 10000, step: Step = QUIET,
    modes: tuple[str, ...] = MODES,
) -> tuple[list[CostRow], list[Floor], dict[str, PartitionCost], dict[str, str]]:
    """The cost rows for `modes` (both, or one for `vtl bench --mode heki`), and the floors."""
    missing: dict[str, str] = {}
    step("floors: Python and C KVM_RUN ping-pong")
    floors = [
        _floor(
            "python_floor",
            "userspace exit: Python KVM_RUN ping-pong between two VMs (per pair)",
            python_floor(calls),
        )
    ]
    if C_FLOOR.exists():
        floors.append(
            _floor(
                "c_floor",
                "userspace exit: C KVM_RUN ping-pong between two VMs (per pair)",
                c_floor(calls, C_FLOOR),
            )
        )
    else:
        missing["c_floor"] = f"{C_FLOOR} is not built (make bench)"
    step("floors: in-kernel exits")
    ik = {k: inkernel_floor(k, max(ops, 2000)) for k in ("loop", "mov_cr0", "cpuid")}
    floors += [
        _floor("inkernel_loop", "no exit: the timing loop alone (xor; dec; jnz)", ik["loop"]),
        _floor(
            "inkernel_mov_cr0", "in-kernel exit: MOV to CR0 of its own value (loop included)", ik["mov_cr0"]
        ),
        _floor("inkernel_cpuid", "in-kernel exit: CPUID (loop included)", ik["cpuid"]),
    ]
    net_cr = max(0.0, ik["mov_cr0"].median_ns - ik["loop"].median_ns)
    net_cpuid = max(0.0, ik["cpuid"].median_ns - ik["loop"].median_ns)
    part: dict[str, PartitionCost] = {}
    boot: dict[str, Timing] = {}
    for mode in modes:
        step(f"hardened boot ({mode})")
        boot[mode], part[mode] = hardened_boot(mode, vtl0, vtl1)
    rows = [
        CostRow(
            key="hardened_boot",
            what="boot + hardening (the `harden` run, wall, per run)",
            vtl=boot.get("vtl"),
            heki=boot.get("heki"),
            how="VMM clock around a whole run: VTL mode enables VTL1 (a VM), VTL1 protects and locks; "
            "Heki mode pins CRs and sends one page list",
        )
    ]
    null_vtl = null_heki = None
    if "vtl" in modes:
        step("null VTL call (vtl)")
        null_vtl = stamped("vtl", "bench-null-call", "null_call", calls, vtl0, vtl1)
    if "heki" in modes:
        step("null Heki hypercall (heki)")
        null_heki = stamped("heki", "bench-heki-null", "heki_null", calls, vtl0, vtl1)
    rows.append(
        CostRow(
            key="null_call",
            what="null VTL call (VTL) / null Heki hypercall (Heki)",
            vtl=null_vtl,
            heki=null_heki,
            heki_in_kvm_ns=net_cpuid,
            how="guest RDTSC per 100: VTL0 -> VTL1 -> VTL0 with nothing done; the KVM_HC_LOCK_CR_UPDATE "
            "version query on the hypercall port (in-KVM: a VMCALL KVM answers in the kernel, "
            "~ the in-kernel CPUID exit)",
        )
    )
    for key, scenario, stamp, what, in_kvm, how in (
        (
            "cr_write_allowed",
            "bench-cr4-write",
            "cr4_write",
            "an allowed CR write (MOV to CR4 of its own value)",
            net_cr,
            "VTL: the privileged section's fetch exit, decode, a register intercept VTL1 allows; Heki: "
            "the same exit and decode, the host's heki_check_cr (in-KVM: KVM's CR exit, ~ the in-kernel "
            "MOV to CR0 exit)",
        ),
        (
            "cr_write_refused",
            "bench-cr-refused",
            "cr_refused",
            "a refused CR write (MOV to CR0 clearing WP -> #GP)",
            net_cr,
            "as above, then #GP(0) injected, the guest's handler resumes (in-KVM: KVM's CR exit)",
        ),
        (
            "memory_violation",
            "bench-mem-violation",
            "mem_violation",
            "a memory violation (write to rodata -> #PF)",
            net_cpuid,
            "VTL: the write exits, a secure intercept to VTL1, VTL1 injects #PF; Heki: the write "
            "exits, the host injects #PF (in-KVM: an EPT violation KVM turns into a #PF in the kernel, ~ an "
            "in-kernel exit)",
        ),
    ):
        timings: dict[str, Timing | None] = {"vtl": None, "heki": None}
        for mode in modes:
            step(f"{what} ({mode})")
            try:
                timings[mode] = stamped(mode, scenario, stamp, ops, vtl0, vtl1)
            except VmmError as e:
                timings[mode], missing[f"{key}_{mode}"] = None, str(e)
        rows.append(
            CostRow(
                key=key,
                what=what,
                vtl=timings["vtl"],
                heki=timings["heki"],
                heki_in_kvm_ns=in_kvm,
                how=f"guest RDTSC per 100, {ops} operations. {how}",
            )
        )
    for layout in ("contiguous", "alternating"):
        step(f"protecting {PROTECT_PAGES} pages, {layout}")
        rows.append(
            CostRow(
                key=f"protect_{layout}",
                what=f"protecting {PROTECT_PAGES} pages read-only, {layout}",
                vtl=protect_cost("vtl", layout, PROTECT_PAGES, vtl0, vtl1) if "vtl" in modes else None,
                heki=protect_cost("heki", layout, PROTECT_PAGES, vtl0, vtl1) if "heki" in modes else None,
                how="the VMM's handling of one request on its clock (VTL_HC_MODIFY_VTL_PROTECTION from VTL1 "
                "/ KVM_HC_PROTECT_MEMORY page lists), through the same attribute backend; the guest's "
                "transitions are the null-call row",
            )
        )
    return rows, floors, part, missing


def run_compare(
    vtl0: Path,
    vtl1: Path,
    only: list[str] | None = None,
    ops: int = 1000,
    calls: int = 10000,
    progress: Callable[[int], Any] | None = None,
    command: str = COMMAND,
) -> CompareReport:
    t0 = time.perf_counter()
    found = compare_scenarios(vtl0, only)
    total = 2 * len(found) + cost_steps()
    from contextlib import nullcontext

    with (progress or (lambda n: nullcontext(QUIET)))(total) as step:
        rows = [run_scenario_both(name, kind, exp, vtl0, vtl1, step) for name, kind, exp in found]
        costs, floors, part, missing = run_costs(vtl0, vtl1, ops, calls, step)
    return CompareReport(
        host=f"{platform.node()} {os.uname().release}",
        command=command,
        scenarios=rows,
        costs=costs,
        floors=floors,
        partition=part,
        not_measured=missing,
        wall_s=round(time.perf_counter() - t0, 1),
    )


# --- output --------------------------------------------------------------------------
def _us(t: Timing | None) -> str:
    return "-" if t is None else _fmt_ns(t.median_ns)


def _fmt_ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    return f"{ns / 1000:.2f} µs"


def render(r: CompareReport) -> str:
    rows = r.scenarios
    w = max([len(x.scenario) for x in rows] + [8])
    wv = max([len(x.vtl.outcome) for x in rows] + [8])
    wh = max([len(x.heki.outcome) for x in rows] + [8])
    lines = [
        f"Scenarios, each in a fresh partition per mode; outcomes observed by the VMM ({r.host})",
        f"  {'scenario':<{w}}  {'VTL mode':<{wv}}  {'Heki mode':<{wh}}  differ  "
        "deciding mechanism (VTL | Heki)",
    ]
    for x in rows:
        mark = lambda m: "" if m.as_expected else " (!)"  # noqa: E731
        lines.append(
            f"  {x.scenario:<{w}}  {x.vtl.outcome + mark(x.vtl):<{wv}}  {x.heki.outcome + mark(x.heki):<{wh}}"
            f"  {'yes' if x.differ else '':<6}  {deciding(x.vtl.mechanism)} | {deciding(x.heki.mechanism)}"
        )
    s = r.summary()
    lines.append(
        f"  {s['scenarios']} scenarios; the outcomes differ in {s['differ']}; as each design gives: "
        f"VTL {s['as_expected']['vtl']}/{s['scenarios']}, Heki {s['as_expected']['heki']}/{s['scenarios']} "
        "((!) marks an outcome that is not; Heki's expectation: vtl/tools/expectations.py)"
    )
    lines.append("")
    lines += render_costs(r.costs, r.floors, r.partition, r.not_measured)
    lines.append(f"\n{r.command} ({r.wall_s:.0f} s)")
    return "\n".join(lines)


def render_costs(costs: list[CostRow], floors: list[Floor], partition: dict[str, PartitionCost],
                 not_measured: dict[str, str]) -> list[str]:
    lines = ['Costs (median; "in-KVM" = the in-kernel exit floor measured here, what in-KVM Heki pays '
             "instead of the userspace stand-in)",
             f"  {'what':<54} {'VTL mode':>10} {'Heki mode':>10} {'in-KVM':>10}"]
    for c in costs:
        ikvm = "-" if c.heki_in_kvm_ns is None else _fmt_ns(c.heki_in_kvm_ns)
        lines.append(f"  {c.what:<54} {_us(c.vtl):>10} {_us(c.heki):>10} {ikvm:>10}")
    for mode, pc in partition.items():
        lines.append(f"  partition, {mode:<4} mode: {pc.vms} VM(s), {pc.vcpus} vCPU(s), +{pc.rss_mib} MiB "
                     "RSS "
                     "(booted and hardened)")
    lines += ["", "Floors measured in the same run (median):"]
    for f in floors:
        lines.append(f"  {f.what:<74} {_fmt_ns(f.median_ns):>10}")
    for what, why in not_measured.items():
        lines.append(f"  not measured: {what}: {why}")
    return lines


LIFECYCLE_SHORT = (("0 kexec, ", ""), (", 0 reset", ""),
                   ("the last kernel passed; at the end ", "passed; then "),
                   ("the next kernel ended ", "next kernel: "), ("still held by the host: ", "host keeps "),
                   ("VTL1 is not enabled ", ""), ("VTL1 is disabled for this partition ", ""),
                   ("; at the end ", "; "), ("(VTL0 triple-faulted (KVM_EXIT_SHUTDOWN) near RIP ", "(RIP "),
                   ("0 reset; ", ""), ("no VTL1: -> ", "no VTL1 -> "))


def deciding(mechanism: str, n: int = 64) -> str:
    """The deciding mechanism in a few words, for the text table (the JSON keeps it whole)."""
    m = mechanism
    if m.startswith("changed: "):
        items = [i for i in m.removeprefix("changed: ").split("; ") if not i.startswith("nothing")]
        subjects = [i.split(" now")[0].split(" ran")[0].removesuffix(" at") for i in items]
        short = "not stopped: " + ", ".join(subjects)
    elif m.startswith(IN_GUEST):              # Heki mode's kexec: what the VMM found of the jump
        short, n = abridge_in_guest(m), 120
    elif "kexec," in m:                       # a lifecycle row: the counts, how it ended, what is held
        short = m
        for old, new in LIFECYCLE_SHORT:
            short = short.replace(old, new)
        n = 84
    else:
        head = m.split(": ")[0]
        tail = m.rsplit("->", 1)[1].split(";")[0].split(" (")[0].strip() if "->" in m else ""
        short = head + (f" -> {tail}" if tail else "")
    return short if len(short) <= n else short[: n - 1] + "…"


OUTCOME_COLOURS = {
    "blocked": "#3c8c3c",
    "succeeded": "#c83c3c",
    "not enforced on this host": "#e0a030",
    "not applicable": "#b4b4b4",
    "ran to the end": "#4f81bd",
    "policy outlived the kernel": "#8064a2",
    "detected after the fact": "#e07030",
    "error": "#202020",
    "failed": "#202020",
}


def draw_png(r: CompareReport, path: Path) -> None:
    """The outcome matrix (scenario x mode, coloured by outcome, differences marked) and
    the costs per mode on a log axis with the floors as lines.  Written through
    vmm/files.py (never over an input)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        raise RuntimeError(
            "--png needs matplotlib (pip install '.[plot]'; `make setup` installs it)"
        ) from None
    rows = r.scenarios
    n = len(rows)
    height = max(6.0, 0.2 * n + 2.5)
    fig = plt.figure(figsize=(16, height), dpi=100)
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 1.6], wspace=0.45)
    ax = fig.add_subplot(gs[0, 0])
    for i, x in enumerate(rows):
        y = n - 1 - i
        for j, m in enumerate(MODES):
            mo = getattr(x, m)
            ax.add_patch(
                plt.Rectangle((j, y), 1, 1, color=OUTCOME_COLOURS.get(mo.outcome, "#ff00ff"), ec="white")
            )
            if not mo.as_expected:
                ax.text(
                    j + 0.5,
                    y + 0.5,
                    "!",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
        if x.differ:
            ax.text(2.1, y + 0.5, "≠", ha="left", va="center", fontsize=9)
    ax.set_xlim(0, 2.4)
    ax.set_ylim(0, n)
    ax.set_xticks([0.5, 1.5], ["VTL mode\n(VTL1's policy)", "Heki mode\n(host's policy)"], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks([n - 1 - i + 0.5 for i in range(n)], [x.scenario for x in rows], fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    used = sorted({getattr(x, m).outcome for x in rows for m in MODES})
    ax.legend(
        handles=[Patch(color=OUTCOME_COLOURS.get(o, "#ff00ff"), label=o) for o in used],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.01),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    s = r.summary()
    ax.set_title(
        f"{s['scenarios']} scenarios, observed by the VMM; ≠: the modes differ ({s['differ']});\n"
        "!: not what the mode's design gives",
        fontsize=9,
        pad=34,
    )
    cx = fig.add_subplot(gs[0, 1])
    costs = r.costs
    labels = [c.what for c in costs]
    ys = list(range(len(costs)))
    bar_h = 0.26
    ikvm = [c.heki_in_kvm_ns / 1000 if c.heki_in_kvm_ns else 0 for c in costs]
    series = [
        ("VTL mode, as emulated here", "#4f81bd", [c.vtl.median_ns / 1000 if c.vtl else 0 for c in costs]),
        (
            "Heki mode, as emulated here (userspace stand-in)",
            "#c0504d",
            [c.heki.median_ns / 1000 if c.heki else 0 for c in costs],
        ),
        ("in-KVM Heki: the in-kernel exit floor (loop subtracted)", "#9bbb59", ikvm),
    ]
    for k, (label, colour, vals) in enumerate(series):
        yk = [y - bar_h + k * bar_h for y in ys]
        cx.barh(yk, vals, height=bar_h, color=colour, label=label)
        for yy, v in zip(yk, vals, strict=True):
            if v:
                cx.text(v * 1.08, yy, _fmt_ns(v * 1000), va="center", fontsize=6.5)
    styles = {"python_floor": ("--", "Python"), "c_floor": (":", "C")}
    for f in r.floors:
        if f.key in styles:
            ls, lang = styles[f.key]
            cx.axvline(
                f.median_ns / 1000,
                ls=ls,
                color="#333333",
                lw=1,
                label=f"floor: one userspace exit pair ({lang} KVM_RUN ping-pong) {_fmt_ns(f.median_ns)}",
            )
    cx.set_xscale("log")
    cx.set_yticks(ys, [_wrap(t, 34) for t in labels], fontsize=8)
    cx.invert_yaxis()
    cx.set_xlabel("µs per operation (median, log scale)")
    cx.set_title(f"Costs on this host (nested KVM: every guest instruction ~1 µs)\n{r.host}", fontsize=9)
    cx.set_xlim(
        right=max(
            [c.vtl.median_ns for c in costs if c.vtl] + [c.heki.median_ns for c in costs if c.heki] + [1e3]
        )
        / 1000
        * 8
    )
    cx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=7.5, frameon=False)
    cx.grid(axis="x", which="both", alpha=0.25)
    fig.subplots_adjust(left=0.14, right=0.98, top=1 - 1.1 / height, bottom=2.0 / height)
    save_png(fig, path)


def _wrap(text: str, width: int) -> str:
    words, lines, cur = text.split(), [], ""
    for wd in words:
        if cur and len(cur) + 1 + len(wd) > width:
            lines.append(cur)
            cur = wd
        else:
            cur = f"{cur} {wd}".strip()
    return "\n".join(lines + [cur])
