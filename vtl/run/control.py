"""The control plane: runs a partition's scheduler in a worker thread under trio.

trio owns the timeout and the signals: SIGINT and SIGTERM stop the guest and the run
ends as "interrupted" (130) or "terminated" (143), a timeout as "timeout" (124).
Stopping a vCPU that sits in KVM_RUN takes kvm_run.immediate_exit plus a signal to
its thread (api.rst, KVM_RUN).
"""

from __future__ import annotations

import math
import signal
import threading

import trio

from vtl.core.partition import Partition
from vtl.run.result import RunResult
from vtl.run.scheduler import Scheduler
from vtl.services.console import Console
from vtl.services.outcomes import STATUS_INTERRUPTED, STATUS_TERMINATED, STATUS_TIMEOUT

KICK_SIGNAL = signal.SIGUSR1


async def _supervise(sched: Scheduler, timeout: float | None) -> RunResult:
    ident: list[int] = []
    done = threading.Event()

    def worker() -> RunResult:
        ident.append(threading.get_ident())
        try:
            return sched.run()
        finally:
            done.set()

    async def kick(status: int, reason: str, message: str) -> None:
        sched.request_stop(status, reason, message)
        # Re-signal until the thread leaves KVM_RUN; immediate_exit covers the race
        # where the signal lands between two KVM_RUNs.
        while not done.is_set():
            if ident:
                signal.pthread_kill(ident[0], KICK_SIGNAL)
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

    async with trio.open_nursery() as nursery:
        if timeout is not None:
            nursery.start_soon(watchdog, timeout)
        nursery.start_soon(on_signal)
        result = await trio.to_thread.run_sync(worker)
        nursery.cancel_scope.cancel()
    return result


def run(partition: Partition, console: Console | None = None,
        timeout: float | None = 30.0) -> tuple[RunResult, Scheduler]:
    """Run `partition` until the guest reports an exit status, crashes, times out or is
    stopped by a signal.  Errors inside the run end it with reason "vmm_error"."""
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    sched = Scheduler(partition, console)
    old = signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN (EINTR)
    try:
        result = trio.run(_supervise, sched, timeout)
    finally:
        signal.signal(KICK_SIGNAL, old)
    return result, sched
