"""The debug console (VTL_PORT_CONSOLE): bytes from each VP's VTLs, assembled into lines.

Lines are for people.  Each is tagged by the VMM with the VTL (and VP) it came from,
so a guest cannot print a line that reads as another VTL's, or as the VMM's own
summary.  Guest output is untrusted: no terminal escapes pass, a line is cut at
MAX_LINE bytes, and only a bounded tail of lines is kept in memory.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from vtl.core.vtl import Vtl

MAX_LINE = 4096
Sink = Callable[[str], None]


def printable(raw: bytes) -> str:
    return "".join(c if (c.isprintable() or c == "\t") else f"\\x{ord(c):02x}"
                   for c in raw.decode("latin-1"))


class Console:
    def __init__(self, nr_vps: int, sink: Sink | None = None, keep: int = 1000) -> None:
        self.sink = sink
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.lines = 0
        self._bufs = {(vp, vtl): bytearray() for vp in range(nr_vps) for vtl in Vtl}
        self._multi_vp = nr_vps > 1
        self._lock = threading.Lock()       # whole lines from concurrent VPs, one at a time

    def tag(self, vp: int, vtl: Vtl) -> str:
        return f"[vp{vp} vtl{int(vtl)}] " if self._multi_vp else f"[vtl{int(vtl)}] "

    def byte(self, vp: int, vtl: Vtl, byte: int) -> None:
        buf = self._bufs[(vp, vtl)]
        if byte == 0x0A:
            self._line(vp, vtl, buf)
        elif len(buf) < MAX_LINE:
            buf.append(byte)

    def _line(self, vp: int, vtl: Vtl, buf: bytearray) -> None:
        line = self.tag(vp, vtl) + printable(bytes(buf))
        buf.clear()
        with self._lock:
            self.lines += 1
            self.tail.append(line)
            if self.sink is not None:
                self.sink(line)

    def flush(self) -> None:
        for (vp, vtl), buf in self._bufs.items():
            if buf:
                self._line(vp, vtl, buf)
