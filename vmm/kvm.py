"""KVM system, VM and vCPU file descriptors.

Thin wrappers: every ioctl failure raises KvmIoctlError naming the ioctl and
errno.  Hot-path users (the run loop) reach `VCpu.run` (the mmapped kvm_run),
`VCpu.words` and `VCpu.fd` directly; everything else runs a vCPU with
`VCpu.run_once()`, which returns a typed exit (vmm.exits).
"""

from __future__ import annotations

import errno
import heapq
import os
from dataclasses import dataclass
from typing import Any

from vmm import exits
from vmm import uapi as u
from vmm.errors import KvmIoctlError, KvmUnavailable, VmmError
from vmm.memory import HostMapping
from vmm.uapi import ffi, libc

# ioctl numbers -> names for errors: _IOR/_IOW/_IOWR numbers (above 0xFFFF) and the bare
# _IO(KVMIO, n) ones (0xAE00-0xAEFF: KVM_GET_API_VERSION, KVM_RUN, ...), not the small
# constants (capabilities, exit reasons) that share the KVM_ prefix.
_IOCTL_NAMES = {v: k for k, v in vars(u).items()
                if k.startswith("KVM_") and isinstance(v, int) and (v > 0xFFFF or v >> 8 == 0xAE)}


def ioctl(fd: int, request: int, arg: Any = 0, name: str | None = None) -> int:
    """ioctl(2) through cffi; returns the result or raises KvmIoctlError."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    ret: int = libc.ioctl(fd, request, arg)
    if ret < 0:
        raise KvmIoctlError(name or _IOCTL_NAMES.get(request, hex(request)), ffi.errno)
    return ret


def kvm_device() -> str:
    """The KVM device this process uses: $VTL_KVM_DEVICE, else /dev/kvm."""
    return os.environ.get("VTL_KVM_DEVICE") or "/dev/kvm"


def _open_kvm(path: str) -> tuple[int, str | None]:
    """Open `path` and ask it KVM_GET_API_VERSION: (fd, None) if it is a KVM this VMM
    speaks, else (-1, one sentence saying why not).  The open cannot block (O_NONBLOCK:
    a FIFO or a tty given as the device) and the probe is the real one: a file that exists
    but is no KVM (ENOTTY) is as unusable as none."""
    if not os.path.exists(path):
        return -1, (f"{path} does not exist: this host has no KVM (enable virtualization, "
                    "load kvm_intel/kvm_amd, or run inside a VM with nested virtualization)")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            return -1, (f"{path} exists but this user may not open it ({e.strerror}): "
                        "add the user to the 'kvm' group or run as root")
        return -1, f"{path} cannot be opened: {e.strerror}"
    version = libc.ioctl(fd, u.KVM_GET_API_VERSION, ffi.cast("unsigned long", 0))
    if version < 0:
        err = ffi.errno
        os.close(fd)
        return -1, (f"{path} is not a KVM device (KVM_GET_API_VERSION: "
                    f"{errno.errorcode.get(err, str(err))})")
    if version != u.KVM_API_VERSION:
        os.close(fd)
        return -1, f"{path} speaks KVM API {version}, this VMM needs {u.KVM_API_VERSION}"
    os.set_blocking(fd, True)
    return fd, None


def kvm_unavailable_reason(path: str | None = None) -> str | None:
    """One sentence saying why KVM cannot be used here (the device of kvm_device() unless
    `path` is given), or None if it answers KVM_GET_API_VERSION as this VMM needs."""
    fd, reason = _open_kvm(path or kvm_device())
    if fd >= 0:
        os.close(fd)
    return reason


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str | None = None) -> None:
        path = path or kvm_device()
        self.fd, reason = _open_kvm(path)
        if reason is not None:
            raise KvmUnavailable(reason)
        self.vcpu_mmap_size = ioctl(self.fd, u.KVM_GET_VCPU_MMAP_SIZE)
        self._cpuid: Any = None
        self._msr_list: list[int] | None = None

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap)

    def supported_cpuid(self) -> Any:
        """KVM_GET_SUPPORTED_CPUID, cached (a struct kvm_cpuid2 *)."""
        if self._cpuid is None:
            nent = 64
            while True:
                cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": nent, "entries": nent})
                cpuid.nent = nent
                if libc.ioctl(self.fd, u.KVM_GET_SUPPORTED_CPUID, cpuid) == 0:
                    break
                if ffi.errno != errno.E2BIG or nent > 4096:
                    raise KvmIoctlError("KVM_GET_SUPPORTED_CPUID", ffi.errno)
                nent *= 2
            self._cpuid = cpuid
        return self._cpuid

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU (cached)."""
        if self._msr_list is None:
            n = 256
            while True:
                lst = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
                lst.nmsrs = n
                if libc.ioctl(self.fd, u.KVM_GET_MSR_INDEX_LIST, lst) == 0:
                    break
                if ffi.errno != errno.E2BIG or n > 65536:
                    raise KvmIoctlError("KVM_GET_MSR_INDEX_LIST", ffi.errno)
                n = int(lst.nmsrs) if int(lst.nmsrs) > n else n * 2
            self._msr_list = [int(lst.indices[i]) for i in range(int(lst.nmsrs))]
        return list(self._msr_list)

    def create_vm(self) -> Vm:
        return Vm(self, ioctl(self.fd, u.KVM_CREATE_VM, 0))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """One KVM VM.  Memslots are tracked so that they can be listed and removed."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, tuple[int, int, int]] = {}  # slot -> (gpa, size, flags)
        # Slot ids: the lowest freed id first (a heap), else the next never-used one, so
        # that allocation is O(log n) however many slots are in use.  Ids stay dense
        # because KVM bounds them (KVM_CAP_NR_MEMSLOTS).
        self._free_slots: list[int] = []
        self._next_slot = 0
        self.vcpus: list[VCpu] = []
        # Intel VMX wants a TSS area; harmless elsewhere.
        try:
            ioctl(self.fd, u.KVM_SET_TSS_ADDR, 0xFFFBD000)
        except KvmIoctlError:
            pass

    def check_extension(self, cap: int) -> int:
        return ioctl(self.fd, u.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        ec = ffi.new("struct kvm_enable_cap *")
        ec.cap = cap
        for i, a in enumerate(args):
            ec.args[i] = a
        ioctl(self.fd, u.KVM_ENABLE_CAP, ec, f"KVM_ENABLE_CAP({cap})")

    def _take_slot(self) -> int:
        free = self._free_slots
        while free:
            slot = heapq.heappop(free)
            if slot not in self.slots:      # else stale: reused explicitly via map_memory(slot=)
                return slot
        while self._next_slot in self.slots:
            self._next_slot += 1
        self._next_slot += 1
        return self._next_slot - 1

    def _give_back_slot(self, slot: int) -> None:
        # Ids at or past the counter are handed out by the counter itself.
        if slot < self._next_slot:
            heapq.heappush(self._free_slots, slot)

    def map_memory(self, mem: HostMapping, gpa: int, size: int, readonly: bool = False,
                   slot: int | None = None) -> int:
        """Map mem[gpa:gpa+size] at the same GPA in this VM; returns the slot.  `mem` is a
        GuestMemory or one of its aliases (GuestMemory.alias()).  `slot` picks the id (it
        must be free); by default the lowest free id is used."""
        mem.check(gpa, size)
        if size <= 0 or gpa % 4096 or size % 4096:
            raise VmmError(f"memslot {gpa:#x}+{size:#x} is not a positive, page-aligned range")
        flags = u.KVM_MEM_READONLY if readonly else 0
        if slot is not None:
            if slot in self.slots or slot < 0:
                raise VmmError(f"memslot {slot} is in use or invalid")
            self._set_region(slot, flags, gpa, size, mem.host_addr + gpa)
        else:
            slot = self._take_slot()
            try:
                self._set_region(slot, flags, gpa, size, mem.host_addr + gpa)
            except BaseException:
                self._give_back_slot(slot)
                raise
        self.slots[slot] = (gpa, size, flags)
        return slot

    def unmap_slot(self, slot: int) -> None:
        """Delete a memslot.  If KVM refuses, the slot stays mapped and recorded."""
        if slot not in self.slots:
            raise VmmError(f"memslot {slot} is not mapped")
        gpa, _size, flags = self.slots[slot]
        self._set_region(slot, flags, gpa, 0, 0)
        del self.slots[slot]
        self._give_back_slot(slot)

    def _set_region(self, slot: int, flags: int, gpa: int, size: int, hva: int) -> None:
        """The one place memslots change (KVM_SET_USER_MEMORY_REGION; size 0 deletes)."""
        r = ffi.new("struct kvm_userspace_memory_region *")
        r.slot, r.flags, r.guest_phys_addr, r.memory_size, r.userspace_addr = slot, flags, gpa, size, hva
        ioctl(self.fd, u.KVM_SET_USER_MEMORY_REGION, r,
              f"KVM_SET_USER_MEMORY_REGION(slot {slot}, gpa {gpa:#x}, size {size:#x})")

    def set_msr_filter(self, deny_write: list[int], deny_read: list[int] | None = None) -> Any:
        """Default-allow filter denying the listed MSRs; denied accesses exit to userspace.

        Returns the cffi objects that must stay alive (KVM copies the bitmaps,
        but keep them anyway for inspection)."""
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = u.KVM_MSR_FILTER_DEFAULT_ALLOW
        keep = []
        ranges = [(m, u.KVM_MSR_FILTER_WRITE) for m in deny_write]
        ranges += [(m, u.KVM_MSR_FILTER_READ) for m in (deny_read or [])]
        if len(ranges) > u.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError("too many MSR filter ranges")
        for i, (msr, kind) in enumerate(ranges):
            bitmap = ffi.new("uint8_t[1]", [0])  # bit 0 clear: deny
            keep.append(bitmap)
            f.ranges[i].flags = kind
            f.ranges[i].nmsrs = 1
            f.ranges[i].base = msr
            f.ranges[i].bitmap = bitmap
        ioctl(self.fd, u.KVM_X86_SET_MSR_FILTER, f)
        return (f, keep)

    def set_memory_attributes(self, gpa: int, size: int, attributes: int) -> None:
        a = ffi.new("struct kvm_memory_attributes *")
        a.address, a.size, a.attributes = gpa, size, attributes
        ioctl(self.fd, u.KVM_SET_MEMORY_ATTRIBUTES, a)

    def create_vcpu(self, index: int) -> VCpu:
        vcpu = VCpu(self, index, ioctl(self.fd, u.KVM_CREATE_VCPU, index))
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# MSRs a vCPU's reset state does not define: the time-stamp counter and its adjust MSR
# run on across INIT (SDM vol. 3, "IA-32 processor states following power-up, reset, or
# INIT": INIT leaves the TSC alone), so a state restored from ResetState keeps them.
MSR_TSC, MSR_TSC_ADJUST = 0x10, 0x3B
TIME_MSRS = frozenset({MSR_TSC, MSR_TSC_ADJUST})


@dataclass(frozen=True)
class ResetState:
    """A vCPU's state as KVM creates it (kvm_vcpu_reset: the RESET state), captured before
    it first runs: what a vCPU that has run can be put back to without a new VM."""
    regs: bytes
    sregs: bytes
    events: bytes
    debugregs: bytes
    xsave: bytes
    xcrs: dict[int, int]
    msrs: dict[int, int]          # every MSR of KVM_GET_MSR_INDEX_LIST KVM reported


class VCpu:
    """One vCPU and its mmapped kvm_run, with KVM_CAP_SYNC_REGS enabled for every exit."""

    SYNC_ALL = u.KVM_SYNC_X86_REGS | u.KVM_SYNC_X86_SREGS | u.KVM_SYNC_X86_EVENTS

    def __init__(self, vm: Vm, index: int, fd: int) -> None:
        self.vm = vm
        self.index = index
        self.fd = fd
        size = vm.kvm.vcpu_mmap_size
        ptr = libc.mmap(ffi.NULL, size, u.PROT_READ | u.PROT_WRITE, u.MAP_SHARED, fd, 0)
        if int(ffi.cast("uintptr_t", ptr)) == u.MAP_FAILED:
            raise KvmIoctlError("mmap(vcpu kvm_run)", ffi.errno)
        self._map = ptr
        self._map_size = size
        self.run: Any = ffi.cast("struct kvm_run *", ptr)
        self.run_buf = ffi.buffer(ptr, size)
        self.sync: Any = self.run.s.regs  # struct kvm_sync_regs, valid after every exit
        # Pre-resolved views for hot paths: each cffi attribute hop costs a wrapper object.
        self.regs: Any = self.sync.regs
        self.sregs: Any = self.sync.sregs
        self.cs: Any = self.sregs.cs
        self.words: Any = ffi.cast("uint32_t *", ptr)   # [2] exit_reason, [8] io dir|size|port
        self.run.kvm_valid_regs = self.SYNC_ALL
        self.reset_state: ResetState | None = None     # capture_reset_state(), by its owner

    # --- state -------------------------------------------------------------
    def get_regs(self) -> Any:
        r = ffi.new("struct kvm_regs *")
        ioctl(self.fd, u.KVM_GET_REGS, r)
        return r

    def set_regs(self, r: Any) -> None:
        ioctl(self.fd, u.KVM_SET_REGS, r)

    def get_sregs(self) -> Any:
        s = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, u.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, s: Any) -> None:
        ioctl(self.fd, u.KVM_SET_SREGS, s)

    def get_events(self) -> Any:
        e = ffi.new("struct kvm_vcpu_events *")
        ioctl(self.fd, u.KVM_GET_VCPU_EVENTS, e)
        return e

    def set_events(self, e: Any) -> None:
        ioctl(self.fd, u.KVM_SET_VCPU_EVENTS, e)

    def get_fpu(self) -> Any:
        f = ffi.new("struct kvm_fpu *")
        ioctl(self.fd, u.KVM_GET_FPU, f)
        return f

    def set_fpu(self, f: Any) -> None:
        ioctl(self.fd, u.KVM_SET_FPU, f)

    def get_debugregs(self) -> Any:
        d = ffi.new("struct kvm_debugregs *")
        ioctl(self.fd, u.KVM_GET_DEBUGREGS, d)
        return d

    def set_debugregs(self, d: Any) -> None:
        ioctl(self.fd, u.KVM_SET_DEBUGREGS, d)

    def get_xsave(self) -> bytes:
        """KVM_GET_XSAVE: the legacy 4 KiB XSAVE image (x87, SSE, AVX, ...)."""
        x = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, u.KVM_GET_XSAVE, x)
        return bytes(ffi.buffer(x))

    def set_xsave(self, image: bytes) -> None:
        x = ffi.new("struct kvm_xsave *")
        ffi.memmove(x, image, min(len(image), ffi.sizeof(x[0])))
        ioctl(self.fd, u.KVM_SET_XSAVE, x)

    def get_mp_state(self) -> int:
        m = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, u.KVM_GET_MP_STATE, m)
        return int(m.mp_state)

    def set_mp_state(self, state: int) -> None:
        m = ffi.new("struct kvm_mp_state *")
        m.mp_state = state
        ioctl(self.fd, u.KVM_SET_MP_STATE, m)

    def set_cpuid(self, cpuid: Any) -> None:
        ioctl(self.fd, u.KVM_SET_CPUID2, cpuid)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = ioctl(self.fd, u.KVM_GET_MSRS, m)
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> None:
        m = ffi.new("struct kvm_msrs *", {"nmsrs": len(values), "entries": len(values)})
        m.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            m.entries[i].index = idx
            m.entries[i].data = val
        n = ioctl(self.fd, u.KVM_SET_MSRS, m)
        if n != len(values):
            raise KvmIoctlError("KVM_SET_MSRS", errno.EINVAL,
                                f"only {n} of {len(values)} MSRs accepted")

    def get_xcrs(self) -> dict[int, int]:
        """KVM_GET_XCRS: extended control registers by index (XCR0 at 0)."""
        x = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, u.KVM_GET_XCRS, x)
        return {int(x.xcrs[i].xcr): int(x.xcrs[i].value) for i in range(min(int(x.nr_xcrs), u.KVM_MAX_XCRS))}

    def set_xcrs(self, values: dict[int, int]) -> None:
        """KVM_SET_XCRS; KVM refuses (EINVAL) a value the guest's CPUID does not allow."""
        if len(values) > u.KVM_MAX_XCRS:
            raise VmmError(f"{len(values)} XCRs: KVM takes at most {u.KVM_MAX_XCRS}")
        x = ffi.new("struct kvm_xcrs *")
        x.nr_xcrs = len(values)
        for i, (index, value) in enumerate(values.items()):
            x.xcrs[i].xcr = index
            x.xcrs[i].value = value
        ioctl(self.fd, u.KVM_SET_XCRS, x)

    def capture_reset_state(self) -> ResetState:
        """The state of a vCPU that has not run yet (call it right after creation and
        KVM_SET_CPUID2)."""
        def raw(obj: Any) -> bytes:
            return bytes(ffi.buffer(obj))
        return ResetState(raw(self.get_regs()), raw(self.get_sregs()), raw(self.get_events()),
                          raw(self.get_debugregs()), self.get_xsave(), self.get_xcrs(),
                          self.get_msrs(self.vm.kvm.msr_index_list()))

    def load_reset_state(self, rs: ResetState, *, xcr0: int | None = None) -> None:
        """Put this vCPU back in `rs` without running it: the registers, segments and pending
        events through the synced registers (applied at the next KVM_RUN, which also drops a
        PIO it had left to complete since RIP moved), the debug registers, the FPU/XSAVE image,
        XCR0 (`xcr0` if given: carried instead) and every MSR KVM saves through their ioctls.
        The TSC and TSC_ADJUST run on (TIME_MSRS).  The caller then sets what it defines
        itself (a kernel's entry registers)."""
        ffi.memmove(ffi.addressof(self.regs), rs.regs, len(rs.regs))
        ffi.memmove(ffi.addressof(self.sregs), rs.sregs, len(rs.sregs))
        ev = self.sync.events
        ffi.memmove(ffi.addressof(ev), rs.events, len(rs.events))
        # Make KVM take every field: NMI pending, interrupt shadow, SIPI vector, SMM (as
        # KVM_GET_VCPU_EVENTS marked them valid at creation); no exception payload.
        ev.flags &= ~u.KVM_VCPUEVENT_VALID_PAYLOAD
        self.run.cr8 = 0
        self.run.request_interrupt_window = 0
        self.run.kvm_dirty_regs = self.SYNC_ALL
        d = ffi.new("struct kvm_debugregs *")
        ffi.memmove(d, rs.debugregs, len(rs.debugregs))
        self.set_debugregs(d)
        self.set_xsave(rs.xsave)
        xcrs = dict(rs.xcrs)
        if xcr0 is not None:
            xcrs[0] = xcr0
        self.set_xcrs(xcrs)
        keep = [i for i in rs.msrs if i not in TIME_MSRS]
        now = self.get_msrs(keep)
        changed = {i: rs.msrs[i] for i in keep if now.get(i) != rs.msrs[i]}
        if changed:
            self.set_msrs(changed)

    def set_single_step(self, enable: bool) -> None:
        d = ffi.new("struct kvm_guest_debug *")
        d.control = (u.KVM_GUESTDBG_ENABLE | u.KVM_GUESTDBG_SINGLESTEP) if enable else 0
        ioctl(self.fd, u.KVM_SET_GUEST_DEBUG, d)

    def tsc_khz(self) -> int:
        """The guest's TSC frequency (to turn guest RDTSC deltas into time)."""
        return ioctl(self.fd, u.KVM_GET_TSC_KHZ)

    def translate(self, gva: int) -> tuple[bool, int]:
        t = ffi.new("struct kvm_translation *")
        t.linear_address = gva
        ioctl(self.fd, u.KVM_TRANSLATE, t)
        return bool(t.valid), int(t.physical_address)

    def kvm_run(self) -> int:
        """One KVM_RUN; returns 0 or -errno (EINTR/EAGAIN are normal, not errors).
        The raw form for hot paths: the exit is read from `words` / `run`."""
        if libc.ioctl(self.fd, u.KVM_RUN, ffi.NULL) < 0:
            return -ffi.errno
        return 0

    def run_once(self) -> exits.VcpuExit:
        """One KVM_RUN, decoded into a typed exit (see vmm.exits); never raises for a
        KVM_RUN error, which becomes `RunError` (or `Interrupted`, `MemoryFault`).

        exit_reason is cleared first: KVM only writes it on -EFAULT when the fault
        is a KVM_EXIT_MEMORY_FAULT, so a stale value must not be mistaken for one."""
        self.run.exit_reason = u.KVM_EXIT_UNKNOWN
        return exits.from_result(self, self.kvm_run())

    def complete_pending_io(self) -> None:
        """Finish an in-flight PIO/MMIO emulation without entering the guest (api.rst)."""
        self.run.immediate_exit = 1
        rc = self.kvm_run()
        self.run.immediate_exit = 0
        if rc not in (0, -errno.EINTR):
            raise KvmIoctlError("KVM_RUN(immediate_exit)", -rc)

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Queue an exception for the next KVM_RUN through the synced events (no ioctl)."""
        ev = self.sync.events
        ev.exception.pending = 0
        ev.exception.injected = 1
        ev.exception.nr = vector
        ev.exception.has_error_code = 1 if error_code is not None else 0
        ev.exception.error_code = error_code or 0
        ev.flags = 0
        self.run.kvm_dirty_regs |= u.KVM_SYNC_X86_EVENTS

    def close(self) -> None:
        if self.fd >= 0:
            libc.munmap(self._map, self._map_size)
            os.close(self.fd)
            self.fd = -1
