"""The hand-written cffi KVM uAPI (vmm/uapi.py) against the machine's C headers.

A C program built with the machine's gcc prints sizeof/offsetof of every struct and
field the bindings declare, and the value of every KVM_* constant they define; each
must match.  Declarations newer than the installed headers (the memory-attributes uAPI
of Linux 6.8+) are checked against the upstream layout instead.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from vmm import uapi
from vmm.uapi import ffi

# Not in Debian 12's linux-libc-dev (6.1): added with guest_memfd / memory attributes in 6.8.
NEWER_THAN_HEADERS = {"struct kvm_memory_attributes", "struct kvm_run.memory_fault"}
UPSTREAM = {  # include/uapi/linux/kvm.h, Linux 6.8+
    "struct kvm_memory_attributes": (32, {"address": 0, "size": 8, "attributes": 16, "flags": 24}),
    "struct kvm_run.memory_fault": (24, {"flags": 32, "gpa": 40, "size": 48}),
}

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists(),
                                reason="needs gcc and linux/kvm.h (Debian: gcc, linux-libc-dev)")


def _struct_names() -> list[str]:
    import re
    return sorted(set(re.findall(r"^struct (kvm_\w+) \{", uapi.CDEF, re.M)))


def _fields(ctype: Any, prefix: str = "") -> list[tuple[str, int, int]]:
    """(dotted path, offset from the outer struct, size) for every named field, recursively."""
    out: list[tuple[str, int, int]] = []
    for name, f in ctype.fields or []:
        path = f"{prefix}{name}"
        flexible = f.type.kind == "array" and f.type.length is None
        out.append((path, f.offset, -1 if flexible else ffi.sizeof(f.type)))
        if f.type.kind in ("struct", "union") and f.type.fields:
            out.extend((p, f.offset + off, size) for p, off, size in _fields(f.type, path + "."))
    return out


def _constants() -> dict[str, int]:
    return {k: v for k, v in vars(uapi).items() if k.startswith("KVM_") and isinstance(v, int)}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <sys/types.h>",
             "#include <linux/kvm.h>", "int main(void) {"]
    for s in _struct_names():
        cs = f"struct {s}"
        if cs in NEWER_THAN_HEADERS:
            continue
        lines.append(f'printf("{cs}|%zu\\n", sizeof({cs}));')
        for path, _, _size in _fields(ffi.typeof(cs)):
            if f"{cs}.{path.split('.')[0]}" in NEWER_THAN_HEADERS:
                continue
            size = "(size_t)-1" if _size == -1 else f"sizeof((({cs} *)0)->{path})"
            lines.append(f'printf("{cs}.{path}|%zu|%zd\\n", offsetof({cs}, {path}), (ssize_t){size});')
    for name in _constants():
        lines.append(f'#ifdef {name}\nprintf("#{name}|%llu\\n", (unsigned long long)({name}));\n#endif')
    lines.append("return 0; }")
    d = tmp_path_factory.mktemp("uapi")
    (d / "layout.c").write_text("\n".join(lines))
    cp = subprocess.run(["gcc", "-w", "-o", str(d / "layout"), str(d / "layout.c")],
                        capture_output=True, text=True)
    assert cp.returncode == 0, "a field of vmm/uapi.py is not in linux/kvm.h:\n" + cp.stderr[-3000:]
    out = subprocess.run([str(d / "layout")], capture_output=True, text=True, check=True).stdout
    result: dict[str, int] = {}
    for line in out.splitlines():
        key, *vals = line.split("|")
        if len(vals) == 2:
            result[key + "@off"], result[key + "@size"] = int(vals[0]), int(vals[1])
        else:
            result[key] = int(vals[0])
    return result


def test_every_struct_size_and_field_offset_matches_the_headers(c_layout: dict[str, int]) -> None:
    checked = 0
    for s in _struct_names():
        cs = f"struct {s}"
        if cs in NEWER_THAN_HEADERS:
            continue
        assert ffi.sizeof(cs) == c_layout[cs], f"sizeof({cs})"
        for path, off, size in _fields(ffi.typeof(cs)):
            key = f"{cs}.{path}"
            if f"{cs}.{path.split('.')[0]}" in NEWER_THAN_HEADERS:
                continue
            assert (off, size) == (c_layout[key + "@off"], c_layout[key + "@size"]), key
            checked += 1
    assert checked > 150  # the walk really covered the nested kvm_run / sync regs fields


def test_every_kvm_constant_matches_the_headers(c_layout: dict[str, int]) -> None:
    consts = _constants()
    in_headers = {k: v for k, v in consts.items() if "#" + k in c_layout}
    assert len(in_headers) > 40
    for name, value in in_headers.items():
        header = c_layout["#" + name]
        assert value == header, f"{name}: bindings {value:#x}, headers {header:#x}"


def test_declarations_newer_than_the_headers_follow_upstream() -> None:
    size, fields = UPSTREAM["struct kvm_memory_attributes"]
    assert ffi.sizeof("struct kvm_memory_attributes") == size
    for name, off in fields.items():
        assert ffi.offsetof("struct kvm_memory_attributes", name) == off
    _, mf = UPSTREAM["struct kvm_run.memory_fault"]
    member = dict(ffi.typeof("struct kvm_run").fields)["memory_fault"]
    for name, off in mf.items():
        assert member.offset + ffi.offsetof(member.type, name) == off
