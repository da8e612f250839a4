"""The report channel (VTL_HC_REPORT): guests send results and measurements as records,
in the spirit of KVM selftests' ucall.  Tools and tests read verdicts from here (or
from what the VMM observes itself), never from console text.

The record is copied once out of memory the calling VTL may read, then validated;
a guest cannot make the VMM read memory on its behalf that it could not read
itself, nor grow the VMM's memory without bound (a per-run budget of records and
data bytes; past it the guest gets VTL_E_NO_RESOURCES).
"""

from __future__ import annotations

import struct
import threading

from pydantic import BaseModel

from vmm.memattr import NR
from vmm.memory import PAGE_SIZE
from vtl.abi import ABI, abi_ffi
from vtl.core.events import EventLog, GuestReport
from vtl.core.partition import Partition
from vtl.core.vtl import Vtl

RECORD_SIZE = abi_ffi.sizeof("struct vtl_report")
KINDS = {ABI.VTL_REPORT_RESULT: "result", ABI.VTL_REPORT_TARGET: "target", ABI.VTL_REPORT_MSR: "msr",
         ABI.VTL_REPORT_STATUS: "status", ABI.VTL_REPORT_FAULT: "fault", ABI.VTL_REPORT_VALUE: "value",
         ABI.VTL_REPORT_STAMPS: "stamps", ABI.VTL_REPORT_EXEC: "exec", ABI.VTL_REPORT_BYTES: "bytes",
         ABI.VTL_REPORT_REGISTER: "register"}
MAX_REPORTS = 10_000
MAX_DATA_BYTES = 32 << 20
_NAME = slice(8, 40)
_VALUES = slice(40, 72)
_DATA = slice(72, 88)
_TEXT = slice(88, 152)


class Report(BaseModel):
    vp: int
    vtl: int
    kind: str
    name: str
    value: list[int]
    text: str = ""
    data: bytes = b""

    def u64s(self) -> list[int]:
        """STAMPS data as integers."""
        return list(struct.unpack(f"<{len(self.data) // 8}Q", self.data))


class ReportError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _cstr(raw: bytes, what: str) -> str:
    if b"\0" not in raw:
        raise ReportError(int(ABI.VTL_E_INVALID_ARG), f"report {what} is not NUL-terminated")
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Reports:
    def __init__(self, partition: Partition, events: EventLog) -> None:
        self.p, self.events = partition, events
        self.records: list[Report] = []
        self.data_bytes = 0
        self.last_error = ""      # why the last report was refused, for the event
        self._lock = threading.Lock()

    def readable(self, vtl: Vtl, gpa: int, length: int) -> bool:
        """May `vtl` read [gpa, gpa+length)?  VTL0: its own memory and no page VTL1 made NR."""
        lay = self.p.layout
        if vtl == Vtl.VTL1:
            return lay.in_memory(gpa, length)
        if not lay.in_vtl0(gpa, length):
            return False
        first, last = gpa // PAGE_SIZE, (gpa + max(length, 1) - 1) // PAGE_SIZE
        return not any(a & NR for a in self.p.vtl0_attrs[first:last + 1])

    def receive(self, vp: int, vtl: Vtl, gpa: int) -> int:
        """VTL_HC_REPORT from `vtl` with RDI = `gpa`; returns the status for RAX."""
        with self._lock:                    # the budget is the partition's, across VPs
            try:
                report = self._read(vp, vtl, gpa)
            except ReportError as e:
                self.last_error = str(e)
                return e.status
            self.records.append(report)
        self.events.emit(GuestReport(ts=self.events.now(), vp=vp, vtl=vtl, report=report.kind,
                                     name=report.name, value=report.value, text=report.text))
        return int(ABI.VTL_OK)

    def _read(self, vp: int, vtl: Vtl, gpa: int) -> Report:
        if len(self.records) >= MAX_REPORTS:
            raise ReportError(int(ABI.VTL_E_NO_RESOURCES), f"more than {MAX_REPORTS} reports in one run")
        if not self.readable(vtl, gpa, RECORD_SIZE):
            raise ReportError(int(ABI.VTL_E_OUT_OF_RANGE),
                              f"report at {gpa:#x} is not memory VTL{int(vtl)} may read")
        raw = self.p.mem.read(gpa, RECORD_SIZE)        # one copy: the guest cannot change it under us
        kind_code = int.from_bytes(raw[0:4], "little")
        if int.from_bytes(raw[4:8], "little"):
            raise ReportError(int(ABI.VTL_E_INVALID_ARG), "report reserved0 is not 0")
        kind = KINDS.get(kind_code)
        if kind is None:
            raise ReportError(int(ABI.VTL_E_INVALID_ARG), f"unknown report kind {kind_code}")
        name, text = _cstr(raw[_NAME], "name"), _cstr(raw[_TEXT], "text")
        value = list(struct.unpack("<4Q", raw[_VALUES]))
        data_gpa, count = struct.unpack("<2Q", raw[_DATA])
        data = b""
        if kind in ("stamps", "bytes"):
            limit, unit = ((ABI.VTL_REPORT_MAX_STAMPS, 8) if kind == "stamps"
                           else (ABI.VTL_REPORT_MAX_BYTES, 1))
            if count > limit:
                raise ReportError(int(ABI.VTL_E_INVALID_ARG), f"{count} {kind} items, at most {limit}")
            if self.data_bytes + count * unit > MAX_DATA_BYTES:
                raise ReportError(int(ABI.VTL_E_NO_RESOURCES), f"more than {MAX_DATA_BYTES} report bytes")
            if not self.readable(vtl, data_gpa, count * unit):
                raise ReportError(int(ABI.VTL_E_OUT_OF_RANGE),
                                  f"report data at {data_gpa:#x} is not memory VTL{int(vtl)} may read")
            data = self.p.mem.read(data_gpa, count * unit)
            self.data_bytes += len(data)
        return Report(vp=vp, vtl=int(vtl), kind=kind, name=name, value=value, text=text, data=data)

    def state(self) -> list[dict[str, object]]:
        """The records as JSON for a snapshot (data as hex)."""
        return [{**r.model_dump(exclude={"data"}), "data": r.data.hex()} for r in self.records]

    def load(self, saved: object) -> None:
        """A snapshot's records, within the same budget as the guest's (ValueError if not)."""
        if not isinstance(saved, list) or len(saved) > MAX_REPORTS:
            raise ValueError(f"the reports are not a list of at most {MAX_REPORTS}")
        records = []
        for d in saved:
            if not isinstance(d, dict) or not isinstance(d.get("data"), str):
                raise ValueError("a report is malformed")
            records.append(Report(**{**d, "data": bytes.fromhex(d["data"])}))
        data_bytes = sum(len(r.data) for r in records)
        if data_bytes > MAX_DATA_BYTES or any(r.kind not in KINDS.values() for r in records):
            raise ValueError("the reports exceed the run's budget or name an unknown kind")
        self.records, self.data_bytes = records, data_bytes

    def of_kind(self, kind: str) -> list[Report]:
        return [r for r in self.records if r.kind == kind]
