"""The VTL switch's fast path (vtl/run/fastpath.c), loaded through cffi.

`make install` (and `make all`) builds vtl/run/build/fastpath.so with the machine's C
compiler.  Without it (or with VTL_FASTPATH=0 in the environment) the scheduler switches
VTLs in Python, with the same rules; `vtl bench` says which path it measured.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cffi

from vmm import uapi as u
from vtl.abi import abi_ffi
from vtl.core.vp import VirtualProcessor
from vtl.core.vtl import Vtl

LIBRARY = Path(__file__).resolve().parent / "build" / "fastpath.so"

_ffi = cffi.FFI()
_ffi.cdef("""
struct vtl_fast {
    int32_t fd[2];
    void *run[2];
    void *ctl;
    uint32_t cur;
    uint32_t returns_ok;
    int32_t err;
    uint32_t pad;
    uint64_t calls, returns, fast_returns;
    uint8_t python_codes[256];
};
int vtl_fast_run(struct vtl_fast *f);
""")


def _load() -> tuple[Any, str]:
    if os.environ.get("VTL_FASTPATH", "1") == "0":
        return None, "off (VTL_FASTPATH=0)"
    if not LIBRARY.is_file():
        return None, f"not built ({LIBRARY.relative_to(LIBRARY.parents[3])} is missing: make install)"
    try:
        return _ffi.dlopen(str(LIBRARY)), "C (vtl/run/fastpath.c)"
    except OSError as e:
        return None, f"not loadable ({e})"


_lib, DESCRIPTION = _load()
AVAILABLE = _lib is not None


class FastPath:
    """One VP's struct vtl_fast, bound to its current vCPUs (rebind after they change)."""

    def __init__(self, python_codes: frozenset[int]) -> None:
        assert _lib is not None
        self.f = _ffi.new("struct vtl_fast *")
        for code in python_codes:
            if code < 256:
                self.f.python_codes[code] = 1
        self.bound: tuple[Any, Any, Any] | None = None
        self.run_fn = _lib.vtl_fast_run

    def bind(self, vp: VirtualProcessor) -> bool:
        """Point at the VP's vCPUs and vtl_control; False if it has no VTL1 to switch to."""
        v0, v1, ctl = vp.vcpus[Vtl.VTL0], vp.vcpus[Vtl.VTL1], vp.ctl
        if self.bound == (v0, v1, ctl):
            return True
        if v0 is None or v1 is None or ctl is None:
            self.bound = None
            return False
        f = self.f
        f.fd[0], f.fd[1] = v0.fd, v1.fd
        f.run[0] = _ffi.cast("void *", int(u.ffi.cast("uintptr_t", v0.run)))
        f.run[1] = _ffi.cast("void *", int(u.ffi.cast("uintptr_t", v1.run)))
        f.ctl = _ffi.cast("void *", int(abi_ffi.cast("uintptr_t", ctl)))
        self.bound = (v0, v1, ctl)
        return True
