"""`vtl`: launch dual-VTL guests on KVM, list scenarios, probe the host, benchmark, attack."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from pydantic import ValidationError

from vmm.elf import read_image
from vmm.errors import VmmError
from vtl.abi import ABI
from vtl.core.images import UnknownScenario, check_scenario, default_vtl0_image, default_vtl1_image
from vtl.core.layout import MEM_RANGE, LayoutError, check_mem_size
from vtl.run.result import RunInterrupted

EPILOG = """\
exit status: 0 = the guest passed; otherwise the guest's own status, or
  1 VMM or configuration error (bad image or option, no /dev/kvm, a run the VMM could not continue)
  2 usage error; for `vtl attack`, an attack that was not blocked
  3 a guest crashed (triple fault, emulation failure, halt)
  4 VTL1 stopped the partition
  5 ended over the control socket (`vtl run --control`, QMP command `quit`)
  124 timeout, 130 interrupted (Ctrl-C), 141 output closed (e.g. `| head`), 143 terminated (SIGTERM)
Docs: README.md, docs/abi.md, docs/architecture.md."""

MAX_PARAM = (1 << 64) - 1
MAX_CALLS = 10_000_000
STATUS_PIPE_CLOSED = 141


class Terminated(Exception):
    """SIGTERM outside a run (during start-up, image loading, a bench floor)."""


def _int_in(lo: int, hi: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be between {lo} and {hi}, not {value}")
        return value
    return parse


def _mib(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    try:
        check_mem_size(value << 20)
    except LayoutError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value << 20


def _vp_count(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= value <= ABI.VTL1_MAX_VPS:
        raise argparse.ArgumentTypeError(f"a partition has 1 to {ABI.VTL1_MAX_VPS} VPs (not {value})")
    return value


def _vp_list(text: str) -> tuple[int, ...]:
    counts = tuple(_vp_count(part) for part in text.split(",") if part.strip())
    if not counts:
        raise argparse.ArgumentTypeError("give VP counts, e.g. 1,2,4")
    return tuple(sorted(set(counts)))


def _vps(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vps", type=_vp_count, default=1, metavar="N",
                   help=f"virtual processors, 1 to {ABI.VTL1_MAX_VPS} (default: 1).  Each VP runs on its "
                        "own thread; VP0 boots and the VTL0 kernel starts the others (VTL_HC_START_VP), "
                        "which wait offline until then (docs/smp.md)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"timeout must be a positive, finite number of seconds, not {text}")
    return value


def _images(p: argparse.ArgumentParser, vtl1: bool = True) -> None:
    p.add_argument("--vtl0-image", type=Path, default=default_vtl0_image(), metavar="ELF",
                   help="VTL0 kernel (default: %(default)s)")
    if vtl1:
        p.add_argument("--vtl1-image", type=Path, default=default_vtl1_image(), metavar="ELF",
                       help="VTL1 secure kernel (default: %(default)s)")


def _backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("memslot", "host_mapping", "rwx"), default=None,
                   help="how VTL1's protections of VTL0 memory are applied (default: the best one "
                        "`vtl caps` finds working: rwx, else host_mapping, else memslot)")


def _mode(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--mode", choices=("vtl", "heki"), default="vtl",
                   help=f"vtl: VTL0 and VTL1 as paired VMs, the policy is VTL1's (default); heki: one VM, no "
                        f"VTL1, the VMM as KVM with the Heki patches (docs/heki-mode.md); {what}")


def _lifecycle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", nargs="+", default=[], metavar="FILE",
                   help="VTL1's allowlist, provisioned at launch in its boot data: an ELF file stands for "
                        "its loaded-image measurement (what VTL_CALL_KEXEC_VALIDATE computes), any other "
                        "file for the SHA-256 of its bytes padded to 4 KiB pages (a module), sha256:HEX "
                        "for that digest (at most 256)")
    p.add_argument("--kexec-policy", choices=("teardown", "persist", "deny"), default="teardown",
                   help="what VTL1 does at a validated kexec: end itself and every protection "
                        "(teardown), stay and protect the new kernel from its first instruction "
                        "(persist), or refuse (deny) (default: %(default)s)")
    p.add_argument("--stage", type=Path, metavar="FILE",
                   help="place FILE at the top of VTL0's memory (boot_info.staged_gpa/size), e.g. the "
                        "next kernel for a kexec scenario")
    p.add_argument("--reset-on-triple-fault", action="store_true",
                   help="a VTL0 triple fault is an emulated RESET (VTL1 torn down, its memory zeroed, "
                        "VTL0 reboots from its image) instead of the end of the run")


def _lifecycle_config(args: argparse.Namespace) -> dict[str, Any]:
    from vtl.core.trust import trust_list

    return {"trust": trust_list(args.trust), "kexec_policy": args.kexec_policy, "staged": args.stage,
            "reset_on_triple_fault": args.reset_on_triple_fault}


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="vtl", description="Run a partition with one KVM VM per Virtual Trust Level (VTL0: "
        "the ordinary kernel; VTL1: a secure kernel that owns the policy) over one shared memory.",
        epilog=EPILOG, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="boot VTL0 (which enables VTL1) and stream its console",
                       description="Boot the VTL0 image; it asks the VMM to enable VTL1, which is loaded, "
                       "measured (SHA-256 of what is loaded, docs/abi.md) and started in its own KVM VM.  "
                       "The console is streamed live, each line tagged with the VTL it came from; a "
                       "summary follows.", epilog=EPILOG, formatter_class=fmt)
    _images(r)
    r.add_argument("--no-vtl1", action="store_true",
                   help="run without VTL1: the guest's enable request gets VTL_E_DISABLED")
    r.add_argument("--mode", choices=("vtl", "heki"), default="vtl",
                   help="vtl: VTL0 and VTL1 as paired VMs, the policy is VTL1's (default); heki: one VM, "
                        "no VTL1, the VMM in the role of KVM with the Heki patches (KVM_HC_LOCK_CR_UPDATE, "
                        "KVM_HC_PROTECT_MEMORY on the hypercall port; docs/heki-mode.md)")
    r.add_argument("--scenario", default="", metavar="NAME",
                   help="scenario built into the VTL0 image (see `vtl scenarios`; default: boot)")
    r.add_argument("--param", type=_int_in(0, MAX_PARAM, "--param"), default=0, metavar="N",
                   help="scenario parameter (0..2^64-1), e.g. iterations for bench-null-call")
    r.add_argument("--events", type=Path, metavar="FILE",
                   help="write every event (VTL calls/returns, reports, refusals, intercepts, faults, exit) "
                        "as JSON lines to FILE, a regular file or a character device (/dev/null); opened "
                        "only once the images are loaded, and never over a file the command reads, a "
                        "FIFO or pipe (a reader that stalls would hold the run past --timeout) or the "
                        "file stdout already writes to")
    r.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (console goes to stderr)")
    r.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                   help="stop the guest after S seconds (default: %(default)s)")
    r.add_argument("--mem", type=_mib, default=256 << 20, metavar="MiB",
                   help=f"guest memory in MiB (default: 256; {MEM_RANGE})")
    _vps(r)
    _backend(r)
    _lifecycle(r)
    r.add_argument("--quiet", action="store_true", help="do not show or keep the guest console")
    r.add_argument("--control", type=Path, metavar="PATH",
                   help="serve a control socket at PATH (a Unix socket, mode 0600) while the guest runs: "
                        "QMP, as QEMU speaks it, so qmp-shell and qemu.qmp drive it (query-status, "
                        "stop/cont pause and resume every VP, system_reset, query-cpus-fast, and the "
                        "project's vtl-query-protections, vtl-subscribe to events; docs/control-socket.md).  "
                        "`quit` ends the run with exit status 5.  "
                        "A stale socket at PATH is replaced; anything else there, or a missing "
                        "directory, is a usage error (exit 2).  The file is removed when the run ends")
    r.add_argument("--snapshot", type=Path, metavar="DIR",
                   help="where this run saves a snapshot (a new directory: guest memory, every vCPU of "
                        "every VTL, the protections and pins, the run's state, with a manifest of SHA-256 "
                        "digests; docs/snapshot.md): when the guest asks (VTL_HC_SNAPSHOT) or at "
                        "--snapshot-at.  DIR must not exist")
    r.add_argument("--snapshot-at", choices=("hardened", "kexec", "vtl1"), default=None,
                   help="save the --snapshot when the guest's hardening has ended (VTL mode: VTL1 "
                        "accepted END_OF_BOOT; Heki mode: the kernel's pages protected after its CR "
                        "pins): `hardened` the first kernel's, `kexec` the first kernel a kexec "
                        "started; `vtl1`: once VTL1 has come up on the boot VP (its first VTL return "
                        "after the enable), before any hardening; the run then goes on")
    r.add_argument("--restore", type=Path, metavar="DIR",
                   help="instead of booting, restore the partition saved in DIR (`--snapshot`) and "
                        "resume it: checked whole first (format version, every file's SHA-256, the "
                        "images, VP count, memory size and the host's CPUID), its protections rebuilt "
                        "through --backend (default: the best this host has, whichever was saved) "
                        "and their policy digest compared with the saved one before the first "
                        "instruction; a snapshot that fails any check is refused in one line, exit "
                        "1, nothing run.  Options that define the partition (--vps, --mem, --mode, "
                        "--scenario, --param, --trust, --kexec-policy, --stage, --no-vtl1, "
                        "--reset-on-triple-fault) must match the snapshot when given; --vtl0-image "
                        "and --vtl1-image may name the same files elsewhere")

    s = sub.add_parser("scenarios", help="list the scenarios built into a VTL0 image")
    _images(s, vtl1=False)
    s.add_argument("--json", action="store_true")

    c = sub.add_parser("caps", help="which KVM mechanisms this host has, and what the project uses")
    c.add_argument("--json", action="store_true")

    a = sub.add_parser("attack", help="run every attack scenario in a fresh partition; what was blocked, how",
                       description="Each attack scenario of the VTL0 image runs in a fresh, hardened "
                       "partition, with at least the VPs its description declares (\"(--vps 2+)\": the "
                       "cross-VP attacks, docs/smp.md).  The outcome is observed by the VMM (target "
                       "memory and MSRs read back after the run, intercepts/verdicts/refusals on the event "
                       "stream, what the guest reported through the report channel, the run checked "
                       "against its own record): blocked, detected after the fact, not "
                       "enforced on this host, or succeeded.  Exit 2 if any attack was not blocked.",
                       formatter_class=fmt)
    _images(a)
    _backend(a)
    _vps(a)
    a.add_argument("--scenario", nargs="+", metavar="NAME", dest="only",
                   help="run only these attack scenarios (default: every one the image carries)")
    a.add_argument("--after-restore", action="store_true",
                   help="each attack's partition saves a snapshot once hardened (END_OF_BOOT accepted, "
                        "`vtl run --snapshot-at hardened`) and stops there; the attack then runs on in a "
                        "partition restored from it (its policy digest checked equal to the saved one), "
                        "where the outcome is observed.  A scenario that never reaches the hardened "
                        "point runs as without, and the table says so (docs/snapshot.md; VTL mode only)")
    _mode(a, "in Heki mode each outcome is compared with what Heki's design gives (an attack Heki does "
             "not cover is expected to succeed) and the exit status is 2 if any outcome differs")
    a.add_argument("--json", action="store_true")

    m = sub.add_parser("memmap", help="VTL0's and VTL1's attribute map after a hardened boot",
                       description="Boot with the `harden` scenario (VTL1 sets attributes per section, "
                       "locks VTL0's page tables, ends boot) and show the attribute map of each VTL.")
    _images(m)
    _backend(m)
    _vps(m)
    m.add_argument("--png", type=Path, metavar="FILE",
                   help="also draw the map (needs matplotlib: pip install '.[plot]')")
    _mode(m, "in Heki mode the map is the host-owned page permissions as this host enforces them")
    m.add_argument("--json", action="store_true")

    k = sub.add_parser("kexec", help="run a kexec flow (teardown, persist, deny) and show its timeline",
                       description="Boot the VTL0 image with the next kernel staged in its memory and on "
                       "VTL1's allowlist; VTL0 hardens itself, places the new kernel's segments and asks "
                       "VTL1 to validate them (VTL1 write-protects, then hashes them), then asks for the "
                       "jump.  teardown: VTL1 ends itself and every protection and pin, VTL0 starts the "
                       "new kernel (which enables a new VTL1).  persist: VTL1 stays and protects the new "
                       "kernel before its first instruction.  deny: every attempt is refused with nothing "
                       "changed.  Prints each step, who did it, the protections and pins before and after "
                       "(read by the VMM from its maps and KVM), how long it took, and the VMM's checks.  "
                       "Exit 0 if every check holds, 2 if one does not.",
                       epilog=EPILOG, formatter_class=fmt)
    _vps(k)
    k.add_argument("--flow", choices=("teardown", "persist", "deny"), required=True,
                   help="the flow, and VTL1's kexec policy for the run")
    k.add_argument("--image", type=Path, default=None, metavar="ELF",
                   help="the next kernel (default: the built-in VTL0 kernel linked at 8 MiB, "
                        "guest_vtl0/build/vtl0-kexec.elf)")
    k.add_argument("--untrusted", action="store_true",
                   help="do not put the next kernel on VTL1's allowlist: VTL1's refusal to validate "
                        "it, with nothing changed, is then the expected result (exit 0)")
    k.add_argument("--trust", nargs="+", default=[], metavar="FILE",
                   help="more allowlist entries, as for `vtl run --trust`")
    _images(k)
    _backend(k)
    k.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                   help="stop the guest after S seconds (default: %(default)s)")
    _mode(k, "heki: the same kexec scenario under Heki, which has no kexec flow nor authentication: the "
             "kernel jumps to the next one itself, as Linux does; what the VMM found of that jump after the "
             "run (RIP, the image in memory, what the host refused the next kernel, what it still holds) and "
             "what Heki's design gives (exit 0 when they agree)")
    k.add_argument("--json", action="store_true", help="the whole report, timeline included, as JSON")

    sn = sub.add_parser("snapshot", help="what a snapshot directory holds, verified (nothing is run)",
                        description="Check a snapshot (`vtl run --snapshot DIR`) whole, as a restore would "
                        "before building anything: the format version, every file's size and SHA-256 "
                        "(the memory file's included), and show what it holds: mode, VPs and their "
                        "states, images, VTL1's measurement, the protections and the policy digest a "
                        "restore must reproduce (docs/snapshot.md).  Exit 1 if it is not whole.",
                        epilog=EPILOG, formatter_class=fmt)
    sn.add_argument("dir", type=Path, metavar="DIR", help="the snapshot directory")
    sn.add_argument("--json", action="store_true")

    cm = sub.add_parser("compare", help="every attack and lifecycle scenario and the costs, VTL mode beside "
                        "Heki mode, in one run",
                        description="Run every attack and lifecycle scenario of the VTL0 image in both modes "
                        "(VTL: VTL1 owns the policy; Heki: one VM, the VMM as KVM with the Heki patches, "
                        "docs/heki-mode.md), each in a fresh partition, and show each outcome as the VMM "
                        "observed it, the mechanism that decided it, and where the modes differ.  Then the "
                        "costs in both modes beside floors measured in the same run, including the in-kernel "
                        "exit floor that stands for what in-KVM Heki pays (docs/compare.md).  Exit 0 when "
                        "every outcome is what its mode's design gives, 2 otherwise.", formatter_class=fmt)
    _images(cm)
    cm.add_argument("--scenario", nargs="+", metavar="NAME", dest="only",
                    help="compare only these scenarios (default: every attack and lifecycle scenario)")
    cm.add_argument("--ops", type=_int_in(100, 100_000, "--ops"), default=1000, metavar="N",
                    help="operations per cost row (CR writes, violations; default: %(default)s)")
    cm.add_argument("--calls", type=_int_in(100, MAX_CALLS, "--calls"), default=10_000, metavar="N",
                    help="null calls and floor round trips to time (default: %(default)s)")
    cm.add_argument("--png", type=Path, metavar="FILE",
                    help="also draw the outcome matrix and the costs (needs matplotlib)")
    cm.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="VTL round-trip cost against floors measured in the same run")
    b.add_argument("--calls", type=_int_in(100, MAX_CALLS, "--calls"), default=100_000, metavar="N",
                   help="null VTL calls to time (default: %(default)s; 100 to 10^7)")
    b.add_argument("--intercepts", type=_int_in(0, MAX_CALLS, "--intercepts"), default=2000, metavar="N",
                   help="allowed secure intercepts to time (default: %(default)s; 0 skips)")
    b.add_argument("--no-protection", action="store_true",
                   help="skip the cost of protecting 1k/16k/64k pages per backend")
    b.add_argument("--lifecycle", type=_int_in(0, 100, "--lifecycle"), default=1, metavar="N",
                   help="run each lifecycle flow (kexec teardown/persist/deny, RESET, module load) N "
                        "times and report each step's cost (default: %(default)s; 0 skips)")
    b.add_argument("--restores", type=_int_in(0, 100, "--restores"), default=5, metavar="N",
                   help="cold-boot a hardened partition to its --snapshot-at hardened save, then restore N "
                        "clones of that snapshot and report restore time beside boot time (default: "
                        "%(default)s; 0 skips)")
    b.add_argument("--vps", type=_vp_list, default=(1, 2, 4), metavar="LIST",
                   help="VP counts for the null-call round trip with every VP calling at once, beside "
                        "Python and C floors with as many threads (default: 1,2,4; docs/smp.md)")
    b.add_argument("--smp-calls", type=_int_in(0, MAX_CALLS, "--smp-calls"), default=5000, metavar="N",
                   help="null VTL calls per VP for --vps (default: %(default)s; 0 skips)")
    _mode(b, "heki: the Heki-mode costs (null Heki hypercall, allowed and refused CR writes, a memory "
             "violation, protecting pages, a hardened boot) beside the userspace and in-kernel exit floors "
             "(as `vtl compare`'s cost table, one mode)")
    b.add_argument("--json", action="store_true")
    return p


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")


class _ConsoleWriter:
    """Writes console lines; a closed or full output stops the run instead of crashing it."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.failed: OSError | None = None

    def __call__(self, line: str) -> None:
        if self.failed is not None:
            return
        try:
            self.out.write(line + "\n")
            self.out.flush()
        except OSError as e:
            self.failed = e
            raise VmmError(f"cannot write the console: {e.strerror or e}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from vtl.core.config import PartitionConfig
    from vtl.core.events import EventLog
    from vtl.core.partition import Partition
    from vtl.run import control
    from vtl.run.controlsock import ControlSocketError, check_path
    from vtl.services.console import Console
    from vtl.tools.summary import run_summary_lines

    if args.control is not None:
        try:
            check_path(args.control)    # before the images load; control.run checks again
        except ControlSocketError as e:
            print(f"vtl run: error: {e}", file=sys.stderr)
            return 2
    usage = _snapshot_usage(args)
    if usage is not None:
        print(f"vtl run: error: {usage}", file=sys.stderr)
        return 2
    out = sys.stderr if args.json else sys.stdout
    writer = _ConsoleWriter(out)
    # A guest decides how many events and lines there are: keep none of them in memory
    # beyond a short tail for --json.
    events = EventLog(keep=0)
    if args.restore is not None:
        from vtl.run.restore import open_snapshot

        snap = open_snapshot(args.restore)             # refused whole before anything is built
        config = _restore_config(args, snap)
    else:
        config = PartitionConfig(vtl0_image=args.vtl0_image,
                                 vtl1_image=None if args.no_vtl1 else args.vtl1_image,
                                 mem_size=args.mem, nr_vps=args.vps, scenario=args.scenario,
                                 param=args.param, attr_backend=args.backend, **_lifecycle_config(args))
        check_scenario(read_image(config.vtl0_image), args.scenario)     # a usage error, before KVM
        if args.mode == "heki":
            from vtl.modes.heki import heki_config

            config = heki_config(config)
    console = Console(config.nr_vps, None if args.quiet else writer, keep=0 if args.quiet else 200)
    make = _mode_scheduler(config.mode).get("scheduler")
    try:
        if args.restore is not None:
            from vtl.run.restore import restore

            partition, restored = restore(snap, config=config, events=events, console=console,
                                          **_mode_scheduler(config.mode))
            make = _the(restored)
        else:
            partition = Partition(config, events)
        with partition:
            if args.events is not None:
                events.open_file(args.events)
            result, sched = control.run(partition, console, args.timeout, args.control,
                                        scheduler=_with_snapshots(make, args))
    except ControlSocketError as e:
        print(f"vtl run: error: {e}", file=sys.stderr)
        return 2
    finally:
        events.close()
    scenario = config.scenario or "boot"
    if isinstance(writer.failed, BrokenPipeError):
        _silence_stdout()
        return STATUS_PIPE_CLOSED     # the reader went away (`| head`): stop quietly, as tools do
    if writer.failed is not None:
        print(f"vtl run: error: {result.message}", file=sys.stderr)
        return 1
    if args.json:
        doc = result.model_dump()
        doc.update(scenario=scenario, console_tail=list(console.tail),
                   console_line_count=console.lines, events=dict(events.counts),
                   reports=[r.model_dump(exclude={"data"}) for r in sched.reports.records],
                   max_rss_mib=_peak_rss_mib())
        heki = getattr(sched, "heki", None)       # Heki mode: the host-owned policy at the end
        if heki is not None:
            doc.update(mode="heki", heki=heki.summary())
        _print_json(doc)
    else:
        lines = run_summary_lines(result, scenario, config)
        heki = getattr(sched, "heki", None)
        out.write("\n".join(lines + (heki.summary_lines() if heki is not None else [])) + "\n")
    if result.reason == "vmm_error":
        print(f"vtl run: error: {result.message}", file=sys.stderr)
        return 1
    return result.status & 0xFF


def _snapshot_usage(args: argparse.Namespace) -> str | None:
    """What is wrong with the snapshot options, before anything is read or built."""
    if args.snapshot_at is not None and args.snapshot is None:
        return "--snapshot-at needs --snapshot DIR (where to save)"
    if args.snapshot is not None:
        if os.path.lexists(args.snapshot):
            return f"--snapshot {args.snapshot}: it exists (a snapshot is written to a new directory)"
        parent = args.snapshot.parent
        if not parent.is_dir():
            return f"--snapshot {args.snapshot}: {parent} is not a directory"
        if args.restore is not None and args.snapshot.resolve() == args.restore.resolve():
            return "--snapshot and --restore name the same directory"
    return None


# Options that define a partition: with --restore, the snapshot does; given, they must agree.
_DEFINING = {"vps": "nr_vps", "mem": "mem_size", "mode": "mode", "scenario": "scenario", "param": "param",
             "kexec_policy": "kexec_policy", "reset_on_triple_fault": "reset_on_triple_fault"}


def _restore_config(args: argparse.Namespace, snap: Any) -> Any:
    """The snapshot's config, the images where the command line puts them, the backend
    it asks for; an option given that contradicts the snapshot is refused (one line)."""
    from vtl.core.trust import trust_list
    from vtl.lifecycle.snapfile import SnapshotError
    from vtl.run.restore import config_of

    saved = config_of(snap)
    given = _given_options(args)
    for opt, field in _DEFINING.items():
        if opt in given and getattr(args, opt) != getattr(saved, field):
            flag = "--" + opt.replace("_", "-")
            raise SnapshotError(f"{flag} {getattr(args, opt)} does not match the snapshot's "
                                f"{getattr(saved, field)}")
    if "no_vtl1" in given and (saved.vtl1_image is None) != args.no_vtl1:
        raise SnapshotError("--no-vtl1 does not match the snapshot (VTL1 was "
                            f"{'disabled' if saved.vtl1_image is None else 'available'})")
    if "trust" in given and trust_list(args.trust) != saved.trust:
        raise SnapshotError("--trust does not match the snapshot's allowlist")
    update: dict[str, Any] = {"attr_backend": args.backend}
    if "vtl0_image" in given:
        update["vtl0_image"] = args.vtl0_image
    if "vtl1_image" in given and saved.vtl1_image is not None:
        update["vtl1_image"] = args.vtl1_image
    if "stage" in given:
        update["staged"] = args.stage
    return saved.model_copy(update=update)


def _given_options(args: argparse.Namespace) -> set[str]:
    """The run options given on the command line (argparse only knows their values)."""
    argv = getattr(args, "argv", None) or []
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run = sub.choices["run"]
    for action in run._actions:
        action.default = argparse.SUPPRESS
    try:
        given = vars(run.parse_args(argv[argv.index("run") + 1:] if "run" in argv else []))
    except (SystemExit, ValueError):
        return set()
    return set(given)


def _the(sched: Any) -> Any:
    """A scheduler factory that hands out `sched` (a restored run's, built by the restore)."""
    def factory(p: Any, c: Any) -> Any:
        return sched
    return factory


def _with_snapshots(make: Any, args: argparse.Namespace) -> Any:
    """The run's scheduler with its snapshot settings (--snapshot, --snapshot-at)."""
    from vtl.run.scheduler import Scheduler

    factory = make or Scheduler

    def build(p: Any, c: Any) -> Any:
        s = factory(p, c)
        s.snapshot_dir = args.snapshot
        s.snapshot_at = args.snapshot_at
        return s
    return build


def _mode_scheduler(mode: str) -> dict[str, Any]:
    """control.run's scheduler for `--mode` (the VTL one unless heki)."""
    if mode == "heki":
        from vtl.modes.heki import HekiScheduler

        return {"scheduler": HekiScheduler}
    return {}


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss, it is not
    inherited across exec from whoever started us)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def cmd_scenarios(args: argparse.Namespace) -> int:
    from vmm.elf import read_image
    from vtl.core.images import scenarios

    found = scenarios(read_image(args.vtl0_image))
    if args.json:
        _print_json([s.model_dump() for s in found])
    elif not found:
        print(f"{args.vtl0_image} has no .vtl_scenarios section")
    else:
        width = max(len(s.name) for s in found)
        for s in found:
            print(f"{s.name:<{width}}  {s.description}")
    return 0


def cmd_caps(args: argparse.Namespace) -> int:
    from vtl.tools.caps import probe_caps, render_caps

    caps = probe_caps()
    if args.json:
        _print_json(caps.model_dump())
    else:
        print(render_caps(caps))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vtl.tools.bench import bench_steps, render_bench, run_bench
    from vtl.tools.progress import bar, wanted

    if args.mode == "heki":
        from vtl.core.images import default_vtl0_image, default_vtl1_image
        from vtl.tools.compare import cost_steps, render_costs, run_costs

        with bar(cost_steps(("heki",)), "vtl bench --mode heki", "steps", wanted(args.json)) as step:
            costs, floors, part, missing = run_costs(default_vtl0_image(), default_vtl1_image(),
                                                     calls=min(args.calls, 100_000), step=step,
                                                     modes=("heki",))
        if args.json:
            _print_json({"mode": "heki", "costs": [c.model_dump() for c in costs],
                         "floors": [f.model_dump() for f in floors],
                         "partition": {k: v.model_dump() for k, v in part.items()}, "not_measured": missing})
        else:
            print("\n".join(render_costs(costs, floors, part, missing)))
        return 0
    protection = not args.no_protection
    with bar(bench_steps(args.intercepts, protection, args.lifecycle, len(args.vps) if args.smp_calls else 0,
                         args.restores),
             "vtl bench", "steps",
             wanted(args.json)) as step:
        report = run_bench(args.calls, args.intercepts, protection, args.lifecycle, step,
                           smp_calls=args.smp_calls, vp_counts=args.vps, restores=args.restores)
    if args.json:
        _print_json(report.model_dump())
    else:
        print(render_bench(report))
    return 0


def cmd_kexec(args: argparse.Namespace) -> int:
    from vtl.core.images import default_kexec_image
    from vtl.core.trust import trust_list
    from vtl.tools.kexec import render, run_flow

    image = args.image or default_kexec_image()
    if not image.is_file():
        raise VmmError(f"--image {image}: no such file" + ("" if args.image else " (run `make guests`)"))
    if args.mode == "heki":
        from vtl.tools.lifecycle_compare import render_one, run_lifecycle

        lr = run_lifecycle(f"kexec-{args.flow}", "heki", args.vtl0_image, args.vtl1_image,
                           timeout=args.timeout, staged=image)
        if args.json:
            _print_json(lr.model_dump())
        else:
            print(render_one(lr))
        return 0 if lr.as_expected else 2
    rep = run_flow(args.flow, args.vtl0_image, args.vtl1_image, image, trusted=not args.untrusted,
                   extra_trust=trust_list(args.trust), backend=args.backend, timeout=args.timeout,
                   vps=args.vps)
    if args.json:
        _print_json(rep.model_dump())
    else:
        print(render(rep))
    return 0 if rep.passed else 2


def cmd_attack(args: argparse.Namespace) -> int:
    from vtl.tools.attack import render, run_all
    from vtl.tools.progress import bar, wanted

    show = wanted(args.json)
    if args.mode == "heki":
        from vtl.tools.heki_attack import render_heki, run_all_heki

        results = run_all_heki(args.vtl0_image, args.backend,
                               progress=lambda n: bar(n, "vtl attack --mode heki", "scenarios", show),
                               only=args.only, after_restore=args.after_restore)
        if args.json:
            _print_json([r.model_dump() for r in results])
        else:
            print(render_heki(results))
        # Exit 2 if any outcome is not the one Heki's design gives.
        return 0 if all(r.as_expected for r in results) else 2
    results = run_all(args.vtl0_image, args.vtl1_image, args.backend,
                      progress=lambda n: bar(n, "vtl attack", "scenarios", show), only=args.only,
                      vps=args.vps, after_restore=args.after_restore)
    if args.json:
        _print_json([r.model_dump() for r in results])
    else:
        print(render(results))
    # Exit 2 if anything got through or could not be judged.
    return 0 if all(r.outcome == "blocked" for r in results) else 2


def cmd_memmap(args: argparse.Namespace) -> int:
    from vtl.tools.memmap import build, render

    if args.mode == "heki":
        from vtl.core.config import PartitionConfig
        from vtl.tools.heki_memmap import heki_build

        mm = heki_build(PartitionConfig(vtl0_image=args.vtl0_image, scenario="harden",
                                        attr_backend=args.backend))
    else:
        mm = build(args.vtl0_image, args.vtl1_image, backend=args.backend, vps=args.vps)
    if args.png:
        from vtl.tools.memmap import draw_png
        draw_png(mm, args.png)
    if args.json:
        _print_json(mm.model_dump())
    else:
        print(render(mm))
        if args.png:
            print(f"picture: {args.png}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from vtl.tools.snapshot_info import describe, lines

    info = describe(args.dir)           # SnapshotError (one line, exit 1) if it is not whole
    if args.json:
        _print_json(info)
    else:
        print("\n".join(lines(info)))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from vtl.tools.compare import draw_png, render, run_compare
    from vtl.tools.progress import bar, wanted

    show = wanted(args.json)
    command = ("python3 -m vtl compare" + (f" --scenario {' '.join(args.only)}" if args.only else "")
               + (f" --ops {args.ops}" if args.ops != 1000 else "")
               + (f" --calls {args.calls}" if args.calls != 10_000 else ""))
    rep = run_compare(args.vtl0_image, args.vtl1_image, args.only, args.ops, args.calls,
                      progress=lambda n: bar(n, "vtl compare", "steps", show), command=command)
    if args.png:
        draw_png(rep, args.png)
    if args.json:
        _print_json({**rep.model_dump(), "summary": rep.summary()})
    else:
        print(render(rep))
        if args.png:
            print(f"picture: {args.png}")
    ok = all(r.vtl.as_expected and r.heki.as_expected for r in rep.scenarios)
    return 0 if ok else 2


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "scenarios": cmd_scenarios, "caps": cmd_caps,
            "bench": cmd_bench, "attack": cmd_attack, "memmap": cmd_memmap, "kexec": cmd_kexec,
            "snapshot": cmd_snapshot}


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"vtl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"vtl {args.command}: terminated", file=sys.stderr)
        return 143
    except RunInterrupted as e:
        print(f"vtl {args.command}: {e}", file=sys.stderr)
        return e.status
    except UnknownScenario as e:
        print(f"vtl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout went away (`vtl ... | head`): nothing more to say, and nowhere to say it.
        _silence_stdout()
        return STATUS_PIPE_CLOSED
    except (VmmError, ValueError, ValidationError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if isinstance(e, ValidationError) else str(e)
        print(f"vtl {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
