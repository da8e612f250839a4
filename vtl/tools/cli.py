"""`vtl`: launch dual-VTL guests on KVM, list scenarios, probe the host, benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from vmm.errors import VmmError

EPILOG = """\
exit status of `vtl run`: the guest's reported status (0 = pass); 3 when a guest
crashed (triple fault, emulation failure, halt); 124 on timeout; 1 for VMM or
configuration errors (bad image, no /dev/kvm).  Docs: README.md, docs/abi.md."""


def _mib(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of MiB") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("memory size must be positive")
    return value << 20


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("timeout must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    from vtl.images import default_vtl0_image, default_vtl1_image

    p = argparse.ArgumentParser(
        prog="vtl", description="Run a partition with one KVM VM per Virtual Trust Level (VTL0: "
        "the ordinary kernel; VTL1: a secure kernel that owns the policy) over one shared memory.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="boot VTL0 (which enables VTL1) and stream its console",
                       description="Boot the VTL0 image; it asks the VMM to enable VTL1, which is loaded, "
                       "measured (SHA-256) and started in its own KVM VM.  The console is streamed live; "
                       "a summary follows.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--vtl0-image", type=Path, default=default_vtl0_image(), metavar="ELF",
                   help="VTL0 kernel (default: %(default)s)")
    r.add_argument("--vtl1-image", type=Path, default=default_vtl1_image(), metavar="ELF",
                   help="VTL1 secure kernel (default: %(default)s)")
    r.add_argument("--no-vtl1", action="store_true",
                   help="run without VTL1: the guest's enable request gets VTL_E_DISABLED")
    r.add_argument("--scenario", default="", metavar="NAME",
                   help="scenario built into the VTL0 image (see `vtl scenarios`; default: boot)")
    r.add_argument("--param", type=int, default=0, metavar="N",
                   help="scenario parameter, e.g. iterations for bench-null-call")
    r.add_argument("--events", type=Path, metavar="FILE",
                   help="write every event (VTL calls/returns, refusals, faults, exit) as JSON lines")
    r.add_argument("--json", action="store_true",
                   help="print the summary as one JSON object on stdout (console goes to stderr)")
    r.add_argument("--timeout", type=_positive_float, default=30.0, metavar="S",
                   help="stop the guest after S seconds (default: %(default)s)")
    r.add_argument("--mem", type=_mib, default=256 << 20, metavar="MiB",
                   help="guest memory in MiB (default: 256)")
    r.add_argument("--quiet", action="store_true", help="do not stream the guest console")

    s = sub.add_parser("scenarios", help="list the scenarios built into a VTL0 image")
    s.add_argument("--vtl0-image", type=Path, default=default_vtl0_image(), metavar="ELF")
    s.add_argument("--json", action="store_true")

    c = sub.add_parser("caps", help="which KVM mechanisms this host has, and what the project uses")
    c.add_argument("--json", action="store_true")

    a = sub.add_parser("attack", help="run every attack scenario in a fresh partition; what was blocked, how",
                       description="Each attack scenario of the built-in VTL0 runs in a fresh, hardened "
                       "partition.  The outcome is observed (guest verdict, the VMM's own check of the "
                       "target memory, intercepts/verdicts/refusals on the event stream): blocked, "
                       "detected after the fact, not enforced on this host, or succeeded.")
    a.add_argument("--vtl0-image", type=Path, default=default_vtl0_image(), metavar="ELF")
    a.add_argument("--vtl1-image", type=Path, default=default_vtl1_image(), metavar="ELF")
    a.add_argument("--json", action="store_true")

    m = sub.add_parser("memmap", help="VTL0's and VTL1's attribute map after a hardened boot",
                       description="Boot with the `harden` scenario (VTL1 sets attributes per section, "
                       "locks VTL0's page tables, ends boot) and show the attribute map of each VTL.")
    m.add_argument("--vtl0-image", type=Path, default=default_vtl0_image(), metavar="ELF")
    m.add_argument("--vtl1-image", type=Path, default=default_vtl1_image(), metavar="ELF")
    m.add_argument("--png", type=Path, metavar="FILE",
                   help="also draw the first 32 MiB, one 4x4 square per page, 128 pages a row")
    m.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="VTL round-trip cost against floors measured in the same run")
    b.add_argument("--calls", type=int, default=100_000, metavar="N",
                   help="null VTL calls to time (default: %(default)s; at least 100)")
    b.add_argument("--intercepts", type=int, default=2000, metavar="N",
                   help="allowed secure intercepts to time (default: %(default)s; 0 skips)")
    b.add_argument("--no-protection", action="store_true",
                   help="skip the cost of protecting 1k/16k/64k pages (about a minute on this host)")
    b.add_argument("--json", action="store_true")
    return p


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    from vtl import control
    from vtl.events import EventLog
    from vtl.partition import Partition, PartitionConfig
    from vtl.summary import run_summary_lines

    out = sys.stderr if args.json else sys.stdout

    def console(line: str) -> None:
        if not args.quiet:
            out.write(line + "\n")
            out.flush()

    config = PartitionConfig(vtl0_image=args.vtl0_image,
                             vtl1_image=None if args.no_vtl1 else args.vtl1_image,
                             mem_size=args.mem, scenario=args.scenario, param=args.param)
    events = EventLog(args.events)
    try:
        with Partition(config, events) as partition:
            _check_scenario(partition, args.scenario)
            result, sched = control.run(partition, console, args.timeout)
    finally:
        events.close()
    if args.json:
        doc = result.model_dump(exclude={"bench_stamps"})
        doc.update(scenario=args.scenario or "boot", console=sched.console_lines,
                   events=len(events.events))
        _print_json(doc)
    else:
        out.write("\n".join(run_summary_lines(result, args.scenario or "boot", config)) + "\n")
    return result.status & 0xFF


def _check_scenario(partition: Any, name: str) -> None:
    from vtl.images import scenarios

    known = scenarios(partition.vtl0_image)
    if name and known and name not in {s.name for s in known}:
        raise VmmError(f"scenario {name!r} is not in {partition.vtl0_image.path}; "
                       f"it has: {', '.join(s.name for s in known)}")


def cmd_scenarios(args: argparse.Namespace) -> int:
    from vmm.elf import read_image
    from vtl.images import scenarios

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
    from vtl.caps import probe_caps, render_caps

    caps = probe_caps()
    if args.json:
        _print_json(caps.model_dump())
    else:
        print(render_caps(caps))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from vtl.bench import render_bench, run_bench

    if args.calls < 100:
        raise VmmError("--calls must be at least 100")
    report = run_bench(args.calls, args.intercepts, not args.no_protection)
    if args.json:
        _print_json(report.model_dump())
    else:
        print(render_bench(report))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from vtl.attack import render, run_all

    results = run_all(args.vtl0_image, args.vtl1_image)
    if args.json:
        _print_json([r.model_dump() for r in results])
    else:
        print(render(results))
    return 0 if all(r.outcome == "blocked" for r in results) else 2


def cmd_memmap(args: argparse.Namespace) -> int:
    from vtl.memmap import build, render

    mm, png = build(args.vtl0_image, args.vtl1_image)
    if args.png:
        args.png.write_bytes(png)
    if args.json:
        _print_json(mm.model_dump())
    else:
        print(render(mm))
        if args.png:
            print(f"picture: {args.png}")
    return 0


COMMANDS = {"run": cmd_run, "scenarios": cmd_scenarios, "caps": cmd_caps, "bench": cmd_bench,
            "attack": cmd_attack, "memmap": cmd_memmap}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (VmmError, ValueError, ValidationError, OSError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if isinstance(e, ValidationError) else str(e)
        print(f"vtl {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
