"""The one ABI header, as C sees it and as Python sees it, must agree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vtl.abi import ABI, HEADER, abi_ffi

STRUCTS = sorted(set(re.findall(r"^struct (vtl_\w+) \{", HEADER.read_text(), re.M)))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_c_and_python_agree_on_every_constant_and_struct(tmp_path: Path) -> None:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <stdint.h>",
             f'#include "{HEADER}"', "int main(void) {"]
    for name in ABI.constants:
        lines.append(f'printf("#{name}|%llu\\n", (unsigned long long)({name}));')
    for s in STRUCTS:
        lines.append(f'printf("struct {s}|%zu\\n", sizeof(struct {s}));')
        for field, _ in abi_ffi.typeof(f"struct {s}").fields:
            lines.append(f'printf("{s}.{field}|%zu\\n", offsetof(struct {s}, {field}));')
    lines.append("return 0; }")
    (tmp_path / "abi.c").write_text("\n".join(lines))
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(tmp_path / "abi"), str(tmp_path / "abi.c")],
                   check=True)
    c = dict(line.split("|") for line in
             subprocess.run([str(tmp_path / "abi")], capture_output=True, text=True, check=True)
             .stdout.splitlines())
    assert len(ABI.constants) > 50 and len(STRUCTS) >= 3
    for name, value in ABI.constants.items():
        assert int(c["#" + name]) == value, name
    for s in STRUCTS:
        assert int(c[f"struct {s}"]) == abi_ffi.sizeof(f"struct {s}"), s
        for field, f in abi_ffi.typeof(f"struct {s}").fields:
            assert int(c[f"{s}.{field}"]) == f.offset, f"{s}.{field}"


def test_assembly_offsets_match_the_structs() -> None:
    """guest_vtl1/entry.S reads vtl_control and vtl_boot_info through VTL_CONTROL_*_OFF and
    VTL_BOOT_INFO_*_OFF."""
    for prefix, struct in (("VTL_CONTROL_", "vtl_control"), ("VTL_BOOT_INFO_", "vtl_boot_info")):
        offs = {n: v for n, v in ABI.constants.items() if n.startswith(prefix) and n.endswith("_OFF")}
        assert offs
        for name, value in offs.items():
            field = name.removeprefix(prefix).removesuffix("_OFF").lower()
            assert abi_ffi.offsetof(f"struct {struct}", field) == value, name


def test_vtl1_only_hypercalls_are_above_the_boundary() -> None:
    for name, value in ABI.constants.items():
        if name.startswith("VTL_HC_") and name != "VTL_HC_VTL1_FIRST":
            vtl1_only = name in {"VTL_HC_GET_VP_REGISTER", "VTL_HC_MODIFY_VTL_PROTECTION",
                                 "VTL_HC_SET_INTERCEPT_CONTROL", "VTL_HC_VTL0_RESTART"}
            assert (value >= ABI.VTL_HC_VTL1_FIRST) == vtl1_only, name
