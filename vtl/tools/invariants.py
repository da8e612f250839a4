"""What `vtl attack` checks of a whole run beyond the targets a scenario names: the
partition's own record (lifecycle events with the protections and pins before and after,
VP starts, VTL calls and returns), the memory a validated kexec image occupies, read back
and compared with the trusted file.  Cross-VP attacks (docs/smp.md) aim at exactly what
no single target shows: a boot ended with a VP unpinned, a validated image changed after
VTL1 hashed it, something of VTL1 left after a RESET, an old VTL1 call returning into a
partition that was reset meanwhile.  Every check runs after every attack (they hold for
any run); each returns what it checked and what it found wrong, in the words of
`attack.read_back`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmm.elf import read_image
from vtl.abi import ABI
from vtl.core.events import EventLog
from vtl.core.partition import Partition
from vtl.lifecycle.protections import unprotected

# Lifecycle steps after which nothing of the VTL1 before them may act: a RESET ends VTL1,
# a teardown ends it, a restart (kexec) replaces the kernel that made every VTL call so far.
ENDINGS = ("reset", "vtl1_teardown", "vtl0_restart")
VTL1_ENDS = ("reset", "vtl1_teardown")


def check_run(p: Partition, events: EventLog, staged: Path | None) -> tuple[list[str], list[str]]:
    """(what was checked, what was found wrong)."""
    checked: list[str] = []
    wrong: list[str] = []
    evs = events.events
    for check in (_end_of_boot, _vtl1_ends, _returns, _restarts):
        c, w = check(evs)
        checked += c
        wrong += w
    if staged is not None:
        c, w = validated_image(p, evs, staged)
        checked += c
        wrong += w
    return list(dict.fromkeys(checked)), wrong


def _end_of_boot(evs: list[Any]) -> tuple[list[str], list[str]]:
    """END_OF_BOOT accepted only with every online VP's registers pinned (where VTL1 pins
    registers at all: a host without the privileged-section decoder pins none)."""
    checked, wrong = [], []
    online = {0}
    for e in evs:
        if e.kind == "lifecycle" and e.step in ENDINGS:
            online = {0}
        elif e.kind == "vp_started":
            online.add(e.vp)
        elif e.kind == "lifecycle" and e.step == "end_of_boot":
            checked.append("END_OF_BOOT's pins")
            if e.status != ABI.VTL_OK or not e.after:
                continue                        # refused: the boot goes on
            pinned = set(e.after.get("pinned_vps") or [])
            if pinned and not online <= pinned:
                wrong.append(f"END_OF_BOOT accepted with VP{min(online - pinned)} online and unpinned "
                             f"(pinned: {sorted(pinned)})")
    return checked, wrong


def _vtl1_ends(evs: list[Any]) -> tuple[list[str], list[str]]:
    """After a RESET or a teardown: no protection, no pin, VTL1's memory zeroed."""
    checked, wrong = [], []
    for e in evs:
        if e.kind == "lifecycle" and e.step in VTL1_ENDS and e.after:
            checked.append(f"{e.step}'s end state")
            if not unprotected(e.after):
                wrong.append(f"protections or pins left after the {e.step}")
            if e.after.get("vtl1_region_zero") is False:
                wrong.append(f"VTL1's memory not zeroed by the {e.step}")
    return checked, wrong


def _returns(evs: list[Any]) -> tuple[list[str], list[str]]:
    """A VTL return on a VP comes from a VTL1 entry made since the partition last lost its
    VTL1 or its kernel: a VTL call or an intercept on that VP, the enable (the boot VP) or
    the VP's start.  One that does not is an old VTL1 call returning into a partition that
    was reset (or kexec'd) meanwhile.  Needs per-call events (vtl attack traces them)."""
    checked, wrong = [], []
    entered: dict[int, bool] | None = None      # None: before any ending, nothing to check
    for e in evs:
        if e.kind == "lifecycle" and e.step in ENDINGS:
            entered = {}
            checked.append(f"VTL returns after the {e.step}")
        elif entered is None:
            continue
        elif e.kind in ("vtl_call", "intercept", "vp_started"):
            entered[e.vp] = True
        elif e.kind == "lifecycle" and e.step == "vtl1_enable":
            entered[e.vp] = True
        elif e.kind == "vtl_return" and not entered.get(e.vp):
            wrong.append(f"a VTL return on VP{e.vp} from a VTL1 call made before the last "
                         "reset or kexec")
            entered[e.vp] = True
    return checked, wrong


def _restarts(evs: list[Any]) -> tuple[list[str], list[str]]:
    """The next kernel starts from the boot VP's own request (a kexec asked for on an AP
    would restart the boot VP wherever it was, inside VTL1 perhaps: docs/smp.md)."""
    checked, wrong = [], []
    for e in evs:
        if e.kind == "lifecycle" and e.step == "vtl0_restart":
            checked.append("the VP a kexec came from")
            if e.vp != 0:
                wrong.append(f"VTL0 restarted at a new kernel on VP{e.vp}'s request (an AP)")
    return checked, wrong


def validated_image(p: Partition, evs: list[Any], staged: Path) -> tuple[list[str], list[str]]:
    """While VTL1 holds a kexec image as validated (KEXEC_VALIDATE accepted, no unload or
    jump since), its segments are the trusted file's, byte for byte: read back from guest
    memory and compared with the staged ELF (zeros from filesz to the end of each segment's
    last page, as VTL1 measures)."""
    validated = False
    for e in evs:
        if e.kind != "lifecycle":
            continue
        if e.step == "kexec_validate" and e.status == ABI.VTL_OK:
            validated = True
        elif e.step in ("kexec_unload", "kexec_jump") and e.status == ABI.VTL_OK:
            validated = False
        elif e.step in ENDINGS:
            validated = False
    if not validated:
        return [], []
    image = read_image(staged)
    wrong = []
    for seg in image.segments:
        want = image.data[seg.offset:seg.offset + seg.filesz]
        end = (seg.gpa + seg.memsz + 0xFFF) & ~0xFFF
        want += bytes(end - seg.gpa - len(want))
        got = p.mem.read(seg.gpa, len(want))
        if got != want:
            at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            wrong.append(f"validated kexec image at {seg.gpa + at:#x} now {got[at]:#04x} "
                         f"(the trusted file has {want[at]:#04x})")
    return [f"validated kexec image ({len(image.segments)} segments)"], wrong
