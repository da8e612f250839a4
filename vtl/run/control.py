"""The control plane: runs a partition's scheduler in a worker thread under trio.

trio owns the timeout and the signals: SIGINT and SIGTERM stop the guest and the run
ends as "interrupted" (130) or "terminated" (143), a timeout as "timeout" (124).
Stopping a vCPU that sits in KVM_RUN takes kvm_run.immediate_exit plus a signal to
its thread (api.rst, KVM_RUN).  With `control_path`, trio also serves the control socket
(QMP: vtl/run/controlsock.py, docs/control-socket.md) for the life of the run; its `quit`
ends the run as "stopped" (5), its `system_reset` asks the scheduler for an emulated RESET,
`stop` and `cont` pause and resume every VP (the scheduler's pause_all / resume_all).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import trio

from vtl.core.partition import Partition
from vtl.run import controlsock
from vtl.run.result import RunResult
from vtl.run.runner import KICK_SIGNAL, Request
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.services.outcomes import STATUS_INTERRUPTED, STATUS_STOPPED, STATUS_TERMINATED, STATUS_TIMEOUT


async def _supervise(sched: Scheduler, timeout: float | None,
                     control: controlsock.BoundSocket | None = None) -> RunResult:
    done = threading.Event()

    def worker() -> RunResult:
        try:
            return sched.run()
        finally:
            done.set()

    async def kick(status: int, reason: str, message: str) -> None:
        sched.request_stop(status, reason, message)
        # Re-signal until every VP has left KVM_RUN; the request queue and immediate_exit
        # cover the race where a signal lands between two KVM_RUNs (vtl/run/runner.py).
        while not done.is_set():
            sched.kick_all()
            await trio.sleep(0.05)

    async def watchdog(seconds: float) -> None:
        await trio.sleep(seconds)
        await kick(STATUS_TIMEOUT, "timeout", f"no exit status after {seconds:g} s (timeout)")

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if signum == signal.SIGINT:
                    await kick(STATUS_INTERRUPTED, "interrupted", "interrupted (SIGINT)")
                else:
                    await kick(STATUS_TERMINATED, "terminated", "terminated (SIGTERM)")
                return

    def request_reset(by: str) -> Request:
        # Queued for the boot VP, which carries it out (the request kicks it once).
        return sched.request_reset(by)

    async with trio.open_nursery() as nursery:
        if timeout is not None:
            nursery.start_soon(watchdog, timeout)
        nursery.start_soon(on_signal)
        actions = controlsock.Actions(
            quit=lambda: nursery.start_soon(kick, STATUS_STOPPED, "stopped",
                                            "ended by quit over the control socket"),
            reset=request_reset)
        serving = (controlsock.serving(control, sched, actions) if control is not None
                   else contextlib.nullcontext(None))
        async with serving as server:
            result = await trio.to_thread.run_sync(worker)
            if server is not None:
                await server.finish(result)
        nursery.cancel_scope.cancel()
    return result


def run(partition: Partition, console: Console | None = None,
        timeout: float | None = 30.0, control_path: Path | None = None,
        scheduler: Callable[[Partition, Console | None], Scheduler] = Scheduler
        ) -> tuple[RunResult, Scheduler]:
    """Run `partition` until the guest reports an exit status, crashes, times out or is
    stopped by a signal (or `quit` on the control socket at `control_path`).  Errors
    inside the run end it with reason "vmm_error".  A control socket that cannot be
    opened raises controlsock.ControlSocketError before the guest runs; its file is
    removed when the run ends, however it ends."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    sched = scheduler(partition, console)        # a mode's scheduler (vtl/modes) or the VTL one
    # Bound here, outside trio: an error is a plain exception before anything runs, and
    # the finally below removes the file on every way out (signals, timeout, errors).
    control = controlsock.BoundSocket(control_path) if control_path is not None else None
    old = signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN (EINTR)
    try:
        result = trio.run(_supervise, sched, timeout, control)
    finally:
        signal.signal(KICK_SIGNAL, old)
        if control is not None:
            control.close()
    return result, sched
