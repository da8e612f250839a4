"""The control plane: runs a partition's scheduler in a worker thread under trio.

trio owns the timeout and Ctrl-C; stopping a vCPU that sits in KVM_RUN takes
kvm_run.immediate_exit plus a signal to its thread (api.rst, KVM_RUN).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import trio

from vtl.partition import Partition
from vtl.scheduler import RunResult, Scheduler

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

    async def kick(reason: str) -> None:
        sched.stop(reason)
        # Re-signal until the thread leaves KVM_RUN; immediate_exit covers the race
        # where the signal lands between two KVM_RUNs.
        while not done.is_set():
            if ident:
                signal.pthread_kill(ident[0], KICK_SIGNAL)
            await trio.sleep(0.05)

    async def watchdog() -> None:
        assert timeout is not None
        await trio.sleep(timeout)
        await kick(f"no exit status after {timeout:g} s (timeout)")

    async def on_sigint() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                await kick("interrupted")
                return

    async with trio.open_nursery() as nursery:
        if timeout:
            nursery.start_soon(watchdog)
        nursery.start_soon(on_sigint)
        result = await trio.to_thread.run_sync(worker)
        nursery.cancel_scope.cancel()
    return result


def run(partition: Partition, console: Callable[[str], None] | None = None,
        timeout: float | None = 30.0) -> tuple[RunResult, Scheduler]:
    """Run `partition` until the guest reports an exit status, crashes or times out."""
    sched = Scheduler(partition, console)
    old = signal.signal(KICK_SIGNAL, lambda *_: None)  # only to interrupt KVM_RUN (EINTR)
    try:
        result = trio.run(_supervise, sched, timeout)
    finally:
        signal.signal(KICK_SIGNAL, old)
    return result, sched
