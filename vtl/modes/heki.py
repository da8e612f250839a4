"""Heki mode (DESIGN section 8, docs/heki-mode.md): one KVM VM, no VTL1, the VMM in the
role of KVM with the Heki RFC patches.  The policy is the host's, not the guest's.

What the patches do, and where it is checked (the patch text is in ../shared/seeds/ and
in the RFC threads on lore):

  * KVM_HC_LOCK_CR_UPDATE (13; RFC v3 2/5 `heki_lock_cr`, v3 3/5 for the exits): a0 > U32_MAX
    is -KVM_EINVAL (kvm_emulate_hypercall); flags other than KVM_LOCK_CR_UPDATE_VERSION
    with a0 = a1 = 0 (which returns HEKI_ABI_VERSION = 1) are -KVM_EINVAL; pin = 0 is
    -KVM_EINVAL; CR0: the pin must include WP and be set in the *host's* CR0
    (`(pin & read_cr0()) != pin`); CR4: a subset of cr4_pinned_mask (SMEP, SMAP, UMIP,
    FSGSBASE, CET, FRED), then `pin &= __read_cr4()` silently drops what the host's CR4
    lacks; any other CR is -KVM_EINVAL.  Pins are OR-ed into VM-wide masks
    (atomic_long_or) and never removed.  `heki_check_cr` (handle_cr's MOV to CR and the
    emulator's set_cr): a value clearing a pinned bit gets #GP(0), CR unchanged, and a
    KVM_EXIT_HEKI_DENIAL (reason CR0 = 1 << 0, CR4 = 1 << 1, cr_value).  LMSW and CLTS
    are not checked (handle_cr's other cases), and neither is CR3 or anything else.
  * KVM_HC_PROTECT_MEMORY (14; RFC v2 `heki_protect_memory`, `kvm_permissions_set`,
    `mem_attr_fault`): a0 = GPA of a struct heki_page_list, chained by next_pa; every
    list is read first (-KVM_EFAULT when kvm_read_guest fails), then each entry: pa and
    epa page aligned, permissions nonzero and within MEM_ATTR_PROT, else -KVM_EINVAL;
    without MBEC a no-exec request gets MEM_ATTR_EXEC added; epa <= pa is -EINVAL; a range
    holding an IMMUTABLE page is -EPERM.  Pages without an attribute are RWX.  Only the
    write and (with MBEC) exec permissions reach the EPT (`make_spte`); a violation is a
    #PF injected by KVM with the fault's error code (no exit to the VMM).

Where this mode differs, and why (each said in docs/heki-mode.md):

  * Transport: the project's hypercall port, RAX = number, RDI/RSI/RDX = a0..a2 (a VMCALL
    never reaches userspace here).  CPL > 0 gets -KVM_EPERM, as kvm_emulate_hypercall.
  * The patch has no bound on the chain (a loop in next_pa allocates until kmalloc fails:
    -KVM_E2BIG) and reads npages entries into its one-page buffer whatever npages says;
    here: a list seen twice, more lists than guest memory has pages, or more entries or
    pages than the budget are -KVM_E2BIG, npages past one page is -KVM_E2BIG (or
    -KVM_EFAULT when the entries run past guest memory, as kvm_read_guest), a range
    outside guest memory is -KVM_EINVAL (the patch stores attributes for any GFN).  The
    patch applies entries up to a bad one; here a request is all or nothing.
  * CR pins: no CR-write exit exists for userspace on this host (in-KVM Heki uses the VMX
    CR masks), so the stand-in is the privileged-section mechanism
    (vtl/services/privileged.py) with `HekiMode.judge` as its judge: the section (the
    image's `_priv_start`/`_priv_end`) becomes NR for the guest at the first pin, each
    fetch there is decoded by the VMM.  The staged image's section (a kernel the guest may
    kexec into: an in-guest jump the host never sees) is judged the same way from the same
    pin, as KVM's CR masks see the next kernel's CR writes.  A CR write by an instruction
    outside those sections is not seen (real Heki would see it): "not enforced on this host".
  * Host CR0/CR4: the VMM cannot read the host's; it takes CR0 = PE|MP|ET|NE|WP|AM|PG (any
    x86-64 Linux host) and CR4's pinnable bits from /proc/cpuinfo's flags.
  * No-exec: this host has neither EPT attributes for userspace nor MBEC; as the patch
    without MBEC, the request becomes executable, and a `heki_not_enforced` event says so.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmm import uapi as u
from vmm.elf import parse_image
from vmm.errors import GuestImageError
from vmm.exits import Mmio, complete_mmio_read
from vmm.kvm import VCpu
from vmm.memattr import ALL, NW, ExhaustedError
from vmm.memory import PAGE_SIZE
from vmm.regcheck import CR4_CET, CR4_FSGSBASE, CR4_SMAP, CR4_SMEP, CR4_UMIP
from vmm.x86 import VEC_GP, VEC_PF
from vtl.abi import ABI, abi_ffi
from vtl.core.config import PartitionConfig
from vtl.core.events import EventLog, HekiConfigure, HekiDenial, HekiHypercall, HekiNotEnforced
from vtl.core.partition import Partition
from vtl.core.privileged import InterceptControl, RegisterWrite
from vtl.core.vp import VirtualProcessor
from vtl.core.vtl import Vtl
from vtl.run.exits import ExitDispatcher
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.services.intercepts import Intercepts
from vtl.services.outcomes import Outcome
from vtl.services.privileged import PrivilegedSection
from vtl.services.refusals import Refusals
from vtl.services.vtl0view import Fault

MASK64 = (1 << 64) - 1
U32_MAX = (1 << 32) - 1
CR0_WP = 1 << 16
CR4_FRED = 1 << 32
# arch/x86/kernel/cpu/common.c, cr4_pinned_mask (exported by RFC v3 2/5).
CR4_PINNED_MASK = CR4_SMEP | CR4_SMAP | CR4_UMIP | CR4_FSGSBASE | CR4_CET | CR4_FRED
# The CR0 of every x86-64 Linux host (PE MP ET NE WP AM PG): what `read_cr0()` gives the patch.
HOST_CR0 = 0x80050033
# /proc/cpuinfo flag -> the CR4 bit Linux sets when the CPU has it (and it is not disabled).
CPUINFO_CR4 = {"smep": CR4_SMEP, "smap": CR4_SMAP, "umip": CR4_UMIP, "fsgsbase": CR4_FSGSBASE,
               "user_shstk": CR4_CET, "ibt": CR4_CET, "fred": CR4_FRED}
LIST_SIZE = abi_ffi.sizeof("struct heki_page_list")
ENTRY_SIZE = abi_ffi.sizeof("struct heki_pages")
PROT = ABI.MEM_ATTR_PROT
DEFAULT_PERMS = ABI.MEM_ATTR_READ | ABI.MEM_ATTR_WRITE | ABI.MEM_ATTR_EXEC
PF_PRESENT, PF_WRITE, PF_USER = 0x1, 0x2, 0x4
# Per-page permissions -> the backend's attributes: NW without MEM_ATTR_WRITE (0: no attribute, RWX).
_BACKEND_ATTRS = bytes(NW if perm and not perm & ABI.MEM_ATTR_WRITE else 0 for perm in range(256))
# The most pages of a staged image's privileged section the stand-in makes NR (each data
# access to them is completed by the VMM): a section is a page or two, a staged file is
# the user's, not the guest's, but still no reason to take any size.
STAGED_SECTION_MAX_PAGES = 16


def neg(errno_: int) -> int:
    """-errno as the guest's RAX holds it."""
    return (-errno_) & MASK64


def signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def host_cr4(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The pinnable CR4 bits the host kernel runs with (`__read_cr4() & cr4_pinned_mask`),
    from the first CPU's flags."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sum({bit for name, bit in CPUINFO_CR4.items() if name in flags})
    except OSError:
        pass
    return 0


def heki_parts(present: dict[str, bool], backend: str) -> list[dict[str, str | bool]]:
    """What each part of Heki mode is on this host, for `vtl caps`: `kind` is "real" (the
    patches' logic, or a mechanism that enforces it here), "stand-in" (a different mechanism
    in the place of KVM's), "not enforced on this host" or "not protected by Heki"."""
    vmcall = present.get("vmcall_to_userspace", False)
    nw = {"rwx": "KVM_SET_MEMORY_ATTRIBUTES NW", "host_mapping": "mprotect(PROT_READ) of the VM's alias",
          "memslot": "read-only memslots"}.get(backend, backend)
    regs = present.get("single_step", False) and present.get("unmapped_gpa_fetch", False)
    return [
        {"part": "hypercall numbers, argument rules, error codes", "kind": "real", "enforced": True,
         "how": "KVM_HC_LOCK_CR_UPDATE (13) and KVM_HC_PROTECT_MEMORY (14) checked as heki_lock_cr and "
                "heki_protect_memory do (RFC v3/v2), plus bounds the patch lacks (loops in next_pa, npages, "
                "ranges outside memory: its own error codes) and all-or-nothing"},
        {"part": "transport", "kind": "stand-in", "enforced": True,
         "how": "the hypercall port (port I/O); in-KVM Heki takes a VMCALL, which "
                + ("does reach userspace here" if vmcall else "never reaches userspace on this host")},
        {"part": "page no-write (MEM_ATTR_WRITE clear)", "kind": "real",
         "enforced": backend in ("host_mapping", "memslot", "rwx"),
         "how": f"{nw} ({backend} backend) in the place of the EPT's write bit; a violation is the #PF KVM "
                "injects (error code P|W), here after the write retired (RIP at the next instruction, CR2 = "
                "the GPA), the write never reaching memory"},
        {"part": "page no-exec (MEM_ATTR_EXEC clear)", "kind": "not enforced on this host", "enforced": False,
         "how": "needs MBEC (an EPT attribute); this host has neither MBEC nor EPT attributes for userspace: "
                "as the patch without MBEC, the page stays executable (event heki_not_enforced)"},
        {"part": "page no-read (MEM_ATTR_READ clear)", "kind": "not protected by Heki", "enforced": False,
         "how": "the patch never removes read access (make_spte handles write and exec only); neither does "
                "the mode"},
        {"part": "CR0/CR4 pins", "kind": "stand-in", "enforced": regs,
         "how": "in-KVM Heki: the VMX CR guest/host masks, every MOV to CR0/CR4 exits.  This host gives "
                "userspace no CR-write exit, so the image's privileged section becomes NR at the first pin "
                "and the VMM decodes each fetch there and judges it (heki_check_cr: #GP(0), CR unchanged, "
                "event heki_denial); so does the staged image's section, for the kernel an in-guest kexec "
                "starts.  Not seen: a CR write by an instruction outside those sections (not "
                "enforced on this host); LMSW/CLTS are not checked, as in the patch"},
        {"part": "host CR0/CR4 the pins are checked against", "kind": "stand-in", "enforced": True,
         "how": f"the patch reads the host's own CR0/CR4 (a reviewer objected); the VMM takes CR0 = "
                f"{HOST_CR0:#x} and CR4's pinnable bits from /proc/cpuinfo ({host_cr4():#x} here)"},
        {"part": "KVM_CAP_HEKI_CONFIGURE / KVM_CAP_HEKI_DENIAL exits", "kind": "stand-in", "enforced": True,
         "how": "events heki_configure (reason, cr_pinned) and heki_denial (reason, cr_value) on the event "
                "stream"},
        {"part": "CR3, GDTR/IDTR/LDTR/TR, MSRs (LSTAR, EFER), kexec, reboot, modules, page tables",
         "kind": "not protected by Heki", "enforced": False,
         "how": "Heki pins none of them and has no kexec/reboot/module flow; the mode protects none of them"},
    ]


def heki_config(config: PartitionConfig) -> PartitionConfig:
    """The partition of a Heki-mode run: one VM (no VTL1 image), boot info announcing Heki."""
    return config.model_copy(update={"vtl1_image": None, "mode": "heki"})


@dataclass
class HekiState:
    """What KVM with the patches holds per VM: the pinned CR bits and the per-page
    permissions (0: no attribute, i.e. RWX)."""
    pages: int
    pinned_cr0: int = 0
    pinned_cr4: int = 0
    perms: bytearray = field(default_factory=bytearray)
    section: tuple[int, int] | None = None     # the stand-in's privileged section (gpa, pages)
    # ... and the staged image's, judged from the same pin: the next kernel an in-guest
    # kexec starts writes its CRs there (None: nothing staged, or no section in it).
    staged_section: tuple[int, int] | None = None

    def sections(self) -> list[tuple[int, int]]:
        return [s for s in (self.section, self.staged_section) if s is not None]

    def __post_init__(self) -> None:
        if not self.perms:
            self.perms = bytearray(self.pages)

    def perm(self, gpa: int) -> int:
        p = self.perms[gpa // PAGE_SIZE] if 0 <= gpa < self.pages * PAGE_SIZE else 0
        return p or DEFAULT_PERMS

    def policy(self) -> tuple[object, ...]:
        """All of it, for the protection digest: a restore must bring back every pin and
        page permission (the point Heki's own design leaves open: struct kvm has no
        read-back, so a VMM that forgets them loses them silently)."""
        return ("heki", self.pinned_cr0, self.pinned_cr4, hashlib.sha256(bytes(self.perms)).hexdigest(),
                self.section, self.staged_section)

    def to_json(self) -> dict[str, object]:
        runs = []
        i = 0
        for perm, run in itertools.groupby(self.perms):
            n = sum(1 for _ in run)
            if perm:
                runs.append([i, i + n, perm])
            i += n
        return {"pinned_cr0": self.pinned_cr0, "pinned_cr4": self.pinned_cr4, "perms": runs,
                "section": list(self.section) if self.section else None,
                "staged_section": list(self.staged_section) if self.staged_section else None}

    def load_json(self, d: object) -> None:
        """What to_json saved (ValueError if it is not that)."""
        if not isinstance(d, dict):
            raise ValueError("the Heki state is not an object")
        cr0, cr4 = d.get("pinned_cr0"), d.get("pinned_cr4")
        if not (isinstance(cr0, int) and isinstance(cr4, int) and 0 <= cr0 < 1 << 64 and 0 <= cr4 < 1 << 64):
            raise ValueError("the Heki pins are not 64-bit values")
        perms = bytearray(self.pages)
        for run in d.get("perms") or []:
            if not (isinstance(run, list) and len(run) == 3 and all(isinstance(x, int) for x in run)
                    and 0 <= run[0] < run[1] <= self.pages and 0 < run[2] < 256):
                raise ValueError("a Heki permission run is malformed")
            perms[run[0]:run[1]] = bytes([run[2]]) * (run[1] - run[0])
        sections = []
        for key in ("section", "staged_section"):
            s = d.get(key)
            ok = isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) for x in s)
            if s is not None and not (ok and s[0] >= 0 and 0 < s[1] <= self.pages):
                raise ValueError(f"the Heki {key} is malformed")
            sections.append(None if s is None else (s[0], s[1]))
        self.pinned_cr0, self.pinned_cr4, self.perms = cr0, cr4, perms
        self.section, self.staged_section = sections


class HekiMode:
    """The VMM as KVM with the Heki patches: the two hypercalls, the CR-pin judge and the
    #PF for a write to a page Heki protects."""

    def __init__(self, partition: Partition, events: EventLog, refusals: Refusals,
                 privileged: PrivilegedSection, host_cr0: int = HOST_CR0, cr4: int | None = None) -> None:
        self.p, self.events, self.refuse, self.privileged = partition, events, refusals, privileged
        self.host_cr0 = host_cr0
        self.host_cr4 = host_cr4() if cr4 is None else cr4
        self.state = HekiState(partition.layout.mem_size // PAGE_SIZE)
        self.hypercalls = 0
        self.denials = 0

    def summary(self) -> dict[str, int | str | None]:
        """What the host-owned policy holds at the end of a run (`vtl run` shows it)."""
        st = self.state
        perms = bytes(st.perms)
        return {"pinned_cr0": st.pinned_cr0, "pinned_cr4": st.pinned_cr4,
                "pages_with_permissions": sum(1 for b in perms if b),
                "pages_read_only": sum(1 for b in perms if b and not b & ABI.MEM_ATTR_WRITE),
                "pages_immutable": sum(1 for b in perms if b & ABI.MEM_ATTR_IMMUTABLE),
                "cr_judge": (f"privileged section {st.section[0]:#x} ({st.section[1]} pages)"
                             + (f" and the staged image's {st.staged_section[0]:#x} ({st.staged_section[1]} "
                                "pages)" if st.staged_section else "")
                             if st.section else None),
                "hypercalls": self.hypercalls, "denials": self.denials}

    def summary_lines(self) -> list[str]:
        s = self.summary()
        judged = f"through the {s['cr_judge']}" if s["cr_judge"] else "nowhere (nothing pinned)"
        return [f"{'heki pins':<14}CR0 {s['pinned_cr0']:#x}, CR4 {s['pinned_cr4']:#x}; "
                f"CR writes judged {judged}",
                f"{'heki pages':<14}{s['pages_with_permissions']} with permissions, {s['pages_read_only']} "
                f"read-only, {s['pages_immutable']} immutable; {s['hypercalls']} Heki hypercalls, "
                f"{s['denials']} CR writes denied"]

    # --- the port --------------------------------------------------------------------
    def hypercall(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        """KVM_HC_LOCK_CR_UPDATE / KVM_HC_PROTECT_MEMORY on the hypercall port (the caller
        checked RAX).  RAX = the return value."""
        r = vcpu.regs
        nr, a0, a1, a2 = int(r.rax), int(r.rdi), int(r.rsi), int(r.rdx)
        self.hypercalls += 1
        lists = entries = pages = 0
        if vcpu.sregs.cs.selector & 3:            # kvm_emulate_hypercall: CPL != 0
            ret, why = neg(ABI.KVM_EPERM), "hypercall from CPL3"
        elif nr == ABI.KVM_HC_LOCK_CR_UPDATE:
            ret, why = self.lock_cr(vp, a0, a1, a2)
        else:
            ret, why, lists, entries, pages = self.protect_memory(vp, a0)
        r.rax = ret
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_REGS
        self.events.emit(HekiHypercall(ts=self.events.now(), vp=vp.index, vtl=0, nr=nr,
                                       args=[a0] if nr == ABI.KVM_HC_PROTECT_MEMORY else [a0, a1, a2],
                                       ret=signed(ret), reason=why, lists=lists, entries=entries,
                                       pages=pages, rip=int(r.rip)))
        return None

    # --- KVM_HC_LOCK_CR_UPDATE ----------------------------------------------------------
    def lock_cr(self, vp: VirtualProcessor, cr: int, pin: int, flags: int) -> tuple[int, str]:
        einval = neg(ABI.KVM_EINVAL)
        if cr > U32_MAX:
            return einval, f"a0 {cr:#x} > U32_MAX"
        if flags:
            if flags == ABI.KVM_LOCK_CR_UPDATE_VERSION and not cr and not pin:
                return ABI.HEKI_ABI_VERSION, ""
            return einval, f"flags {flags:#x} (only KVM_LOCK_CR_UPDATE_VERSION with cr = pin = 0)"
        if not pin:
            return einval, "pin = 0"
        st = self.state
        if cr == 0:
            if not pin & CR0_WP:
                return einval, f"CR0 pin {pin:#x} without WP"
            if pin & self.host_cr0 != pin:
                return einval, f"CR0 pin {pin:#x} has bits the host's CR0 {self.host_cr0:#x} lacks"
            st.pinned_cr0 |= pin
            reason, total = ABI.KVM_HEKI_EXIT_REASON_CR0, st.pinned_cr0
        elif cr == 4:
            if pin & CR4_PINNED_MASK != pin:
                return einval, f"CR4 pin {pin:#x} outside SMEP|SMAP|UMIP|FSGSBASE|CET|FRED"
            requested, pin = pin, pin & self.host_cr4       # "Ignores bits not present in host."
            if requested != pin:
                self.events.emit(HekiNotEnforced(
                    ts=self.events.now(), vp=vp.index, what=f"CR4 pin {requested & ~pin:#x}",
                    why=f"bits the host's CR4 ({self.host_cr4:#x} of the pinnable ones) lacks are "
                        "dropped by the patch (pin &= __read_cr4()), silently for the guest"))
            st.pinned_cr4 |= pin
            reason, total = ABI.KVM_HEKI_EXIT_REASON_CR4, st.pinned_cr4
        else:
            return einval, f"CR{cr} cannot be pinned (0 or 4)"
        self.events.emit(HekiConfigure(ts=self.events.now(), vp=vp.index, reason=reason, cr_pinned=pin,
                                       requested=pin if cr == 0 else requested, pinned_total=total))
        if st.pinned_cr0 | st.pinned_cr4:
            self._judge_from_now(vp)
        return 0, ""

    def _judge_from_now(self, vp: VirtualProcessor) -> None:
        """The stand-in for KVM's VMX CR masks: the image's privileged section NR for the
        guest, each fetch there decoded by the VMM and judged by `judge`."""
        if self.state.section is not None or self.p.intercept_control is not None:
            return
        syms = self.p.vtl0_image.symbols()
        start, end = syms.get("_priv_start"), syms.get("_priv_end")
        lay = self.p.layout
        if start is None or end is None or start % PAGE_SIZE or end % PAGE_SIZE or end <= start \
                or not lay.in_vtl0(start, end - start):
            self.events.emit(HekiNotEnforced(
                ts=self.events.now(), vp=vp.index, what="CR0/CR4 pins",
                why="this host gives userspace no CR-write exit and the VTL0 image names no privileged "
                    "section (_priv_start/_priv_end): the pins are recorded, no CR write is judged"))
            return
        pages = (end - start) // PAGE_SIZE
        self.state.section = (start, pages)
        self.p.intercept_control = InterceptControl(0, 0, 0, start, pages)
        self._judge_staged(self._staged_section())
        for gpa, n in self.state.sections():
            self._apply(gpa // PAGE_SIZE, gpa // PAGE_SIZE + n)

    def _staged_section(self) -> tuple[int, int] | None:
        """The staged image's privileged section (gpa, pages), if the staged file is an ELF
        image naming one inside VTL0's image window, clear of the running image and of at
        most STAGED_SECTION_MAX_PAGES pages.  The file is the user's (vtl run --stage), read
        by the VMM before the guest ran; the guest only copies it."""
        path, (_, data) = self.p.config.staged, self.p.staged
        if path is None or not data:
            return None
        try:
            syms = parse_image(path, data).symbols()
        except GuestImageError:
            return None
        start, end = syms.get("_priv_start"), syms.get("_priv_end")
        if start is None or end is None or start % PAGE_SIZE or end % PAGE_SIZE:
            return None
        lo, hi = self.p.layout.image_window(Vtl.VTL0)
        img = self.p.vtl0_image
        if not lo <= start < end <= hi or end - start > STAGED_SECTION_MAX_PAGES * PAGE_SIZE \
                or (start < img.end and img.start < end):
            return None
        return start, (end - start) // PAGE_SIZE

    def _judge_staged(self, section: tuple[int, int] | None) -> None:
        self.state.staged_section = section
        self.privileged.host_sections = () if section is None else \
            ((section[0], section[0] + section[1] * PAGE_SIZE),)

    def after_reset(self) -> None:
        """An emulated RESET rebuilt the guest's VM; KVM's pins and memory attributes live in
        struct kvm, which a reset of the guest keeps (Heki "doesn't handle VM reboot"), so
        the host-owned policy outlives the kernel that set it: applied again to the new VM."""
        st = self.state
        if st.section is not None:
            self.p.intercept_control = InterceptControl(0, 0, 0, st.section[0], st.section[1])
        self._apply(0, st.pages)

    def judge(self, vp: VirtualProcessor, w: RegisterWrite) -> Fault | None:
        """heki_check_cr for a decoded MOV to CR0/CR4: #GP(0) if a pinned bit would clear."""
        st = self.state
        if w.reg == ABI.VTL_REG_CR0:
            pinned, reason = st.pinned_cr0, ABI.KVM_HEKI_EXIT_REASON_CR0
        elif w.reg == ABI.VTL_REG_CR4:
            pinned, reason = st.pinned_cr4, ABI.KVM_HEKI_EXIT_REASON_CR4
        else:
            return None                # CR3, LMSW/CLTS, XCR0, descriptor tables: not Heki's
        if w.new & pinned == pinned:
            return None
        self.denials += 1
        self.events.emit(HekiDenial(ts=self.events.now(), vp=vp.index, reason=reason, cr_value=w.new,
                                    pinned=pinned, rip=w.rip))
        cr = 0 if reason == ABI.KVM_HEKI_EXIT_REASON_CR0 else 4
        return Fault(VEC_GP, 0, f"heki: Blocked CR{cr} update: {w.new:#x} (pinned {pinned:#x})")

    # --- KVM_HC_PROTECT_MEMORY --------------------------------------------------------
    def _ram(self, gpa: int, length: int) -> bool:
        """Guest memory kvm_read_guest would find: VTL0's memslots."""
        return self.p.layout.in_vtl0(gpa, length)

    def protect_memory(self, vp: VirtualProcessor, list_pa: int) -> tuple[int, str, int, int, int]:
        """(ret, why, lists, entries, pages).  All or nothing: every list is read and every
        entry checked before anything changes."""
        count = _Count()
        try:
            chain = self._read_chain(list_pa, count)
            new, touched, noexec = self._check_entries(chain, count)
        except _Refused as r:
            return r.ret, r.why, count.lists, count.entries, 0
        st = self.state
        old, st.perms = st.perms, new
        try:
            for lo, hi in _merge(touched):
                self._apply(lo, hi)
        except ExhaustedError as e:             # back exactly as it was: all or nothing
            st.perms = old
            for lo, hi in _merge(touched):
                self._apply(lo, hi)
            return (neg(ABI.KVM_E2BIG), f"the host cannot hold more protected ranges: {e}", count.lists,
                    count.entries, 0)
        if noexec:
            self.events.emit(HekiNotEnforced(
                ts=self.events.now(), vp=vp.index, what="no-exec (MEM_ATTR_EXEC clear)", pages=noexec,
                why="kernel-only execute needs MBEC (an EPT attribute); this host has neither MBEC nor "
                    "EPT attributes for userspace: the pages stay executable, as the patch does "
                    "without MBEC"))
        return 0, "", count.lists, count.entries, count.pages

    def _read_chain(self, pa: int, count: _Count) -> list[list[tuple[int, int, int]]]:
        """Every list of the chain, copied once (changing them later changes nothing)."""
        mem, pages = self.p.mem, self.state.pages
        chain: list[list[tuple[int, int, int]]] = []
        seen: set[int] = set()
        while pa:
            if pa in seen:
                raise _Refused(neg(ABI.KVM_E2BIG), f"next_pa loops back to the list at {pa:#x}")
            if len(chain) >= pages:              # a list is a page: more means a page twice
                raise _Refused(neg(ABI.KVM_E2BIG), f"more than {pages} lists")
            if not self._ram(pa, LIST_SIZE):
                raise _Refused(neg(ABI.KVM_EFAULT), f"page list at {pa:#x} is not in guest memory")
            seen.add(pa)
            hdr = mem.read(pa, LIST_SIZE)
            next_pa, npages = int.from_bytes(hdr[8:16], "little"), int.from_bytes(hdr[16:24], "little")
            if not self._ram(pa + LIST_SIZE, npages * ENTRY_SIZE):
                raise _Refused(neg(ABI.KVM_EFAULT), f"{npages} entries of the list at {pa:#x} run past "
                               "guest memory")
            if npages > ABI.HEKI_PAGE_LIST_MAX_PAGES:
                raise _Refused(neg(ABI.KVM_E2BIG), f"npages {npages} > {ABI.HEKI_PAGE_LIST_MAX_PAGES}: the "
                               "list does not fit its page")
            count.entries += npages
            if count.entries > pages:
                raise _Refused(neg(ABI.KVM_E2BIG), f"more than {pages} entries")
            raw = mem.read(pa + LIST_SIZE, npages * ENTRY_SIZE)
            chain.append([(int.from_bytes(raw[i:i + 8], "little"),
                           int.from_bytes(raw[i + 8:i + 16], "little"),
                           int.from_bytes(raw[i + 16:i + 24], "little"))
                          for i in range(0, len(raw), ENTRY_SIZE)])
            count.lists += 1
            pa = next_pa
        return chain

    def _check_entries(self, chain: list[list[tuple[int, int, int]]],
                       count: _Count) -> tuple[bytearray, list[tuple[int, int]], int]:
        """The permissions after the request, in the patch's order of checks, on a copy."""
        lay = self.p.layout
        budget = 4 * self.state.pages
        new = bytearray(self.state.perms)
        touched: list[tuple[int, int]] = []
        noexec = 0
        # The patch builds its list head-first, so the last list read is applied first.
        for entries in reversed(chain):
            for spa, epa, perms in entries:
                if spa % PAGE_SIZE or epa % PAGE_SIZE:
                    raise _Refused(neg(ABI.KVM_EINVAL), f"GPA not aligned: {spa:#x}-{epa:#x}")
                if not perms or perms & ~PROT:
                    raise _Refused(neg(ABI.KVM_EINVAL), f"permissions {perms:#x}")
                if not perms & ABI.MEM_ATTR_EXEC:
                    perms |= ABI.MEM_ATTR_EXEC         # no MBEC: "Clearing kernel exec depends on MBEC"
                    noexec += max(0, (epa - spa) // PAGE_SIZE)
                if epa <= spa:
                    raise _Refused(neg(ABI.KVM_EINVAL), f"empty range {spa:#x}-{epa:#x}")
                if not lay.in_vtl0(spa, epa - spa):
                    raise _Refused(neg(ABI.KVM_EINVAL), f"range {spa:#x}-{epa:#x} is not guest memory")
                lo, hi = spa // PAGE_SIZE, epa // PAGE_SIZE
                count.pages += hi - lo
                if count.pages > budget:
                    raise _Refused(neg(ABI.KVM_E2BIG), f"more than {budget} pages")
                if max(new[lo:hi]) >= ABI.MEM_ATTR_IMMUTABLE:     # bit 3, the highest of MEM_ATTR_PROT
                    raise _Refused(neg(ABI.KVM_EPERM), f"immutable permission for GFNs {lo:#x}-{hi:#x}")
                new[lo:hi] = bytes([perms]) * (hi - lo)
                touched.append((lo, hi))
        return new, touched, noexec

    def _apply(self, lo: int, hi: int) -> None:
        """Pages [lo, hi) as the backend must hold them: NW where Heki removed WRITE (only
        write reaches the EPT without MBEC), NR|NW|NX for the stand-in's sections."""
        st, p = self.state, self.p
        want = bytearray(bytes(st.perms[lo:hi]).translate(_BACKEND_ATTRS))
        for gpa, n in st.sections():
            s_lo = max(lo, gpa // PAGE_SIZE)
            s_hi = min(hi, gpa // PAGE_SIZE + n)
            if s_lo < s_hi:
                want[s_lo - lo:s_hi - lo] = bytes([ALL]) * (s_hi - s_lo)
        i = lo
        for attrs, run in itertools.groupby(want):
            n = sum(1 for _ in run)
            if p.vtl0_attrs[i:i + n] != bytes([attrs]) * n:
                p.backend.set_range(i * PAGE_SIZE, n * PAGE_SIZE, attrs)
                p.vtl0_attrs[i:i + n] = bytes([attrs]) * n
            i += n

    # --- a violation: what KVM's mem_attr_fault injects ---------------------------------
    def write_fault(self, vp: VirtualProcessor, vcpu: VCpu, gpa: int) -> None:
        """#PF(P|W) for a write to a page without MEM_ATTR_WRITE; the write never reached
        memory.  On this host the write exits after the instruction retired (host mapping
        or read-only memslot), so the fault comes at the next instruction, and the linear
        address is not known: CR2 = the GPA (the built-in kernel is identity-mapped)."""
        ec = PF_PRESENT | PF_WRITE | (PF_USER if vcpu.sregs.cs.selector & 3 else 0)
        vcpu.complete_pending_io()
        vcpu.sregs.cr2 = gpa
        vcpu.run.kvm_dirty_regs |= u.KVM_SYNC_X86_SREGS
        vcpu.inject_exception(VEC_PF, ec)
        self.refuse.injected(vp, VEC_PF, ec, int(vcpu.regs.rip),
                             f"heki: write to GPA {gpa:#x} without MEM_ATTR_WRITE", request="memory write",
                             gpa=gpa, access="write")


class _Refused(Exception):
    def __init__(self, ret: int, why: str) -> None:
        super().__init__(why)
        self.ret, self.why = ret, why


@dataclass
class _Count:
    lists: int = 0
    entries: int = 0
    pages: int = 0


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class HekiExits(ExitDispatcher):
    """Exits of a Heki-mode VM: a write to a page Heki protects is KVM's #PF; reads and
    allowed writes of the stand-in's NR section are completed from memory (the stand-in
    is invisible to data accesses); everything else as in VTL mode."""

    def __init__(self, partition: Partition, refusals: Refusals, intercepts: Intercepts,
                 privileged: PrivilegedSection, heki: HekiMode) -> None:
        super().__init__(partition, refusals, intercepts, privileged)
        self.heki = heki

    def _mmio(self, vp: VirtualProcessor, vcpu: VCpu, m: Mmio) -> Outcome:
        if vp.active_vtl == Vtl.VTL0 and self.p.layout.in_vtl0(m.gpa, m.length):
            if m.is_write and not self.heki.state.perm(m.gpa) & ABI.MEM_ATTR_WRITE:
                self.heki.write_fault(vp, vcpu, m.gpa)
                return None
            if self.privileged.in_section(m.gpa):
                if m.is_write:
                    self.p.mem.write(m.gpa, m.data)
                else:
                    complete_mmio_read(vcpu, self.p.mem.read(m.gpa, m.length))
                return None
        return super()._mmio(vp, vcpu, m)


class HekiScheduler(Scheduler):
    """The VTL scheduler with one VM and the host as KVM with Heki: the Heki hypercalls on
    the hypercall port, the host's judge in the privileged section, Heki's #PF."""

    def __init__(self, partition: Partition, console: Console | None = None) -> None:
        super().__init__(partition, console)
        self.heki = HekiMode(partition, self.events, self.refusals, self.privileged)
        self.privileged.host_judge = self.heki.judge
        self.exits = HekiExits(partition, self.refusals, self.intercepts, self.privileged, self.heki)
        vtl_hypercall = self._io[ABI.VTL_PORT_HYPERCALL]
        heki_codes = (ABI.KVM_HC_LOCK_CR_UPDATE, ABI.KVM_HC_PROTECT_MEMORY)

        def hypercall(vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
            code = vcpu.regs.rax
            if code in heki_codes and vp.active_vtl == Vtl.VTL0:
                out = self.heki.hypercall(vp, vcpu)
                st = self.heki.state
                # Hardened, in Heki's terms: memory protected once the CRs are pinned
                # (heki_harden's last step; VTL mode's END_OF_BOOT).
                if code == ABI.KVM_HC_PROTECT_MEMORY and vcpu.regs.rax == 0 and st.pinned_cr0 | st.pinned_cr4:
                    self._hardened(vp)
                return out
            return vtl_hypercall(vp, vcpu)

        self._io[ABI.VTL_PORT_HYPERCALL] = hypercall

    # --- snapshots: the host-owned policy is the scheduler's, so it saves and loads it ----
    def policy_extra(self) -> object:
        return self.heki.state.policy()

    def run_state(self) -> dict[str, Any]:
        d = super().run_state()
        d["heki"] = {**self.heki.state.to_json(), "hypercalls": self.heki.hypercalls,
                     "denials": self.heki.denials}
        return d

    def load_run_state(self, d: dict[str, Any]) -> None:
        super().load_run_state(d)
        h = d.get("heki")
        if not isinstance(h, dict):
            raise ValueError("a Heki-mode snapshot without the Heki state")
        self.heki.state.load_json(h)
        for key in ("hypercalls", "denials"):
            if not isinstance(h.get(key), int) or h[key] < 0:
                raise ValueError(f"the Heki {key} count is malformed")
        self.heki.hypercalls, self.heki.denials = h["hypercalls"], h["denials"]
        # The staged image's section is judged by the host's judge (the partition restored
        # the section itself, and the attribute map that makes both NR).
        self.heki._judge_staged(self.heki.state.staged_section)

    def _apply(self, vp: VirtualProcessor, outcome: Outcome) -> None:
        resets = self.resets
        super()._apply(vp, outcome)
        if self.resets != resets:
            self.heki.after_reset()
