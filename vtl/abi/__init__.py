"""The guest/VMM ABI, read from vtl/abi/vtl_abi.h (the same file the C guests include).

`ABI.<NAME>` is every #define between the ABI-CDEF markers; `abi_ffi` knows the
structs (`struct vtl_boot_info`, `struct vtl_control`, ...)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cffi

HEADER = Path(__file__).parent / "vtl_abi.h"


def _cdef_text(text: str) -> str:
    m = re.search(r"/\* ABI-CDEF-BEGIN \*/(.*)/\* ABI-CDEF-END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{HEADER}: ABI-CDEF markers not found")
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    # Conditionals (the __ASSEMBLER__ guard) are for C; cffi sees every declaration.
    body = re.sub(r"^\s*#\s*(if|ifdef|ifndef|else|endif)\b.*$", "", body, flags=re.M)
    # cffi wants plain integer literals in #defines.
    return re.sub(r"(#define\s+\w+\s+0x[0-9A-Fa-f]+|#define\s+\w+\s+\d+)ULL", r"\1", body)


class _Abi:
    def __init__(self) -> None:
        text = HEADER.read_text()
        self.ffi = cffi.FFI()
        cdef = _cdef_text(text)
        self.ffi.cdef(cdef)
        self.lib: Any = self.ffi.dlopen(None)
        self.constants: dict[str, int] = {
            name: int(val, 0) for name, val in
            re.findall(r"#define\s+(\w+)\s+(0x[0-9A-Fa-f]+|\d+)", cdef)}

    def __getattr__(self, name: str) -> int:
        try:
            return self.constants[name]
        except KeyError:
            raise AttributeError(name) from None

    def names(self, prefix: str) -> dict[int, str]:
        """value -> name for the constants starting with `prefix` (for messages)."""
        return {v: k for k, v in self.constants.items() if k.startswith(prefix)}


ABI = _Abi()
abi_ffi = ABI.ffi


def abi_struct(mem: Any, ctype: str, gpa: int) -> Any:
    """A `struct <ctype> *` (ABI ffi) over guest memory at `gpa`, bounds-checked."""
    size = abi_ffi.sizeof(ctype)
    mem.check(gpa, size)
    return abi_ffi.cast(ctype + " *", mem.host_addr + gpa)
