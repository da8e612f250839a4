"""What each mode's design should give for a scenario, by the scenario's *category*.

An expectation is never a verdict: `vtl attack` and `vtl compare` observe the outcome
(memory read back, registers from KVM, code markers, events) and only then compare it
with the expectation of the mode they ran in.

VTL mode: every attack is expected blocked (VTL1 owns a policy for each of them); its
expectation text comes from the scenario's description (or attack.EXPECTED).

Heki mode: the expectation follows from what in-KVM Heki covers (docs/heki-mode.md),
decided by the scenario's category, so that a new scenario of a known family needs no
entry of its own.  Categories are matched on the scenario's name, first match wins; a
scenario no category matches is "unclassified": it is reported as having no expectation
in Heki mode (never a silent pass, and `vtl attack --mode heki` exits 2), and gets a
category here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vtl.abi import ABI

Mode = str   # "vtl" | "heki"

# Outcome classes (vtl/tools/attack.py): what the VMM observed.
BLOCKED, SUCCEEDED, NOT_ENFORCED = "blocked", "succeeded", "not enforced on this host"
NOT_APPLICABLE = "not applicable"
LIFECYCLE_PASSED, LIFECYCLE_OUTLIVED = "ran to the end", "policy outlived the kernel"


@dataclass(frozen=True)
class Category:
    name: str
    pattern: str            # regular expression on the scenario's name (re.search)
    heki: str               # the outcome Heki's design gives
    why: str                # ... and why, in Heki's terms


CATEGORIES: tuple[Category, ...] = (
    # Attacks a second VP makes (docs/smp.md, "Cross-VP attacks"): they need VTL1 on every
    # VP; Heki mode is one VM with one VP, so `vtl attack --mode heki` and `vtl compare`
    # leave them out.
    Category("cross-VP", r"^xvp-|^smp-", NOT_APPLICABLE,
             "a cross-VP attack: it needs VTL1 on several VPs; Heki mode has no VTL1 and one VP"),
    # Scenarios built on VTL1 itself (its memory, its calls, its lock, END_OF_BOOT, its
    # allowlist): Heki has no VTL1, so the VMM refuses the first VTL request.
    Category("needs VTL1", r"vtl1|^vtl-|^enable-|^unknown-(call-code|hypercall)$|^ask-|^protect-list|"
             r"^confused-deputy|^stale-audit|-(before|at)-(eob|lock)$|^table-base-in-section$|"
             r"^exec-page-writable|^reset-triple-fault$|^kexec-bad-requests$",
             NOT_APPLICABLE, "the scenario needs VTL1 (a VTL call, VTL1's lock or END_OF_BOOT); Heki has "
             "none: the VMM refuses the request (VTL_E_DISABLED / VTL_E_NOT_ENABLED), nothing changes"),
    Category("CR0/CR4 pin", r"^clear-cr(0-wp|4-(smep|smap|umip|fsgsbase))$", BLOCKED,
             "KVM_HC_LOCK_CR_UPDATE pins CR0.WP and CR4's SMEP/SMAP/UMIP/FSGSBASE (those the host has): "
             "the MOV gets #GP(0), the CR unchanged"),
    Category("kernel read-only memory", r"^write-(kernel-text|rodata|ro-after-init)$", BLOCKED,
             "KVM_HC_PROTECT_MEMORY: text R-X immutable, rodata R--, ro_after_init R-- from late init "
             "(heki_late_init, after mark_readonly): the write is a #PF from KVM"),
    Category("refused by the CPU", r"^lmsw-|non-canonical|^clear-efer-lme$", BLOCKED,
             "the CPU (KVM) refuses the value in any mode (LMSW cannot clear PE, CR0.PG needs PE, LSTAR "
             "must be canonical, EFER.LME cannot change while paging is on); not Heki's doing"),
    Category("execute data", r"^exec-data|^mov-cr-outside-section$", BLOCKED,
             "the attacker leaves the kernel's own page tables as they are: their NX bit stops the fetch "
             "(Heki would add an EPT no-exec with MBEC, which this host lacks)"),
    Category("not pinned by Heki", r"^load-own-cr3|^l[igl]dt|^ltr|^xsetbv|efer|lstar|^modify-page-table|"
             r"^(idt|gdt|tss|ist)-|-rewrite-",
             SUCCEEDED, "Heki pins only CR0/CR4 bits and protects only the pages of its list: CR3, GDTR/"
             "IDTR/LDTR/TR, XCR0, MSRs (EFER, LSTAR), the page tables and descriptor tables in data are "
             "not Heki's"),
    Category("privileged-section stand-in", r"section", BLOCKED,
             "the mode's stand-in for KVM's CR masks (the privileged section) refuses what it cannot judge; "
             "in-KVM Heki has no section"),
    # Lifecycle (vtl compare)
    Category("kexec authentication", r"^kexec-deny$", SUCCEEDED,
             "Heki has no kexec authentication and no kexec policy: the kexec is the guest's own jump, "
             "nothing measures the next kernel, so an image changed after it was staged simply runs"),
    Category("kexec", r"^kexec-", LIFECYCLE_OUTLIVED,
             "Heki has no kexec flow: Linux's kexec is a jump inside the guest the host never sees, and "
             "KVM keeps the pins and the immutable pages in struct kvm (\"doesn't handle VM reboot, "
             "kexec, nor hibernate yet\"): the next kernel meets the old kernel's immutable text and CR "
             "pins, and its own page list is refused (-EPERM: it names those immutable pages)"),
    Category("module", r"^module-", NOT_APPLICABLE,
             "Heki has no module authentication (the kernel's request to VTL1 is refused)"),
    Category("reset", r"^reset-", LIFECYCLE_OUTLIVED,
             "KVM keeps pins and memory attributes in struct kvm across a reset (\"doesn't handle VM "
             "reboot\"): the rebooted kernel meets its predecessor's read-only pages"),
)
UNCLASSIFIED = Category("unclassified", "", "no expectation",
                        "no category of vtl/tools/expectations.py matches this scenario's name")
LIFECYCLE = ("kexec-teardown", "kexec-persist", "kexec-deny", "kexec-bad-requests", "module-load",
             "module-area-writable", "reset-request", "reset-triple-fault")


def category(name: str) -> Category:
    return next((c for c in CATEGORIES if re.search(c.pattern, name)), UNCLASSIFIED)


def expected_outcome(name: str, mode: Mode) -> tuple[str, str]:
    """(the outcome class the mode's design should give, why)."""
    if mode == "heki":
        c = category(name)
        return c.heki, c.why
    if name in LIFECYCLE:
        return LIFECYCLE_PASSED, "VTL1's lifecycle flow (docs/lifecycle.md) runs to the end"
    return BLOCKED, "VTL1 owns a policy for it"


def needs_vtl1_refusal(responses: set[str]) -> bool:
    """The VMM refused a VTL request because there is no VTL1 (observed refusals)."""
    return bool(responses & {"VTL_E_DISABLED", "VTL_E_NOT_ENABLED"})


NOT_ENABLED_CODES = {ABI.VTL_E_DISABLED, ABI.VTL_E_NOT_ENABLED}
