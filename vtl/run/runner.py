"""One VP's runner: its thread, its request queue and its run state (issue 16).

Each VP runs on its own thread (KVM_RUN through cffi releases the GIL, so VPs run in
parallel).  Anything another thread wants of a VP (pause, resume, stop, reset, start)
is a `Request` posted to that VP's queue and carried out by the VP's own thread, which
acknowledges it, as Firecracker's vCPU events are.  So a VP's state still changes in one
place (the scheduler, on the VP's thread), and a request can never be lost:

  * the poster appends the request *before* it kicks (sets immediate_exit on the VP's
    vCPUs and signals the thread out of a KVM_RUN in progress);
  * the runner clears immediate_exit *before* it looks at its queue, and looks at the
    queue before every KVM_RUN.

Whatever clears immediate_exit in between (VCpu.complete_pending_io does, api.rst) can
only clear a kick whose request is already queued, and the queue is read before the next
KVM_RUN.  tests/test_runner.py races many requests against intercept completion.

Run states (what `vtl` shows as a VP's `run_state`; the VTL position is `VpState`):

  offline   created, not started (an AP before VTL_HC_START_VP); its thread waits
  running   in or between KVM_RUNs
  paused    acknowledged a pause and waits for resume (or stop)
  halted    its VTL0 executed HLT; it waits for a wake (VTL_HC_SEND_IPI) or any request
  exited    its loop has ended (the VP is stopped)

A SNAPSHOT request is carried out on the VP's thread like the others, and also while
the VP is paused by the user or halted (saving changes nothing a pause holds).
"""

from __future__ import annotations

import signal
import threading
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vtl.core.vp import VirtualProcessor

# The signal that interrupts a KVM_RUN in progress (api.rst: KVM_RUN returns -EINTR); its
# handler does nothing.  vtl/run/control.py installs it for the life of a run.
KICK_SIGNAL = signal.SIGUSR1
# A VP's queue holds at most this many requests: a client cannot grow it without bound
# (each request kind but stop is idempotent while one is queued, see VpRunner.post).
MAX_QUEUED = 64


class RunState(StrEnum):
    OFFLINE = "offline"
    RUNNING = "running"
    PAUSED = "paused"
    HALTED = "halted"
    EXITED = "exited"


class Kind(StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    RESET = "reset"
    START = "start"
    WAKE = "wake"
    SNAPSHOT = "snapshot"       # save the partition (vtl/run/snapshot.py); served even while paused


@dataclass(eq=False)
class Request:
    kind: Kind
    payload: Any = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None

    def ack(self, result: Any = None) -> None:
        """Called once, by the VP's thread (or post() for a VP that has exited)."""
        self.result = result
        self.done.set()


class QueueFull(Exception):
    """A VP has MAX_QUEUED requests it has not served yet."""


class VpRunner:
    """The thread-side of one VP: posted to from any thread, served by its own."""

    def __init__(self, vp: VirtualProcessor) -> None:
        self.vp = vp
        self.requests: deque[Request] = deque()
        self.state = RunState.RUNNING if vp.state.vtl is not None else RunState.OFFLINE
        self.ident: int | None = None          # the thread's id once it runs
        self.native_id: int | None = None      # ... and its kernel thread id (TID)
        self._cond = threading.Condition()
        self.served = 0                        # requests acknowledged (status, tests)
        self._claimed = False                  # a START is queued or done (VTL_E_BUSY after)
        # Between wait() handing out a request and the VP's next wait() or set_state(), the
        # VP is acting on it (a START, a WAKE) while its state still says offline or halted:
        # not idle, or "every VP idles" could be concluded in that window and end the run.
        self._acting = False
        self.pending_wake = False              # a wake that came while it ran (its own thread only)
        self.paused_from: RunState | None = None  # while paused: the state it resumes to
        self.resume_halted = False             # restored halted: the loop starts idle (a snapshot)

    @property
    def claimed(self) -> bool:
        return self._claimed

    def restore_claim(self, claimed: bool) -> None:
        """A restored AP's start claim (started, or a start it had queued is void)."""
        with self._cond:
            self._claimed = claimed

    # --- any thread -----------------------------------------------------------------------
    def post(self, kind: Kind, payload: Any = None) -> Request:
        """Queue a request for this VP and kick it; returns the request (wait on `done`).
        A VP that has exited acknowledges at once with result None."""
        req = Request(kind, payload)
        with self._cond:
            if self.state is RunState.EXITED:
                req.ack(None)
                return req
            if len(self.requests) >= MAX_QUEUED:
                raise QueueFull(f"VP{self.vp.index} has {MAX_QUEUED} requests pending")
            self.requests.append(req)
            self._cond.notify_all()
        self.kick()
        return req

    def claim_start(self) -> bool:
        """Claim this offline AP for one start (VTL_HC_START_VP); False if it is started or
        a start is already queued.  Two VPs starting the same AP: one wins."""
        with self._cond:
            if self._claimed or self.state is RunState.EXITED or self.vp.index == 0:
                return False
            self._claimed = True
            return True

    def unclaim(self) -> None:
        """The AP is offline again (a RESET or a kexec): it may be started anew."""
        with self._cond:
            self._claimed = False

    def kick(self) -> None:
        """Make the VP's next (or current) KVM_RUN return at once."""
        for vcpu in self.vp.vcpus:
            if vcpu is not None:
                vcpu.run.immediate_exit = 1
        ident = self.ident
        if ident is not None and self.state is RunState.RUNNING and _kick_handler_installed():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:      # the thread has just ended
                pass

    # --- the VP's own thread --------------------------------------------------------------
    def take(self) -> Request | None:
        with self._cond:
            if not self.requests:
                return None
            self.served += 1
            return self.requests.popleft()

    def take_all(self, kind: Kind) -> list[Request]:
        """Take every queued request of `kind`, leaving the others in their order."""
        with self._cond:
            taken = [r for r in self.requests if r.kind is kind]
            for r in taken:
                self.requests.remove(r)
            self.served += len(taken)
            return taken

    def put_back(self, held: list[Request]) -> None:
        """Return requests taken while paused to the front of the queue, in order."""
        with self._cond:
            self.requests.extendleft(reversed(held))
            self.served -= len(held)

    def idle_with_nothing_queued(self) -> bool:
        """Halted or offline with no request that could wake it, and not acting on one it was
        just handed (for "every VP idles")."""
        with self._cond:
            return (self.state in (RunState.HALTED, RunState.OFFLINE, RunState.EXITED) and not self.requests
                    and not self._acting)

    def wait(self) -> Request:
        """Block until a request arrives (offline or paused) and take it."""
        with self._cond:
            self._acting = False
            while not self.requests:
                self._cond.wait()
            self.served += 1
            self._acting = True
            return self.requests.popleft()

    def set_state(self, state: RunState) -> None:
        with self._cond:
            self._acting = False
            self.state = state
            if state is RunState.EXITED:
                # Requests that arrive after the end are acknowledged by post(); those
                # queued before it are acknowledged now, so no poster waits forever.
                while self.requests:
                    self.requests.popleft().ack(None)
            self._cond.notify_all()


def _kick_handler_installed() -> bool:
    """Signalling a thread with KICK_SIGNAL's default action would end the process: only
    a run under vtl/run/control.py (which installs a handler) is signalled; without it a
    kick is immediate_exit alone (the next KVM_RUN returns at once)."""
    try:
        handler = signal.getsignal(KICK_SIGNAL)
    except (ValueError, OSError):
        return False
    return handler not in (signal.SIG_DFL, signal.SIG_IGN, None)
