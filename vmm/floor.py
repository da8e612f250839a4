"""Floors for `vtl bench`: the cheapest possible alternation of KVM_RUN between two
VMs whose guests only do port-I/O exits, from Python (the binding the scheduler
uses, no VTL logic) and from C (bench/floor.c, same guest bytes).

Timing matches the VTL bench: guest A stamps RDTSC every BATCH round trips; a
round trip is KVM_RUN(A) -> OUT exit -> KVM_RUN(B) -> OUT exit.  Reported: median
over batches, with the guest TSC frequency from KVM_GET_TSC_KHZ.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel

from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import Kvm
from vmm.scratch import ScratchVm
from vmm.uapi import ffi, libc

BATCH = 100
CODE_GPA = 0x10000
STAMPS_GPA = 0x100000
MEM = 4 << 20
PORT_A, PORT_B, PORT_DONE = 0xF0, 0xF1, 0xF4

# Guest A: RBX = stamp array, R12 = batches.  Stamps RDTSC, then BATCH OUTs, per batch.
GUEST_A = bytes.fromhex(
    "0f31"            # outer: rdtsc
    "48c1e220"        # shl rdx, 32
    "4809d0"          # or rax, rdx
    "488903"          # mov [rbx], rax
    "4883c308"        # add rbx, 8
    "4d85e4"          # test r12, r12
    "7412"            # jz done
    "41bd64000000"    # mov r13d, BATCH (100)
    "e6f0"            # inner: out 0xf0, al
    "41ffcd"          # dec r13d
    "75f9"            # jnz inner
    "49ffcc"          # dec r12
    "ebd9"            # jmp outer
    "e7f4"            # done: out 0xf4, eax
    "f4")             # hlt
# Guest B: OUT forever.
GUEST_B = bytes.fromhex("e6f1" "ebfc")   # out 0xf1, al; jmp back


class FloorResult(BaseModel):
    median_ns: float
    p10_ns: float
    p90_ns: float
    mean_ns: float
    wall_mean_ns: float
    pairs: int
    batch: int


def stats(stamps: list[int], tsc_khz: int, pairs: int, wall_s: float, batch: int = BATCH) -> FloorResult:
    per = sorted((b - a) * 1e6 / tsc_khz / batch for a, b in zip(stamps, stamps[1:], strict=False))
    if not per:
        raise VmmError("no timing batches recorded")
    return FloorResult(median_ns=statistics.median(per), p10_ns=per[int(0.1 * len(per))],
                       p90_ns=per[min(len(per) - 1, int(0.9 * len(per)))], mean_ns=statistics.fmean(per),
                       wall_mean_ns=wall_s * 1e9 / max(1, pairs), pairs=pairs, batch=batch)


def python_floor(pairs: int) -> FloorResult:
    batches = max(1, pairs // BATCH)
    kvm = Kvm()
    try:
        with (ScratchVm(GUEST_A, mem_size=MEM, code_gpa=CODE_GPA, kvm=kvm,
                        regs={"rbx": STAMPS_GPA, "r12": batches}) as sa,
              ScratchVm(GUEST_B, mem_size=MEM, code_gpa=CODE_GPA, kvm=kvm) as sb):
            a, b, mem_a = sa.vcpu, sb.vcpu, sa.mem
            ioctl, kvm_run, null = libc.ioctl, u.KVM_RUN, ffi.NULL
            fa, fb, run_a, run_b = a.fd, b.fd, a.run, b.run
            n = 0
            t0 = time.perf_counter()
            while True:
                ioctl(fa, kvm_run, null)
                if run_a.exit_reason != u.KVM_EXIT_IO or run_a.io.port != PORT_A:
                    break
                ioctl(fb, kvm_run, null)
                if run_b.exit_reason != u.KVM_EXIT_IO:
                    raise VmmError(f"floor guest B stopped with exit {run_b.exit_reason}")
                n += 1
            wall = time.perf_counter() - t0
            if run_a.exit_reason != u.KVM_EXIT_IO or run_a.io.port != PORT_DONE:
                raise VmmError(f"floor guest A stopped with exit {run_a.exit_reason}")
            raw = mem_a.read(STAMPS_GPA, (batches + 1) * 8)
            stamps = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
            return stats(stamps, a.tsc_khz(), n, wall)
    finally:
        kvm.close()


def c_floor(pairs: int, binary: Path) -> FloorResult:
    cp = subprocess.run([str(binary), str(pairs)], capture_output=True, text=True, timeout=600)
    if cp.returncode != 0:
        raise VmmError(f"{binary} failed: {cp.stderr.strip()}")
    doc = json.loads(cp.stdout)
    return stats(doc["stamps"], doc["tsc_khz"], doc["pairs"], doc["wall_s"], doc["batch"])


class VmLifecycleFloor(BaseModel):
    """What KVM charges for a VM's life: KVM_CREATE_VM, one memslot over `mem_bytes`,
    KVM_CREATE_VCPU with the supported CPUID and its kvm_run mapping, then closing it all.
    The kernel's share of a VTL1 enable or teardown and of a RESET (which rebuilds
    VTL0's VM)."""
    median_us: float
    p10_us: float
    p90_us: float
    mem_bytes: int
    samples: int


def vm_lifecycle_floor(samples: int = 20, mem_bytes: int = 256 << 20) -> VmLifecycleFloor:
    from vmm.memory import GuestMemory

    times: list[float] = []
    kvm, mem = Kvm(), GuestMemory(mem_bytes)
    try:
        cpuid = kvm.supported_cpuid()
        for _ in range(samples):
            t0 = time.perf_counter()
            vm = kvm.create_vm()
            try:
                vm.map_memory(mem, 0, mem_bytes)
                vcpu = vm.create_vcpu(0)
                vcpu.set_cpuid(cpuid)
            finally:
                vm.close()
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        mem.close()
        kvm.close()
    s = sorted(times)
    return VmLifecycleFloor(median_us=round(statistics.median(s), 1), p10_us=round(s[len(s) // 10], 1),
                            p90_us=round(s[min(len(s) - 1, 9 * len(s) // 10)], 1), mem_bytes=mem_bytes,
                            samples=samples)


# In-kernel exits (`vtl compare`): a guest instruction KVM handles without any exit to
# userspace, BATCH per RDTSC stamp, R15 = stamp array, R12 = batches.  What a CR write
# costs in-KVM Heki (handle_cr, heki_check_cr) on this host, against which the Heki
# mode's userspace stand-in is read.
INKERNEL_GUESTS = {
    # xor eax, eax: no exit at all; the loop's own cost, to read the others against
    "loop": bytes.fromhex("0f3148c1e2204809d04989074983c7084d85e4741241bd6400000031c041ffcd75f949ffccebd9"
                          "e7f4f4"),
    # xor eax, eax; cpuid
    "cpuid": bytes.fromhex("0f3148c1e2204809d04989074983c7084d85e4741441bd6400000031c00fa241ffcd75f749ffcc"
                           "ebd7e7f4f4"),
    # mov rax, cr0; mov cr0, rax (the same value: allowed, and handled by KVM itself)
    "mov_cr0": bytes.fromhex("0f3148c1e2204809d04989074983c7084d85e4741641bd640000000f20c00f22c041ffcd75f549"
                             "ffccebd5e7f4f4"),
}


def inkernel_floor(instruction: str, count: int) -> FloorResult:
    """Per instruction, for `count` executions of INKERNEL_GUESTS[instruction] in a scratch
    VM: KVM_RUN returns once, at the end (an exit to userspace on the way is an error)."""
    batches = max(1, count // BATCH)
    with ScratchVm(INKERNEL_GUESTS[instruction], mem_size=MEM, code_gpa=CODE_GPA,
                   regs={"r15": STAMPS_GPA, "r12": batches}) as s:
        t0 = time.perf_counter()
        exit_ = s.run(timeout=60.0)
        wall = time.perf_counter() - t0
        run = s.vcpu.run
        if run.exit_reason != u.KVM_EXIT_IO or run.io.port != PORT_DONE:
            raise VmmError(f"in-kernel floor ({instruction}) stopped with {exit_!r}, not at its end")
        raw = s.mem.read(STAMPS_GPA, (batches + 1) * 8)
        stamps = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        return stats(stamps, s.vcpu.tsc_khz(), batches * BATCH, wall)


class ParallelFloor(BaseModel):
    """`threads` copies of a floor at once (threads of python_floor, processes of the C
    floor): each copy's own round trip, and the pairs per second of all of them together."""
    threads: int
    median_ns: float            # median over the copies of each copy's median round trip
    aggregate_per_s: float      # every copy's pairs over the wall time of the whole run
    pairs: int                  # per copy


def python_floor_parallel(pairs: int, threads: int) -> ParallelFloor:
    """python_floor on `threads` threads at once (each its own two VMs): what the GIL lets
    a Python loop of KVM_RUNs do with that many threads."""
    import threading

    results: list[FloorResult] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(python_floor(pairs))
        except BaseException as e:  # re-raised below, on the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=one) for _ in range(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return ParallelFloor(threads=threads, median_ns=statistics.median(r.median_ns for r in results),
                         aggregate_per_s=sum(r.pairs for r in results) / wall, pairs=pairs)


def c_floor_parallel(pairs: int, binary: Path, procs: int) -> ParallelFloor:
    """The C floor in `procs` processes at once."""
    t0 = time.perf_counter()
    running = [subprocess.Popen([str(binary), str(pairs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(procs)]
    docs = []
    for p in running:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise VmmError(f"{binary} failed: {err.strip()}")
        docs.append(json.loads(out))
    wall = time.perf_counter() - t0
    medians = [stats(d["stamps"], d["tsc_khz"], d["pairs"], d["wall_s"], d["batch"]).median_ns for d in docs]
    return ParallelFloor(threads=procs, median_ns=statistics.median(medians),
                         aggregate_per_s=sum(d["pairs"] for d in docs) / wall, pairs=pairs)
