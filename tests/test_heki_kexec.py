"""kexec in Heki mode on real KVM (docs/heki-mode.md, "kexec"): an in-guest jump the VMM
never sees, as Linux's kexec is under in-KVM Heki.

The VMM counts no kexec, so every assertion is on what it finds itself after the run: RIP
read from KVM inside the next kernel's text, the old kernel's text and the next kernel's
read-only segments read back from guest memory and compared with their files, the
refusals the host itself made with RIP in the next kernel, and the pins and immutable
pages the host holds at the end.  One guest run per test."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.vtlrun import RUN_TIMEOUT
from vmm.elf import PF_W, PF_X, ElfImage, read_image
from vmm.memattr import NW
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog
from vtl.core.images import default_kexec_image
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.modes.heki import CR0_WP, HekiScheduler, HekiState, heki_config
from vtl.run import control
from vtl.run.result import RunResult
from vtl.services.console import Console
from vtl.tools.expectations import SUCCEEDED
from vtl.tools.lifecycle_compare import run_lifecycle

pytestmark = pytest.mark.kvm

R, W, X, IMM = ABI.MEM_ATTR_READ, ABI.MEM_ATTR_WRITE, ABI.MEM_ATTR_EXEC, ABI.MEM_ATTR_IMMUTABLE
EPERM = -ABI.KVM_EPERM


@dataclass
class KexecRun:
    result: RunResult
    events: EventLog
    heki: HekiState
    rip: int                          # from KVM after the run
    cr0: int
    memory: dict[int, bytes]          # each segment of both images, read back at its address
    backend: dict[int, int]           # the attribute backend's view of the old text's pages
    console: list[str]

    def kinds(self, kind: str) -> list[Any]:
        return self.events.of_kind(kind)


def run_kexec(vtl0: Path, staged: Path, scenario: str) -> KexecRun:
    cfg = heki_config(PartitionConfig(vtl0_image=vtl0, scenario=scenario, staged=staged))
    events = EventLog(trace=True, keep=100_000)
    console = Console(cfg.nr_vps, keep=10_000)
    with Partition(cfg, events) as p:
        result, sched = control.run(p, console, RUN_TIMEOUT, scheduler=HekiScheduler)
        assert isinstance(sched, HekiScheduler)
        vcpu = p.vps[0].vcpus[Vtl.VTL0]
        assert vcpu is not None
        segments = read_image(vtl0).segments + read_image(staged).segments
        memory = {s.gpa: p.mem.read(s.gpa, s.filesz) for s in segments}
        old_text = _text(read_image(vtl0))
        backend = {g: p.backend.get(g) for lo, hi in old_text for g in range(lo, hi, PAGE_SIZE)}
        return KexecRun(result, events, sched.heki.state, int(vcpu.get_regs().rip), int(vcpu.get_sregs().cr0),
                        memory, backend, list(console.tail))


def _text(img: ElfImage) -> list[tuple[int, int]]:
    return [(s.gpa, s.gpa + s.memsz) for s in img.segments if s.flags & PF_X]


def _in(ranges: list[tuple[int, int]], addr: int | None) -> bool:
    return addr is not None and any(lo <= addr < hi for lo, hi in ranges)


def _file(img: ElfImage, gpa: int) -> bytes:
    s = next(s for s in img.segments if s.gpa == gpa)
    return img.data[s.offset:s.offset + s.filesz]


def test_kexec_teardown_the_next_kernel_runs_under_the_old_kernels_policy(
        guest_images: tuple[Path, Path]) -> None:
    staged = default_kexec_image()
    old, nxt = read_image(guest_images[0]), read_image(staged)
    r = run_kexec(guest_images[0], staged, "kexec-teardown")
    assert r.result.reason == "guest_exit", (r.result, r.console[-20:])
    # The VMM saw no kexec, yet the vCPU ended in the next kernel's text (RIP from KVM),
    # whose read-only segments are the staged file's bytes.
    assert r.result.kexecs == 0 and r.result.boot_count == 0
    new_text = _text(nxt)
    assert _in(new_text, r.rip), f"RIP {r.rip:#x} is not in the next kernel's text {new_text}"
    for s in nxt.segments:
        if not s.flags & PF_W:
            assert r.memory[s.gpa] == _file(nxt, s.gpa), f"segment {s.gpa:#x} is not as staged"
    # The old kernel's text: still R-X immutable for the host, no-write in the backend, its
    # bytes as its file has them; the next kernel's write there was the host's #PF.
    old_text = _text(old)
    for s in old.segments:
        if s.flags & PF_X:
            assert r.memory[s.gpa] == _file(old, s.gpa), "the old kernel's text changed"
    pages = [g // PAGE_SIZE for lo, hi in old_text for g in range(lo, hi, PAGE_SIZE)]
    assert all(r.heki.perms[i] == R | X | IMM for i in pages)
    assert all(r.backend[i * PAGE_SIZE] & NW for i in pages)
    writes = [e for e in r.kinds("refused") if e.request == "memory write" and _in(new_text, e.rip)]
    assert writes and all(_in(old_text, e.gpa) for e in writes), "no write of the next kernel was refused"
    pf = [e for e in r.kinds("guest_fault") if e.vector == 14 and _in(new_text, e.rip)]
    assert pf and pf[-1].error_code == 0x3                 # KVM's #PF(P|W), injected by the VMM
    # CR0.WP: still pinned; the next kernel's MOV clearing it was denied, CR0 unchanged in KVM.
    assert r.heki.pinned_cr0 == CR0_WP and r.cr0 & CR0_WP
    denials = [d for d in r.kinds("heki_denial") if _in(new_text, d.rip)]
    assert len(denials) == 1 and denials[0].reason == ABI.KVM_HEKI_EXIT_REASON_CR0
    # Its own page list names the old kernel's immutable pages: refused whole, -EPERM, so
    # its own text stays writable for it.
    lists = [c for c in r.kinds("heki_hypercall")
             if c.nr == ABI.KVM_HC_PROTECT_MEMORY and _in(new_text, c.rip)]
    assert [c.ret for c in lists] == [EPERM], lists
    assert all(r.heki.perm(g) & W for lo, hi in new_text for g in range(lo, hi, PAGE_SIZE))


def test_kexec_deny_a_changed_image_simply_runs(guest_images: tuple[Path, Path]) -> None:
    """Heki authenticates nothing: the old kernel changes the placed image, jumps, and the
    changed image runs.  `vtl compare` says so: succeeded, as Heki's design gives."""
    staged = default_kexec_image()
    lr = run_lifecycle("kexec-deny", "heki", *guest_images, staged=staged)
    assert lr.outcome == SUCCEEDED and lr.as_expected, lr.mechanism
    k = lr.in_guest_kexec
    assert k is not None and k.ran and lr.kexecs == 0
    word = read_image(staged).symbols()["kexec_image_word"]        # what the old kernel changed
    assert any(c.endswith(f"at {word:#x}") for c in k.changed), k.changed
    assert "nothing validated it" in lr.mechanism
