"""What the VMM observes of a kexec in Heki mode, a kexec it never sees happen.

Linux's kexec under Heki is a jump inside the guest (guest_vtl0/heki_kexec.c): no
hypercall, no exit, the VMM counts no kexec.  So after the run the VMM looks for its
traces itself, trusting nothing the guest says:

  * where the vCPU is: RIP read from KVM, inside an executable segment of the staged
    image (the next kernel ran) or not;
  * what is in memory: the staged image's read-only segments (text, rodata) read back at
    their addresses and compared with the staged file (the image that ran is the one that
    was staged, or it was changed before the jump: nothing validated it), and the running
    image's text compared with its file (the old kernel's text unchanged);
  * what the host did to code running from the next kernel's text (each event's RIP): a
    #PF injected for a write to the old image's pages, a CR write denied, a page list
    refused;
  * what the host holds at the end: pins, the old image's immutable pages, and whether
    the next kernel's text is still writable (it could not protect itself).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from vmm.elf import PF_W, PF_X, ElfImage, Segment, parse_image
from vmm.errors import GuestImageError
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl
from vtl.modes.heki import HekiState

KVM_ERRNO = {ABI.KVM_EPERM: "-EPERM", ABI.KVM_E2BIG: "-E2BIG", ABI.KVM_EFAULT: "-EFAULT",
             ABI.KVM_EINVAL: "-EINVAL"}


class InGuestKexec(BaseModel):
    image: str                          # the staged file
    rip: int                            # from KVM at the end of the run
    ran: bool                           # RIP in an executable segment of the staged image
    as_staged: list[str]                # read-only segments equal to the file
    changed: list[str]                  # ... or where they differ from it
    old_text_unchanged: bool            # the running image's executable segments equal to its file
    old_text_writes_refused: int        # #PF the host injected for the next kernel's writes there
    cr_writes_denied: int               # the next kernel's CR writes the host's pins denied
    page_lists_refused: list[str]       # the next kernel's KVM_HC_PROTECT_MEMORY errors
    old_immutable_pages: int            # the old image's pages still IMMUTABLE at the end
    own_text_writable: bool             # the next kernel's text pages writable for it at the end


def observe(p: Partition, heki: HekiState, events: EventLog) -> InGuestKexec | None:
    """After a Heki-mode run with a staged image (the partition still open); None when
    nothing ELF was staged."""
    path, (_, data) = p.config.staged, p.staged
    if path is None or not data:
        return None
    try:
        nxt = parse_image(path, data)
    except GuestImageError:
        return None
    old = p.vtl0_image
    vcpu = p.vps[0].vcpus[Vtl.VTL0]
    rip = int(vcpu.get_regs().rip) if vcpu is not None else 0

    def from_next(addr: int | None) -> bool:
        return addr is not None and _executes(nxt, addr) and not old.start <= addr < old.end

    as_staged, changed = _compare(p, nxt, lambda s: not s.flags & PF_W)
    _, old_changed = _compare(p, old, lambda s: bool(s.flags & PF_X))
    refused: list[Any] = events.of_kind("refused")
    denials: list[Any] = events.of_kind("heki_denial")
    calls: list[Any] = events.of_kind("heki_hypercall")
    lo, hi = old.start // PAGE_SIZE, old.end // PAGE_SIZE
    text = [i for s in nxt.segments if s.flags & PF_X
            for i in range(s.gpa // PAGE_SIZE, (s.gpa + s.memsz + PAGE_SIZE - 1) // PAGE_SIZE)]
    return InGuestKexec(
        image=path.name, rip=rip, ran=from_next(rip), as_staged=as_staged, changed=changed,
        old_text_unchanged=not old_changed,
        old_text_writes_refused=sum(1 for r in refused if r.request == "memory write" and from_next(r.rip)
                                    and r.gpa is not None and old.start <= r.gpa < old.end),
        cr_writes_denied=sum(1 for d in denials if from_next(d.rip)),
        page_lists_refused=[f"{KVM_ERRNO.get(-c.ret, str(c.ret))}: {c.reason}" for c in calls
                            if c.nr == ABI.KVM_HC_PROTECT_MEMORY and c.ret < 0 and from_next(c.rip)],
        old_immutable_pages=sum(1 for b in heki.perms[lo:hi] if b & ABI.MEM_ATTR_IMMUTABLE),
        own_text_writable=bool(text) and all(heki.perm(i * PAGE_SIZE) & ABI.MEM_ATTR_WRITE for i in text),
    )


def _executes(img: ElfImage, addr: int) -> bool:
    return any(s.flags & PF_X and s.gpa <= addr < s.gpa + s.memsz for s in img.segments)


def _compare(p: Partition, img: ElfImage, which: Callable[[Segment], bool]) -> tuple[list[str], list[str]]:
    """(segments whose bytes in guest memory equal the file, where the others differ)."""
    same, differ = [], []
    for s in img.segments:
        if not which(s) or not p.layout.in_vtl0(s.gpa, s.filesz):
            continue
        name = f"{s.perms} segment {s.gpa:#x}"
        first = _first_difference(p.mem.read(s.gpa, s.filesz), img.data[s.offset:s.offset + s.filesz])
        if first is None:
            same.append(name)
        else:
            differ.append(f"{name} differs from the file at {s.gpa + first:#x}")
    return same, differ


def _first_difference(a: bytes, b: bytes) -> int | None:
    if a == b:
        return None
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def describe(k: InGuestKexec) -> list[str]:
    """The observation as the parts of a mechanism line (joined with "; ")."""
    ran = (f"the next kernel ({k.image}) ran: RIP {k.rip:#x} at the end" if k.ran else
           f"the next kernel ({k.image}) did not run: RIP {k.rip:#x} at the end")
    image = (f"its image changed before the jump ({', '.join(k.changed)}) and nothing validated it"
             if k.changed else f"its {len(k.as_staged)} read-only segments as staged")
    host = [f"refused {k.old_text_writes_refused} write(s) to the old kernel's text (#PF; the old text "
            f"{'unchanged' if k.old_text_unchanged else 'CHANGED'})",
            f"denied {k.cr_writes_denied} CR write(s) (#GP)"]
    if k.page_lists_refused:
        host.append(f"refused its page list ({k.page_lists_refused[0]})")
    parts = [ran, image, "the host " + ", ".join(host)]
    if k.own_text_writable:
        parts.append("its own text stays writable")
    return parts
