"""Virtual Trust Levels and per-VTL storage (as OpenVMM's hv1 `Vtl` / `VtlArray`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Generic, TypeVar

T = TypeVar("T")


class Vtl(IntEnum):
    VTL0 = 0
    VTL1 = 1

    def __str__(self) -> str:
        return self.name


# The VTLs this prototype implements, lowest first.
ALL_VTLS = (Vtl.VTL0, Vtl.VTL1)


class VtlArray(list[T], Generic[T]):
    """One value per VTL, indexed by `Vtl`.

    A list underneath so that `arr[vtl]` stays a C-level index on the switch path; the
    length is fixed at construction (one slot per VTL, absent values are None)."""

    def __init__(self, make: Callable[[Vtl], T]) -> None:
        super().__init__(make(v) for v in ALL_VTLS)

    def items(self) -> Iterator[tuple[Vtl, T]]:
        return zip(ALL_VTLS, self, strict=True)

    def append(self, _: T) -> None:  # fixed size: one slot per VTL
        raise TypeError("a VtlArray has one slot per VTL")
