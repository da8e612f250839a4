"""The VP scheduler: runs the current vCPU of each VP and switches VTLs.

This is the only place that changes a VP's state (`_transition`) and so decides which
vCPU of a VP runs next.  Services handle exits and return outcomes; the scheduler
applies them.  A switch moves the shared state of design §4 through the synced
registers in kvm_run (KVM_CAP_SYNC_REGS), so it adds no ioctl:

  shared:  RAX RBX RCX RDX RSI RDI RBP R8-R15, CR2
  private: RSP RIP RFLAGS, CR0/CR3/CR4, EFER, segments, GDTR/IDTR (each vCPU's own)
  not moved: FPU/XMM (the guests are built without them; see docs/abi.md)
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmm import exits as ex
from vmm import uapi as u
from vmm.errors import VmmError
from vmm.kvm import VCpu
from vmm.uapi import ffi, libc
from vmm.x86 import VEC_GP, VEC_UD
from vtl.abi import ABI
from vtl.core import layout as lay
from vtl.core.events import GuestExit, Lifecycle, SingleStepped, VpStarted, VtlCall, VtlReturn
from vtl.core.partition import Partition
from vtl.core.vp import (
    IN_VTL1_CALL,
    IN_VTL1_ENABLE,
    OFFLINE,
    RUNNING_VTL0,
    Entry,
    RestartRequest,
    SyncView,
    VirtualProcessor,
    VpState,
    stopped,
)
from vtl.core.vtl import Vtl
from vtl.lifecycle import snapfile
from vtl.lifecycle.enable import enable_vtl1
from vtl.lifecycle.protections import protections, record_step
from vtl.lifecycle.reset import reset_partition
from vtl.lifecycle.restart import restart_vtl0
from vtl.lifecycle.snapshot import partition_state
from vtl.lifecycle.teardown import teardown_vtl1
from vtl.run import fastpath
from vtl.run.exits import ExitDispatcher
from vtl.run.fastpath import FastPath
from vtl.run.result import VTL1_HISTORY_MAX, RunResult, VpSummary
from vtl.run.runner import Kind, Request, RunState, VpRunner
from vtl.run.step import SingleStepper
from vtl.services.console import Console
from vtl.services.hypercalls import Hypercalls
from vtl.services.intercepts import Intercepts
from vtl.services.outcomes import (
    STATUS_STOPPED,
    STATUS_VMM_ERROR,
    EnableVtl1,
    Enter,
    Halt,
    Outcome,
    ReadVpRegister,
    Reset,
    SaveSnapshot,
    SendIpi,
    StartVp,
    Step,
    Stop,
    WithOthersPaused,
)
from vtl.services.privileged import PrivilegedSection
from vtl.services.protection import Vtl0Protection
from vtl.services.refusals import Refusals
from vtl.services.registers import Registers
from vtl.services.reports import Reports
from vtl.services.vtl0view import Vtl0View

PORT_NAMES = {ABI.VTL_PORT_CONSOLE: "console", ABI.VTL_PORT_CALL: "vtl_call",
              ABI.VTL_PORT_RETURN: "vtl_return", ABI.VTL_PORT_RETURN_FAST: "vtl_return_fast",
              ABI.VTL_PORT_HYPERCALL: "hypercall", ABI.VTL_PORT_EXIT: "exit"}

# VTL calls that are lifecycle steps: each becomes a Lifecycle event with the protections
# and pins before and after it (vtl kexec's timeline).
LIFECYCLE_CALLS = {ABI.VTL_CALL_KEXEC_VALIDATE: "kexec_validate", ABI.VTL_CALL_KEXEC_JUMP: "kexec_jump",
                   ABI.VTL_CALL_KEXEC_UNLOAD: "kexec_unload", ABI.VTL_CALL_MODULE_VALIDATE: "module_validate",
                   ABI.VTL_CALL_MODULE_LOAD: "module_load", ABI.VTL_CALL_MODULE_UNLOAD: "module_unload",
                   ABI.VTL_CALL_LOCK_PAGE_TABLES: "lock_page_tables", ABI.VTL_CALL_END_OF_BOOT: "end_of_boot"}

STATUS_NAMES = {**ABI.names("VTL_E_"), ABI.VTL_OK: "VTL_OK"}
EXIT_IO, IO_OUT = u.KVM_EXIT_IO, u.KVM_EXIT_IO_OUT
SYNC_REGS, SYNC_SREGS = u.KVM_SYNC_X86_REGS, u.KVM_SYNC_X86_SREGS
VTL_ENTRY_CALL = ABI.VTL_ENTRY_CALL
PORT_RETURN_FAST = ABI.VTL_PORT_RETURN_FAST
PORT_CALL, PORT_RETURN = ABI.VTL_PORT_CALL, ABI.VTL_PORT_RETURN
LIFECYCLE_CODES = frozenset(LIFECYCLE_CALLS)
USER_PAUSE = "user"             # the payload of pause_all's requests (a flow's pause has none)
VTL0, VTL1 = Vtl.VTL0, Vtl.VTL1
memmove = ffi._backend.memmove   # skips cffi's Python-level wrapper on the switch path

IoHandler = Callable[[VirtualProcessor, VCpu], Outcome]
# Where a snapshot can be asked for (SnapshotJob.by): the guest (VTL_HC_SNAPSHOT), the
# trigger `vtl run --snapshot-at hardened`, the control socket.
SNAPSHOT_TRIGGERS = ("hardened", "kexec", "vtl1")


@dataclass(frozen=True)
class SnapshotJob:
    path: Path
    by: str                     # guest | hardened | user


class SnapshotRefused(Exception):
    """A snapshot that cannot be taken now (the reason is one line); the run goes on.
    `busy`: it could be taken a moment later (the guest is told VTL_E_BUSY)."""

    def __init__(self, why: str, busy: bool = False) -> None:
        super().__init__(why)
        self.busy = busy


class Scheduler:
    # Subclasses (modes) whose VTL calls and returns the C path does not know turn it off.
    use_fastpath = True

    def __init__(self, partition: Partition, console: Console | None = None, fastpath: bool = True) -> None:
        self.p = partition
        self.use_fastpath = self.use_fastpath and fastpath
        self.events = partition.events
        self.console = console or Console(len(partition.vps))
        self.view = Vtl0View(partition)
        self.refusals = Refusals(partition.mem, partition.layout, self.events, self.view.readable)
        self.reports = Reports(partition, self.events)
        self.protection = Vtl0Protection(partition)
        self.intercepts = Intercepts(partition, self.events, self.refusals, Registers(partition), self.view)
        self.privileged = PrivilegedSection(partition, self.events, self.intercepts)
        self.hypercalls = Hypercalls(partition, self.events, self.refusals, self.reports, self.protection,
                                     self.privileged)
        self.exits = ExitDispatcher(partition, self.refusals, self.intercepts, self.privileged)
        self.stepper = SingleStepper(partition)
        # One runner per VP (vtl/run/runner.py): its thread, its request queue.
        self.runners = [VpRunner(vp) for vp in partition.vps]
        self._stop_request: Stop | None = None
        self.user_paused = False                       # pause_all without resume_all since
        # The stop that ended the run, and the VP it came from (the others follow it).
        self._final: tuple[int, Stop] | None = None
        # Held by a VP that changes VM-wide state (a lifecycle flow, a single step) while
        # it has every other VP paused; never held across a wait for this VP's own queue.
        self._exclusive = threading.Lock()
        # Counts the flows that replace vCPUs or VMs (reset, kexec): a VP paused in the
        # middle of an outcome finds out that the world it was acting on is gone.
        self._generation = 0
        self.resets = 0
        self.kexecs = 0
        self.vtl1_history: list[str] = []              # RunResult.vtl1_history
        self.vtl1_history_omitted = 0
        # Lifecycle VTL calls in flight per VP: (step, protection record before, start time).
        self._steps: dict[int, tuple[str, dict[str, Any], float]] = {}
        # Kicks (any thread) touch vCPUs' kvm_run; flows that close or create vCPUs hold it.
        self._lock = threading.RLock()
        self._t0 = 0.0
        # Snapshots (docs/snapshot.md): where the guest's VTL_HC_SNAPSHOT and the trigger
        # save, the trigger, what each save wrote, and the snapshot this run came from.
        self.snapshot_dir: Path | None = None
        self.snapshot_at: str | None = None
        self.snapshots: list[dict[str, Any]] = []
        # The run ends at the trigger's save (`vtl attack --after-restore`): every VP stops
        # before its next KVM_RUN, so nothing of the guest runs after the instant saved.
        self.snapshot_stop = False
        # Why the trigger's save was refused (the run then goes on), None if it was not.
        self.snapshot_refused: str | None = None
        self._guest_snapshot_taken = False
        self._trigger_fired = False
        self.restored_from: dict[str, Any] | None = None
        self._trace = self.events.trace                # per-call events only when someone listens
        self._io: dict[int, IoHandler] = {
            ABI.VTL_PORT_CONSOLE: self._on_console,
            ABI.VTL_PORT_CALL: self._on_vtl_call,
            ABI.VTL_PORT_RETURN: self._on_vtl_return,
            ABI.VTL_PORT_RETURN_FAST: self._on_vtl_return,
            ABI.VTL_PORT_HYPERCALL: self.hypercalls.handle,
            ABI.VTL_PORT_EXIT: self._on_exit_port,
        }

    # --- the one transition ------------------------------------------------------------
    def _transition(self, vp: VirtualProcessor, state: VpState) -> None:
        vp.state = state
        vtl = state.vtl
        vp.current = vp.vcpus[vtl] if vtl is not None else None

    # --- the loop ------------------------------------------------------------------
    def run(self) -> RunResult:
        """Run every VP, each on its own thread (VP0 on this one), until the run ends: a
        VP's stop (its guest's exit status, a crash, VTL1's stop verdict) stops the others;
        a stop requested from outside (request_stop) stops them all."""
        self._t0 = time.perf_counter()
        threads = [threading.Thread(target=self._vp_thread, args=(r,), name=f"vp{r.vp.index}", daemon=True)
                   for r in self.runners[1:]]
        for t in threads:
            t.start()
        try:
            self._vp_thread(self.runners[0])
        finally:
            for t in threads:
                t.join()
            self.console.flush()
        return self._result()

    def _vp_thread(self, runner: VpRunner) -> None:
        vp = runner.vp
        runner.ident = threading.get_ident()
        runner.native_id = threading.get_native_id()
        try:
            self._vp_loop(runner)
        except Exception as e:    # a VMM bug or host failure ends the run, never the process
            self._finish(vp, Stop(STATUS_VMM_ERROR, "vmm_error", _describe(e)))
        finally:
            runner.set_state(RunState.EXITED)

    def _vp_loop(self, runner: VpRunner) -> None:
        vp = runner.vp
        self._transition(vp, vp.state)
        if runner.resume_halted:                    # restored from a snapshot while halted
            runner.resume_halted = False
            assert vp.current is not None
            self._halt(vp, int(vp.current.regs.rip))
        ioctl, kvm_run, null = libc.ioctl, u.KVM_RUN, ffi.NULL
        handlers = self._io
        port_counts = vp.port_counts
        requests = runner.requests
        # The C switch path (vtl/run/fastpath.c): VTL calls and returns without the GIL.
        fast = FastPath(LIFECYCLE_CODES) if fastpath.AVAILABLE and self.use_fastpath else None
        f = fast.f if fast is not None else None
        fast_run = fast.run_fn if fast is not None else None
        while True:
            if requests:
                self._serve(runner)
            vcpu = vp.current
            if vcpu is None:
                if vp.state is not OFFLINE:
                    return                              # stopped
                runner.set_state(RunState.OFFLINE)
                self._handle(runner, runner.wait())     # an AP waits to be started
                continue
            state = vp.state
            if (f is not None and not self._trace and (state is RUNNING_VTL0 or state is IN_VTL1_CALL)
                    and fast.bind(vp)):  # type: ignore[union-attr]
                f.cur = state is IN_VTL1_CALL
                f.returns_ok = vp.restart is None and vp.index not in self._steps
                rc = fast_run(f)  # type: ignore[misc]
                if f.calls or f.returns:
                    self._fast_counted(vp, f)
                    self._transition(vp, IN_VTL1_CALL if f.cur else RUNNING_VTL0)
                    vcpu = vp.current
                    assert vcpu is not None
                err = f.err
            else:
                rc = ioctl(vcpu.fd, kvm_run, null)
                err = ffi.errno if rc < 0 else 0
            if rc < 0:
                outcome = self._run_failed(vp, vcpu, err)
            else:
                words = vcpu.words
                if words[2] == EXIT_IO:
                    io = words[8]                       # direction | size << 8 | port << 16
                    port = io >> 16
                    port_counts[port] += 1
                    handler = handlers.get(port)
                    if handler is not None and io & 0xFF == IO_OUT:
                        outcome = handler(vp, vcpu)
                    else:
                        outcome = self._unknown_port(vp, vcpu)
                else:
                    outcome = self._other_exit(vp, vcpu)
            if outcome is not None:
                self._apply(vp, outcome)

    @staticmethod
    def _fast_counted(vp: VirtualProcessor, f: Any) -> None:
        """What the C path did, in the VP's counters as the Python path counts it."""
        calls, returns, fast = f.calls, f.returns, f.fast_returns
        vp.fast_switches += calls + returns
        vp.vtl_calls += calls
        vp.vtl_returns += returns
        pc = vp.port_counts
        pc[PORT_CALL] += calls
        pc[PORT_RETURN] += returns - fast
        pc[PORT_RETURN_FAST] += fast

    # --- requests to a VP (vtl/run/runner.py), served on its own thread ---------------------
    def _serve(self, runner: VpRunner) -> None:
        while (req := runner.take()) is not None:
            self._handle(runner, req)

    def _handle(self, runner: VpRunner, req: Request) -> None:
        vp = runner.vp
        match req.kind:
            case Kind.PAUSE:
                self._paused(runner, req)
            case Kind.RESUME:
                req.ack(False)                          # not paused: nothing to resume
            case Kind.STOP:
                self._finish(vp, req.payload)
                req.ack(True)
            case Kind.RESET:
                if vp.state.name == "stopped":
                    req.ack(False)
                else:
                    self._apply(vp, req.payload)
                    req.ack(True)
            case Kind.START:
                self._start_vp(vp, req.payload)
                req.ack(True)
            case Kind.WAKE:
                runner.pending_wake = True              # not halted: the next HLT ends at once
                req.ack(False)
            case Kind.SNAPSHOT:
                self._serve_snapshot(runner, req)

    def _paused(self, runner: VpRunner, req: Request) -> None:
        """Acknowledge a pause and wait until resumed.  Two kinds nest: a flow's (another
        VP changing VM-wide state: a stop or reset that arrives meanwhile waits in the
        queue, since the pauser must find every VP where it left it) and the user's
        (pause_all: a stop is served at once, anything else waits for the resume)."""
        before = runner.state
        runner.paused_from = before
        runner.set_state(RunState.PAUSED)
        depth = {False: 0, True: 0}             # by "is the user's"
        depth[req.payload == USER_PAUSE] += 1
        req.ack(True)
        held: list[Request] = []
        while depth[False] or depth[True]:
            r = runner.wait()
            user = r.payload == USER_PAUSE
            if r.kind is Kind.PAUSE:
                depth[user] += 1
                r.ack(True)
            elif r.kind is Kind.RESUME:
                if depth[user]:
                    depth[user] -= 1
                r.ack(True)
            elif r.kind is Kind.STOP and not depth[False]:
                self._finish(runner.vp, r.payload)
                r.ack(True)
                break
            elif r.kind is Kind.SNAPSHOT and not depth[False]:
                self._serve_snapshot(runner, r)         # saving changes nothing a pause holds
                if runner.vp.state.name == "stopped":
                    break                               # the run ended at its save (snapshot_stop)
            else:
                held.append(r)
        runner.put_back(held)
        runner.paused_from = None
        if runner.vp.state.name != "stopped":
            runner.set_state(before)

    def pause_all(self) -> list[Request]:
        """Pause every VP (any thread; QMP's `stop`): each acknowledges once it is out of
        KVM_RUN at a point where no switch, intercept or step is half done (the top of its
        loop, or idle).  Wait on the requests' `done`.  A stop still ends a paused run."""
        self.user_paused = True
        with self._lock:
            return [r.post(Kind.PAUSE, USER_PAUSE) for r in self.runners]

    def resume_all(self) -> list[Request]:
        """Resume what pause_all paused (any thread; QMP's `cont`)."""
        self.user_paused = False
        with self._lock:
            return [r.post(Kind.RESUME, USER_PAUSE) for r in self.runners]

    @contextmanager
    def _others_paused(self, vp: VirtualProcessor, only: int | None = None) -> Iterator[bool]:
        """Every other VP paused (out of KVM_RUN, acknowledged) for the body: what changes
        VM-wide state (a mapping, a VM, every VP's vCPU) does it inside this.  Yields False
        when, while this VP waited its turn, another VP's flow replaced the vCPUs (a reset,
        a kexec): the outcome this VP was applying is void, and the body must not act.
        `only`: pause just that VP (reading its registers)."""
        if len(self.runners) == 1:
            yield True
            return
        me = self.runners[vp.index]
        generation, vcpu = self._generation, vp.current
        # Another VP holding it may be waiting for this one to acknowledge its pause.
        while not self._exclusive.acquire(timeout=0.001):
            self._serve_pauses(me)
        others = [r for r in self.runners if r is not me and (only is None or r.vp.index == only)]
        try:
            if generation != self._generation or vp.current is not vcpu:
                yield False
                return
            for req in [r.post(Kind.PAUSE) for r in others]:
                req.done.wait()
            yield True
        finally:
            for r in others:
                r.post(Kind.RESUME)
            self._exclusive.release()

    def _serve_pauses(self, runner: VpRunner) -> None:
        """Serve the pause requests in this VP's queue, leaving every other request in
        its place (this VP is in the middle of an outcome)."""
        for r in runner.take_all(Kind.PAUSE):
            self._paused(runner, r)

    def kick_all(self) -> None:
        """Interrupt every VP's KVM_RUN in progress (the control plane re-kicks until the
        run has ended)."""
        with self._lock:
            for r in self.runners:
                r.kick()

    def request_stop(self, status: int, reason: str, message: str) -> None:
        """Ask every VP to stop (any thread); each stops at its next request check, which a
        kick makes immediate.  The caller re-kicks (kick_all) until the run has ended."""
        stop = Stop(status, reason, message)
        self._stop_request = stop
        with self._lock:
            for r in self.runners:
                r.post(Kind.STOP, stop)

    def request_reset(self, by: str = "user") -> Request:
        """Ask for an emulated RESET (any thread); the boot VP carries it out.  Returns
        the request (its `done` is set once the reset is done or refused)."""
        with self._lock:
            return self.runners[0].post(Kind.RESET, Reset(by, "requested"))

    def _apply(self, vp: VirtualProcessor, outcome: Outcome) -> None:
        # A step's exit may ask for another step (an instruction that jumps to another page
        # of the section): a loop, not recursion.
        while isinstance(outcome, Step):
            outcome = self._single_step(vp, outcome)
        match outcome:
            case Enter(state):
                self._transition(vp, state)
            case EnableVtl1():
                with self._others_paused(vp) as current:
                    if not current:
                        return
                    self._vtl1_event("enabled again" if self.vtl1_history else "enabled")
                    with self._lock:
                        record_step(self.p, "vtl1_enable", "vtl0", lambda: enable_vtl1(self.p, vp),
                                    vp=vp.index, detail="VTL_HC_ENABLE_VTL1: VTL1's VM built, image "
                                    "loaded and measured")
                self._transition(vp, IN_VTL1_ENABLE)
            case Reset(by, detail):
                with self._others_paused(vp) as current:
                    if not current:
                        return
                    if self.p.vtl1_enabled:
                        self._vtl1_event(f"torn down by a RESET ({by})")
                    with self._lock:
                        record_step(self.p, "reset", by, lambda: reset_partition(self.p), vp=vp.index,
                                    detail=detail or "emulated RESET")
                    self._generation += 1
                    self.resets += 1
                    self._steps.clear()
                    self._reboot_states()
            case StartVp() as start:
                self._post_start(vp, start)
            case SendIpi(target):
                self.runners[target].post(Kind.WAKE)
                self._set_status(vp, ABI.VTL_OK)
            case Halt(rip):
                self._halt(vp, rip)
            case SaveSnapshot():
                self._guest_snapshot(vp)
            case WithOthersPaused(action):
                with self._others_paused(vp) as current:
                    if current:
                        action()
            case ReadVpRegister(index, reg):
                vcpu = vp.current
                assert vcpu is not None
                with self._others_paused(vp, only=index) as current:
                    if current:
                        reply = self.hypercalls.vp_register_reply(vp, vcpu, index, reg)
                        self.hypercalls.answer(vp, vcpu, ABI.VTL_HC_GET_VP_REGISTER, reply)
            case Stop():
                self._finish(vp, outcome)

    def _post_start(self, vp: VirtualProcessor, start: StartVp) -> None:
        """VTL_HC_START_VP, validated: claim the AP and queue its start (the AP's own
        thread starts it); the caller's hypercall returns at once, as a SIPI does."""
        vcpu = vp.current
        assert vcpu is not None
        target = self.runners[start.vp_index]
        if not target.claim_start():
            self.refusals.status(vp, vcpu, f"hypercall {ABI.VTL_HC_START_VP:#x}",
                                 f"VP{start.vp_index} is already started", ABI.VTL_E_BUSY)
            return
        self._set_status(vp, ABI.VTL_OK)
        target.post(Kind.START, start)

    def _set_status(self, vp: VirtualProcessor, status: int) -> None:
        vcpu = vp.current
        assert vcpu is not None
        vcpu.regs.rax = status
        vcpu.run.kvm_dirty_regs |= SYNC_REGS

    def _halt(self, vp: VirtualProcessor, rip: int) -> None:
        """VTL0 halted (one VP of several): idle until a wake.  If every other VP idles too
        with nothing queued, nothing can wake any of them: the run ends as "halted"."""
        me = self.runners[vp.index]
        if me.pending_wake:                 # a wake came while it ran: this HLT ends at once
            me.pending_wake = False
            return
        with self._lock:
            others_idle = all(r.idle_with_nothing_queued() for r in self.runners if r is not me)
            if others_idle and not me.requests:
                self._finish(vp, self.exits.crash(vp, "halted", f"every VP halted (VP{vp.index} at RIP "
                                                  f"{rip:#x}) without reporting an exit status", rip))
                return
            me.set_state(RunState.HALTED)
        generation = self._generation
        while True:
            req = me.wait()
            if req.kind is Kind.WAKE:
                req.ack(True)
                break
            self._handle(me, req)
            # Stopped, or another VP's reset or kexec put this VP somewhere else.
            if vp.state.name == "stopped" or generation != self._generation:
                break
        me.pending_wake = False
        me.set_state(RunState.RUNNING)

    def _start_vp(self, vp: VirtualProcessor, start: StartVp) -> None:
        """On the AP's thread: its VTL0 vCPU at the start context; VTL1 (when enabled)
        initialises on this VP first, and its first VTL return lets VTL0 run."""
        if vp.state is not OFFLINE:
            return
        vcpu = vp.vcpus[VTL0]
        assert vcpu is not None
        lay.start_vcpu(vcpu, self.p.layout, VTL0, cr3=start.cr3, rip=start.rip, rsp=start.rsp, arg=start.arg)
        vp.starts += 1
        self.events.emit(VpStarted(ts=self.events.now(), vp=vp.index, vtl=0, rip=start.rip, rsp=start.rsp,
                                   cr3=start.cr3, vtl1=self.p.vtl1_enabled))
        if vp.ctl is not None:
            # Its VTL1 first, with entry reason NONE: at its entry point after the enable,
            # or where it last returned when it was up already (VTL1 kept across a kexec).
            vp.ctl.entry_reason = ABI.VTL_ENTRY_NONE
        self._transition(vp, IN_VTL1_ENABLE if vp.vcpus[VTL1] is not None else RUNNING_VTL0)
        self.runners[vp.index].set_state(RunState.RUNNING)

    def _reboot_states(self) -> None:
        """After a RESET or a kexec (every other VP paused): the boot VP runs VTL0 from the
        new kernel's entry, the APs wait offline until that kernel starts them."""
        for each, runner in zip(self.p.vps, self.runners, strict=True):
            if each.state.name != "stopped":
                self._transition(each, RUNNING_VTL0 if each.index == 0 else OFFLINE)
                runner.unclaim()

    def _vtl1_event(self, what: str) -> None:
        if len(self.vtl1_history) < VTL1_HISTORY_MAX:
            self.vtl1_history.append(what)
        else:
            self.vtl1_history_omitted += 1

    # --- lifecycle VTL calls (timeline steps; rare, so off the switch path's budget) ---------
    def _step_begin(self, vp: VirtualProcessor, code: int) -> None:
        self._steps[vp.index] = (LIFECYCLE_CALLS[code], protections(self.p), time.perf_counter())

    def _step_end(self, vp: VirtualProcessor, status: int | None, detail: str = "") -> None:
        step = self._steps.pop(vp.index, None)
        if step is None:
            return
        name, before, t0 = step
        dt = (time.perf_counter() - t0) * 1e6
        if name == "kexec_jump" and status not in (None, ABI.VTL_OK):
            self._vtl1_event(f"kexec refused: {STATUS_NAMES.get(status, hex(status or 0))}"
                             f"{self._vtl1_reason('kexec_jump', status)}")
        self.events.emit(Lifecycle(ts=self.events.now(), vp=vp.index, vtl=0, step=name, by="vtl0",
                                   status=status, detail=detail, duration_us=round(dt, 1),
                                   before=before, after=protections(self.p)))
        if name == "end_of_boot" and status == ABI.VTL_OK:
            self._hardened(vp)

    def _kexec(self, vp: VirtualProcessor, req: RestartRequest) -> None:
        """VTL1 asked for VTL0's restart at a new kernel while serving KEXEC_JUMP."""
        self._step_end(vp, ABI.VTL_OK, f"VTL1 asked for VTL0's restart at {req.entry:#x}"
                       f"{' after its teardown' if req.teardown else ''}")
        with self._lock:
            if req.teardown:
                record_step(self.p, "vtl1_teardown", "vmm", lambda: teardown_vtl1(self.p), vp=vp.index,
                            vtl=1, detail="VTL1's VM destroyed, protections and pins cleared, "
                            "VTL1's memory zeroed")
            record_step(self.p, "vtl0_restart", "vmm",
                        lambda: restart_vtl0(self.p, replace(req, teardown=False)), vp=vp.index,
                        detail=f"VTL0 starts at {req.entry:#x} (scenario {req.scenario!r})")
        self._generation += 1
        self.kexecs += 1
        self._steps.clear()     # the other VPs' calls in flight are void: they are offline now
        self._vtl1_event("torn down at a kexec (teardown)" if req.teardown
                         else "kept across a kexec (persist)")

    # --- snapshots (docs/snapshot.md; the format: vtl/lifecycle/snapfile.py) -------------
    def request_snapshot(self, path: Path, by: str = "user") -> Request:
        """Ask for a snapshot at `path` (any thread; the control socket's vtl-snapshot-save).
        The boot VP saves it at the top of its loop, paused or not; the request's result is
        the save's record (a dict) or a SnapshotRefused."""
        with self._lock:
            return self.runners[0].post(Kind.SNAPSHOT, SnapshotJob(Path(path), by))

    def _serve_snapshot(self, runner: VpRunner, req: Request) -> None:
        try:
            req.ack(self._save(runner.vp, req.payload))
        except SnapshotRefused as e:
            if req.payload.by in SNAPSHOT_TRIGGERS:
                self.snapshot_refused = str(e)      # nobody waits on the trigger's request
            req.ack(e)

    def _hardened(self, vp: VirtualProcessor) -> None:
        """The guest's hardening has ended (END_OF_BOOT; a mode says when for itself): the
        `--snapshot-at` trigger saves at the top of this VP's loop, once: `hardened` at the
        first kernel's, `kexec` at the first one a kexec started."""
        if self.snapshot_at == "hardened" or (self.snapshot_at == "kexec" and self.kexecs > 0):
            self._trigger(vp)

    def _trigger(self, vp: VirtualProcessor) -> None:
        """The --snapshot-at point is here: save at the top of this VP's loop, once."""
        if self.snapshot_dir is not None and not self._trigger_fired:
            self._trigger_fired = True
            job = SnapshotJob(self.snapshot_dir, self.snapshot_at or "hardened")
            self.runners[vp.index].post(Kind.SNAPSHOT, job)

    def _guest_snapshot(self, vp: VirtualProcessor) -> None:
        """VTL_HC_SNAPSHOT (vtl_abi.h): the saved VTL0 sees RDX = 1 when restored, this one 0."""
        vcpu = vp.current
        assert vcpu is not None
        if self.snapshot_dir is None:
            self.refusals.status(vp, vcpu, f"hypercall {ABI.VTL_HC_SNAPSHOT:#x}",
                                 "no snapshot directory (vtl run --snapshot DIR)", ABI.VTL_E_DISABLED)
            return
        if self._guest_snapshot_taken:
            self.refusals.status(vp, vcpu, f"hypercall {ABI.VTL_HC_SNAPSHOT:#x}",
                                 "this run's snapshot is taken already", ABI.VTL_E_BUSY)
            return
        regs = vcpu.regs
        regs.rax, regs.rdx = ABI.VTL_OK, 1
        vcpu.run.kvm_dirty_regs |= SYNC_REGS
        try:
            self._save(vp, SnapshotJob(self.snapshot_dir, "guest"))
            self._guest_snapshot_taken = True
            status = ABI.VTL_OK
        except SnapshotRefused as e:
            status = ABI.VTL_E_BUSY if e.busy else ABI.VTL_E_NO_RESOURCES
            self.refusals.status(vp, vcpu, f"hypercall {ABI.VTL_HC_SNAPSHOT:#x}", str(e), status)
        vcpu = vp.current            # the same vCPU (a save replaces nothing); its synced copy is fresh
        assert vcpu is not None
        vcpu.regs.rax, vcpu.regs.rdx = status, 0
        vcpu.run.kvm_dirty_regs |= SYNC_REGS

    def _check_quiescent(self) -> None:
        """Refuse the save unless every VP is where a snapshot can hold it (every other VP
        is paused)."""
        for vp, r in zip(self.p.vps, self.runners, strict=True):
            if vp.state.name == "stopped":
                raise SnapshotRefused("the run has ended")
            if vp.state.entry is Entry.INTERCEPT:
                raise SnapshotRefused(f"busy: VP{vp.index}'s VTL1 is judging an intercept", busy=True)
            if vp.state is OFFLINE and r.claimed:
                raise SnapshotRefused(f"busy: VP{vp.index} is being started", busy=True)

    def _save(self, vp: VirtualProcessor, job: SnapshotJob) -> dict[str, Any]:
        """Save the partition and the run to `job.path` with every other VP paused."""
        t0 = time.perf_counter()
        with self._others_paused(vp) as current:
            if not current:
                raise SnapshotRefused("busy: the partition was reset meanwhile", busy=True)
            self._check_quiescent()
            try:
                with self._lock:            # vCPUs are flushed and read: no kick meanwhile
                    part = partition_state(self.p, self.policy_extra())
                state = {"partition": part, "run": self.run_state()}
                # Still with every other VP paused (memory must not change while written),
                # but no longer holding off kicks.
                manifest = snapfile.write(job.path, state, self.p.mem)
            except VmmError as e:
                raise SnapshotRefused(str(e)) from None
            dt = (time.perf_counter() - t0) * 1e6
            record = {"path": str(job.path), "by": job.by, "vp": vp.index,
                      "policy_digest": part["protections"]["policy_digest"],
                      "memory_sha256": manifest["files"][snapfile.MEMORY]["sha256"],
                      "duration_us": round(dt, 1)}
            self.snapshots.append(record)
            self.events.emit(Lifecycle(ts=self.events.now(), vp=vp.index, vtl=0, step="snapshot_save",
                                       by=job.by, detail=f"saved to {job.path}", duration_us=round(dt, 1),
                                       before=part["protections"], after=part["protections"]))
            if self.snapshot_stop and job.by in SNAPSHOT_TRIGGERS:
                # Every other VP is still paused: the stop _finish posts reaches each before
                # its next KVM_RUN (a flow's pause holds it until the resume), and this VP
                # stops here, so nothing of the guest runs after the instant saved.
                self._finish(vp, Stop(STATUS_STOPPED, "snapshot_saved",
                                      f"the run ended at its snapshot ({job.path})"))
        return record

    def _snapshot_missed(self) -> str | None:
        if self.snapshot_at is None or self.snapshot_dir is None:
            return None
        if any(s["by"] == self.snapshot_at for s in self.snapshots):
            return None
        if self.snapshot_refused is not None:
            return f"the save at --snapshot-at {self.snapshot_at} was refused: {self.snapshot_refused}"
        where = "VTL1 never came up" if self.snapshot_at == "vtl1" else "no END_OF_BOOT accepted there"
        return f"the run never reached --snapshot-at {self.snapshot_at} ({where})"

    def policy_extra(self) -> object:
        """Policy a mode holds outside the partition, for the protection digest (none here)."""
        return None

    def run_state(self) -> dict[str, Any]:
        """The run's own state for a snapshot: what the services and runners hold."""
        runners = []
        for r in self.runners:
            st = r.paused_from if r.state is RunState.PAUSED and r.paused_from is not None else r.state
            runners.append({"halted": st is RunState.HALTED, "pending_wake": r.pending_wake})
        return {
            "mode": self.p.config.mode,
            "resets": self.resets, "kexecs": self.kexecs,
            "vtl1_history": list(self.vtl1_history), "vtl1_history_omitted": self.vtl1_history_omitted,
            "steps": {str(i): [name, before] for i, (name, before, _) in self._steps.items()},
            "runners": runners,
            "reports": self.reports.state(),
            "intercepts": self.intercepts.count, "register_intercepts": self.intercepts.register_count,
            "single_steps": self.stepper.count,
            "guest_snapshot_taken": self._guest_snapshot_taken,
            "snapshots": list(self.snapshots),
        }

    def load_run_state(self, d: dict[str, Any]) -> None:
        """The inverse of run_state, into this scheduler before it runs (vtl/run/restore.py
        has checked the partition; a malformed field here is a ValueError)."""
        if d.get("mode") != self.p.config.mode:
            raise ValueError(f"the snapshot's run is in mode {d.get('mode')!r}")
        self.resets, self.kexecs = _count(d, "resets"), _count(d, "kexecs")
        hist = d.get("vtl1_history")
        if (not isinstance(hist, list) or len(hist) > VTL1_HISTORY_MAX
                or not all(isinstance(h, str) for h in hist)):
            raise ValueError("vtl1_history is malformed")
        self.vtl1_history, self.vtl1_history_omitted = list(hist), _count(d, "vtl1_history_omitted")
        steps = d.get("steps")
        if not isinstance(steps, dict):
            raise ValueError("steps is malformed")
        for key, val in steps.items():
            if not (key.isdigit() and int(key) < len(self.p.vps) and isinstance(val, list) and len(val) == 2
                    and val[0] in LIFECYCLE_CALLS.values() and isinstance(val[1], dict)):
                raise ValueError("a lifecycle step in flight is malformed")
            self._steps[int(key)] = (val[0], val[1], time.perf_counter())
        runners = d.get("runners")
        if not isinstance(runners, list) or len(runners) != len(self.runners):
            raise ValueError("the runners do not match the VP count")
        for r, saved in zip(self.runners, runners, strict=True):
            if not isinstance(saved, dict):
                raise ValueError("a runner is malformed")
            r.pending_wake = saved.get("pending_wake") is True
            r.resume_halted = saved.get("halted") is True and r.vp.state is RUNNING_VTL0
            r.restore_claim(r.vp.index != 0 and r.vp.state is not OFFLINE)
        self.reports.load(d.get("reports"))
        self.intercepts.count = _count(d, "intercepts")
        self.intercepts.register_count = _count(d, "register_intercepts")
        self.stepper.count = _count(d, "single_steps")
        self._guest_snapshot_taken = d.get("guest_snapshot_taken") is True

    def _vtl1_reason(self, name: str, status: int | None) -> str:
        """VTL1's own reason for refusing `name`: the text of its last STATUS report of it."""
        for r in reversed(self.reports.records):
            if r.vtl == 1 and r.kind == "status" and r.name == name and r.value[1] == status:
                return f" (VTL1: {r.text})" if r.text else ""
        return ""

    def _finish(self, vp: VirtualProcessor, stop: Stop) -> None:
        """Stop `vp` (on its own thread).  The first stop of a run decides it; every other
        VP follows with reason partition_stopped."""
        if vp.state.name == "stopped":
            return
        vtl = vp.active_vtl
        self._transition(vp, stopped(stop.status, stop.reason, stop.message))
        self.events.emit(GuestExit(ts=self.events.now(), vp=vp.index, vtl=vtl, status=stop.status,
                                   reason=stop.reason))
        with self._lock:
            if self._final is not None:
                return
            self._final = (vp.index, stop)
            follow = stop if stop is self._stop_request else Stop(
                stop.status, "partition_stopped", f"the run ended on VP{vp.index}: {stop.message}")
            for r in self.runners:
                if r.vp is not vp:
                    r.post(Kind.STOP, follow)

    @property
    def vtl_calls(self) -> int:
        return sum(vp.vtl_calls for vp in self.p.vps)

    @property
    def vtl_returns(self) -> int:
        return sum(vp.vtl_returns for vp in self.p.vps)

    def _result(self) -> RunResult:
        index, _ = self._final if self._final is not None else (0, None)
        st = self.p.vps[index].state
        return RunResult(
            status=st.status, reason=st.reason, message=st.message,
            wall_s=round(time.perf_counter() - self._t0, 6),
            vtl_calls=self.vtl_calls, vtl_returns=self.vtl_returns,
            vtl_switches=self.vtl_calls + self.vtl_returns,
            exits=self.exits_by_reason(), vtl1_enabled=self.p.vtl1_enabled,
            vtl1_measurement=self.p.vtl1_measurement, backend=self.p.backend_name,
            single_steps=self.stepper.count, register_intercepts=self.intercepts.register_count,
            boot_count=self.p.boot_count, resets=self.resets, kexecs=self.kexecs,
            trust=[d.hex() for d in self.p.config.trust], kexec_policy=self.p.config.kexec_policy,
            vtl1_history=list(self.vtl1_history), vtl1_history_omitted=self.vtl1_history_omitted,
            ended_on_vp=index, vps=self.vp_summaries(),
            fast_switches=sum(vp.fast_switches for vp in self.p.vps),
            switch_path=fastpath.DESCRIPTION if not (fastpath.AVAILABLE and not self.use_fastpath)
            else "Python (asked for)",
            snapshots=list(self.snapshots), restored_from=self.restored_from,
            snapshot_missed=self._snapshot_missed())

    def vp_summaries(self) -> list[VpSummary]:
        ctls = self.p.intercept_controls
        return [VpSummary(index=vp.index, state=str(vp.state), run_state=r.state.value,
                          reason=vp.state.reason, vtl_calls=vp.vtl_calls, vtl_returns=vp.vtl_returns,
                          exits=sum(vp.port_counts) + sum(vp.exit_counts.values()), requests=r.served,
                          starts=vp.starts, vtl1_up=vp.vtl1_up, pinned=ctls.pinned(vp.index))
                for vp, r in zip(self.p.vps, self.runners, strict=True)]

    def exits_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for vp in self.p.vps:
            for name, n in vp.exit_counts.items():
                out[name] = out.get(name, 0) + n
            for port, n in enumerate(vp.port_counts):
                if n:
                    key = f"io:{PORT_NAMES.get(port, hex(port))}"
                    out[key] = out.get(key, 0) + n
        return out

    def _run_failed(self, vp: VirtualProcessor, vcpu: VCpu, err: int) -> Outcome:
        if err in (errno.EINTR, errno.EAGAIN):
            vcpu.run.immediate_exit = 0             # cleared before the queue is read
            return None                             # the requests that kicked it: at the loop's top
        # -EFAULT with KVM_EXIT_MEMORY_FAULT is an exit (host-mapping protections on EPT hosts).
        exit = ex.from_result(vcpu, -err)
        vp.exit_counts[exit.name] += 1
        return self.exits.dispatch(vp, vcpu, exit)

    def _other_exit(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        exit = ex.decode(vcpu)
        vp.exit_counts[exit.name] += 1
        if isinstance(exit, ex.Interrupted):
            vcpu.run.immediate_exit = 0
            return None                             # the requests that kicked it: at the loop's top
        return self.exits.dispatch(vp, vcpu, exit)

    # --- the privileged section's other instructions -----------------------------------------
    def _single_step(self, vp: VirtualProcessor, step: Step) -> Outcome:
        """Carry out a Step (vtl/run/step.py) and handle the exit that ended it like any
        other exit; a step that could not even fetch its instruction is a fetch of the
        byte that stopped it."""
        vcpu = vp.current
        assert vcpu is not None and vp.state is RUNNING_VTL0
        # The step changes the VM's mappings: no other VP may run meanwhile.
        with self._others_paused(vp) as current:
            if not current:
                return None
            end = self.stepper.step(vcpu, step)
        exit = end.exit
        vp.exit_counts["single_step"] += 1
        rip = int(vcpu.regs.rip)
        delivered = self.privileged.event_delivered(vcpu, step, exit)
        if self._trace:
            self.events.emit(SingleStepped(ts=self.events.now(), vp=vp.index, vtl=0, rip=step.rip,
                                           next_rip=rip, exit="event" if delivered else exit.name))
        if isinstance(exit, ex.Debug) or delivered:
            # An event delivered during the step stopped at its handler's first byte (a
            # guarded page): VTL0 resumes there, the section NR again.
            return None
        if end.guarded is not None:
            return self.privileged.guarded_access(vp, vcpu, step, exit, end.guarded)
        if isinstance(exit, ex.EmulationFailure) and rip == step.rip:
            if step.blocked_gva is not None:
                return self.privileged.blocked_fetch(vp, vcpu, step.blocked_gva)
            # This host cannot execute it (INT3, INT n, ICEBP, SYSENTER here): nothing ran.
            return self.privileged.unsteppable(vp, vcpu, step, exit)
        if isinstance(exit, ex.RunError):
            return self._run_failed(vp, vcpu, exit.errno)
        if isinstance(exit, ex.Interrupted):
            vcpu.run.immediate_exit = 0
            return None                             # the requests that kicked it: at the loop's top
        if isinstance(exit, ex.MemoryFault):
            vp.exit_counts[exit.name] += 1
            return self.exits.dispatch(vp, vcpu, exit)
        if isinstance(exit, (ex.IoOut, ex.IoIn)):
            vp.port_counts[exit.port] += 1
            handler = self._io.get(exit.port)
            if handler is not None and isinstance(exit, ex.IoOut):
                return handler(vp, vcpu)
            return self._unknown_port(vp, vcpu)
        return self._other_exit(vp, vcpu)

    # --- VTL switch (hot path) ----------------------------------------------------------
    def _on_vtl_call(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        ctl = vp.ctl
        if vp.state is not RUNNING_VTL0 or vcpu.cs.selector & 3 or ctl is None:
            return self._refuse_vtl_call(vp, vcpu)
        # Both views exist once ctl does (the enable flow sets them together).  The shared-
        # state copy below is written out here and in _on_vtl_return rather than called:
        # a Python call on this path costs a measurable share of the round trip.
        src: SyncView = vp.sync[0]  # type: ignore[assignment]
        dst: SyncView = vp.sync[1]  # type: ignore[assignment]
        r0 = vcpu.regs
        code = r0.rax
        ctl.entry_reason = VTL_ENTRY_CALL
        ctl.vtl0_rax = code
        ctl.vtl0_rcx = r0.rcx
        memmove(dst.lo, src.lo, 48)
        memmove(dst.hi, src.hi, 72)
        cr2 = src.cr2[0]
        if cr2 != dst.cr2[0]:
            dst.cr2[0] = cr2
            dst.dirty[0] = SYNC_REGS | SYNC_SREGS
        else:
            dst.dirty[0] = SYNC_REGS
        if code in LIFECYCLE_CALLS:
            self._step_begin(vp, code)
        self._transition(vp, IN_VTL1_CALL)
        vp.vtl_calls += 1
        if self._trace:
            self.events.emit(VtlCall(ts=self.events.now(), vp=vp.index, vtl=0,
                                     code=ctl.vtl0_rax, arg=ctl.vtl0_rcx))
        return None

    def _refuse_vtl_call(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        if vp.active_vtl != VTL0:
            self.refusals.fault(vp, vcpu, "vtl_call", "VTL call from VTL1 (the highest VTL)", VEC_UD)
        elif vcpu.cs.selector & 3:
            self.refusals.fault(vp, vcpu, "vtl_call", "VTL call from CPL3", VEC_GP, 0)
        else:
            self.refusals.status(vp, vcpu, "vtl_call", "VTL1 is not enabled", ABI.VTL_E_NOT_ENABLED)
        return None

    def _on_vtl_return(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        state = vp.state
        if state.vtl is not VTL1 or vcpu.cs.selector & 3:
            return self._refuse_vtl_return(vp, vcpu)
        src: SyncView = vp.sync[1]  # type: ignore[assignment]
        dst: SyncView = vp.sync[0]  # type: ignore[assignment]
        v0 = dst.vcpu
        fast = vcpu.words[8] >> 16 == PORT_RETURN_FAST
        vp.vtl_returns += 1
        if state is IN_VTL1_CALL and vp.restart is not None:
            req, vp.restart = vp.restart, None
            with self._others_paused(vp) as current:
                if current:
                    self._kexec(vp, req)      # VTL0 never sees this return
                    self._reboot_states()
            return None
        if state is IN_VTL1_CALL:
            memmove(dst.lo, src.lo, 48)
            memmove(dst.hi, src.hi, 72)
            if not fast:
                r0, ctl = v0.regs, vp.ctl
                r0.rax = ctl.vtl0_rax
                r0.rcx = ctl.vtl0_rcx
            cr2 = src.cr2[0]
            if cr2 != dst.cr2[0]:
                dst.cr2[0] = cr2
                dst.dirty[0] = SYNC_REGS | SYNC_SREGS
            else:
                dst.dirty[0] = SYNC_REGS
            outcome: Outcome = None
        elif state.entry is Entry.ENABLE:
            # End of the enable flow (or of an AP's VTL1 start-up): VTL0's registers are
            # untouched but for the status.  OR, not set: an AP's VTL0 has not run since
            # its start context was written (its sregs are dirty too).
            v0.regs.rax = ABI.VTL_OK
            dst.dirty[0] |= SYNC_REGS
            vp.vtl1_up = True
            outcome = None
            if vp.index == 0 and self.snapshot_at == "vtl1":
                self._trigger(vp)
        else:
            # An intercept: VTL0's registers were never handed to VTL1; apply the verdict.
            assert state.pending is not None
            outcome = self.intercepts.complete(vp, state.pending)
        self._transition(vp, RUNNING_VTL0)
        if self._steps and state is IN_VTL1_CALL:
            self._step_end(vp, int(v0.regs.rax))
        if self._trace:
            self.events.emit(VtlReturn(ts=self.events.now(), vp=vp.index, vtl=1, fast=fast,
                                       status=v0.regs.rax))
        return outcome

    def _refuse_vtl_return(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        if vp.active_vtl != VTL1:
            self.refusals.fault(vp, vcpu, "vtl_return", "VTL return from VTL0", VEC_UD)
        else:
            self.refusals.fault(vp, vcpu, "vtl_return", "VTL return from CPL3", VEC_GP, 0)
        return None

    # --- other ports ----------------------------------------------------------------
    def _on_console(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        self.console.byte(vp.index, vp.active_vtl, vcpu.run_buf[vcpu.run.io.data_offset][0])
        return None

    def _on_exit_port(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        exit = ex.decode(vcpu)
        assert isinstance(exit, ex.IoOut)
        status = exit.value
        return Stop(status, "guest_exit", f"VTL{int(vp.active_vtl)} reported exit status {status:#x}")

    def _unknown_port(self, vp: VirtualProcessor, vcpu: VCpu) -> Outcome:
        exit = ex.decode(vcpu)
        if isinstance(exit, ex.IoIn):
            # No device here: reads float high, as on an empty ISA bus.
            ex.complete_io_in(vcpu, b"\xff" * (exit.size * exit.count))
        return None

    # --- for the control plane (vtl/run/control.py, vtl/run/controlsock.py; any thread) ---
    def refresh_trace(self) -> None:
        """Re-read `events.trace` after a listener that wants per-call events came or went.
        The loop reads `_trace` once per VTL call or return, and storing a bool is atomic,
        so per-call events start (or stop) at the next call or return: the kick brings every
        VP out of the C switch path (which emits no per-call event) to the Python one."""
        self._trace = self.events.trace
        self.kick_all()

    @property
    def stopping(self) -> bool:
        """A stop was requested (signal, timeout, the control socket); the loop may not
        have seen it yet."""
        return self._stop_request is not None


def _describe(e: Exception) -> str:
    return str(e) if isinstance(e, VmmError) else f"internal error: {type(e).__name__}: {e}"


def _count(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
        raise ValueError(f"{key} is not a count")
    return v
