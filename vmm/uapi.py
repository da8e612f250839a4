"""cffi declarations for the subset of the KVM uAPI this project uses.

ABI mode: the layouts below are written out by hand and checked against the
machine's <linux/kvm.h> by tests/test_uapi_layout.py.  Structures that newer
kernels have but this machine's headers lack (memory attributes, the
memory-fault exit) follow Documentation/virt/kvm/api.rst.
"""

from __future__ import annotations

from typing import Any

import cffi

CDEF = r"""
struct kvm_userspace_memory_region {
    uint32_t slot; uint32_t flags;
    uint64_t guest_phys_addr; uint64_t memory_size; uint64_t userspace_addr;
};
struct kvm_enable_cap { uint32_t cap; uint32_t flags; uint64_t args[4]; uint8_t pad[64]; };
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
};
struct kvm_segment {
    uint64_t base; uint32_t limit; uint16_t selector; uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl; uint8_t unusable; uint8_t padding;
};
struct kvm_dtable { uint64_t base; uint16_t limit; uint16_t padding[3]; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};
struct kvm_vcpu_events {
    struct { uint8_t injected; uint8_t nr; uint8_t has_error_code; uint8_t pending; uint32_t error_code; } exception;
    struct { uint8_t injected; uint8_t nr; uint8_t soft; uint8_t shadow; } interrupt;
    struct { uint8_t injected; uint8_t pending; uint8_t masked; uint8_t pad; } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct { uint8_t smm; uint8_t pending; uint8_t smm_inside_nmi; uint8_t latched_init; } smi;
    struct { uint8_t pending; } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};
struct kvm_sync_regs { struct kvm_regs regs; struct kvm_sregs sregs; struct kvm_vcpu_events events; };
struct kvm_debug_exit_arch { uint32_t exception; uint32_t pad; uint64_t pc; uint64_t dr6; uint64_t dr7; };
struct kvm_guest_debug_arch { uint64_t debugreg[8]; };
struct kvm_guest_debug { uint32_t control; uint32_t pad; struct kvm_guest_debug_arch arch; };
struct kvm_msr_filter_range { uint32_t flags; uint32_t nmsrs; uint32_t base; uint8_t *bitmap; };
struct kvm_msr_filter { uint32_t flags; struct kvm_msr_filter_range ranges[16]; };
struct kvm_msr_entry { uint32_t index; uint32_t reserved; uint64_t data; };
struct kvm_msrs { uint32_t nmsrs; uint32_t pad; struct kvm_msr_entry entries[]; };
struct kvm_cpuid_entry2 {
    uint32_t function; uint32_t index; uint32_t flags;
    uint32_t eax; uint32_t ebx; uint32_t ecx; uint32_t edx; uint32_t padding[3];
};
struct kvm_cpuid2 { uint32_t nent; uint32_t padding; struct kvm_cpuid_entry2 entries[]; };
struct kvm_fpu {
    uint8_t fpr[8][16]; uint16_t fcw; uint16_t fsw; uint8_t ftwx; uint8_t pad1;
    uint16_t last_opcode; uint64_t last_ip; uint64_t last_dp;
    uint8_t xmm[16][16]; uint32_t mxcsr; uint32_t pad2;
};
struct kvm_debugregs { uint64_t db[4]; uint64_t dr6; uint64_t dr7; uint64_t flags; uint64_t reserved[9]; };
struct kvm_xsave { uint32_t region[1024]; };
struct kvm_lapic_state { char regs[1024]; };
struct kvm_mp_state { uint32_t mp_state; };
struct kvm_msr_list { uint32_t nmsrs; uint32_t indices[]; };
struct kvm_xcr { uint32_t xcr; uint32_t reserved; uint64_t value; };
struct kvm_xcrs { uint32_t nr_xcrs; uint32_t flags; struct kvm_xcr xcrs[16]; uint64_t padding[16]; };
struct kvm_translation {
    uint64_t linear_address; uint64_t physical_address;
    uint8_t valid; uint8_t writeable; uint8_t usermode; uint8_t pad[5];
};
/* Not in this machine's headers: from api.rst (6.8+). */
struct kvm_memory_attributes { uint64_t address; uint64_t size; uint64_t attributes; uint64_t flags; };

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } mmio;
        struct { uint64_t nr; uint64_t args[6]; uint64_t ret; uint32_t longmode; uint32_t pad; } hypercall;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t suberror; uint32_t ndata; uint64_t flags; uint8_t insn_size; uint8_t insn_bytes[15]; } emulation_failure;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint8_t error; uint8_t pad[7]; uint32_t reason; uint32_t index; uint64_t data; } msr;
        struct { uint64_t flags; uint64_t gpa; uint64_t size; } memory_fault;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];
    } s;
};

int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int mprotect(void *addr, size_t len, int prot);
int madvise(void *addr, size_t length, int advice);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)
libc: Any = ffi.dlopen(None)

# Hot-path bindings that take addresses as integers, so that a caller holding a host
# address skips building a pointer object per call (x86-64: same registers as void *).
_hot = cffi.FFI()
_hot.cdef("int mprotect(uintptr_t addr, size_t len, int prot);")
hotlib: Any = _hot.dlopen(None)

# --- ioctl number encoding (asm-generic/ioctl.h) --------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_RUN = _io(0x80)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_TRANSLATE = _iowr(0x85, "struct kvm_translation")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_X86_SET_MSR_FILTER = _iow(0xC6, "struct kvm_msr_filter")
KVM_SET_MEMORY_ATTRIBUTES = _iow(0xD2, "struct kvm_memory_attributes")

# --- constants ---------------------------------------------------------------
KVM_API_VERSION = 12

KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_DEBUGREGS = 50
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_HYPERV = 44
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SYNC_REGS = 74
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_EXCEPTION_PAYLOAD = 164
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_MEMORY_ATTRIBUTES = 233

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_MEMORY_FAULT = 39

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_MAX_XCRS = 16
KVM_MP_STATE_RUNNABLE = 0

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x00000001
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x00000002
KVM_VCPUEVENT_VALID_SHADOW = 0x00000004
KVM_VCPUEVENT_VALID_SMM = 0x00000008
KVM_VCPUEVENT_VALID_PAYLOAD = 0x00000010

KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1
KVM_MSR_FILTER_MAX_RANGES = 16

KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
# The VSM series' RWX attributes (seed 004); never in mainline headers.
KVM_MEMORY_ATTRIBUTE_NR = 1 << 0
KVM_MEMORY_ATTRIBUTE_NW = 1 << 1
KVM_MEMORY_ATTRIBUTE_NX = 1 << 2
KVM_MEMORY_EXIT_FLAG_READ = 1 << 0
KVM_MEMORY_EXIT_FLAG_WRITE = 1 << 1
KVM_MEMORY_EXIT_FLAG_EXEC = 1 << 2

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

# mmap / mprotect / madvise
PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 0x01, 0x02, 0x20, 0x4000
MADV_DONTNEED = 4
MAP_FAILED = 2**64 - 1
