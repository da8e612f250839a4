"""The C floor and the Python floor must run the very same guest bytes."""

from __future__ import annotations

import re
from pathlib import Path

from vmm import floor

FLOOR_C = Path(__file__).resolve().parent.parent / "bench" / "floor.c"


def _c_array(name: str) -> bytes:
    m = re.search(rf"{name}\[\]\s*=\s*\{{(.*?)\}};", FLOOR_C.read_text(), re.S)
    assert m, name
    return bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", m.group(1)))


def test_c_floor_guests_are_byte_identical_to_python_floor_guests() -> None:
    assert _c_array("GUEST_A") == floor.GUEST_A
    assert _c_array("GUEST_B") == floor.GUEST_B
