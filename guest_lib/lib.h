/* Freestanding support shared by the VTL0 and VTL1 kernels. */
#ifndef GUEST_LIB_H
#define GUEST_LIB_H

#include <stddef.h>
#include <stdint.h>
#include "vtl_abi.h"

/* ---- port I/O: always the immediate form, so no shared register is clobbered ---- */
#define OUTB_IMM(port, val) asm volatile("outb %%al, %[p]" :: "a"((uint8_t)(val)), [p] "i"(port) : "memory")

static inline uint64_t hypercall(uint64_t code, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t *rdx_out)
{
	register uint64_t rdx asm("rdx") = a3;
	uint64_t rax = code;
	asm volatile("outb %%al, %[p]"
		     : "+a"(rax), "+r"(rdx)
		     : [p] "i"(VTL_PORT_HYPERCALL), "D"(a1), "S"(a2)
		     : "memory");
	if (rdx_out)
		*rdx_out = rdx;
	return rax;
}

/* VTL call: RAX = code, RCX = arg, RDI = arg2.  VTL1 may change any shared register. */
static inline uint64_t vtl_call(uint64_t code, uint64_t arg, uint64_t arg2, uint64_t *rcx_out)
{
	uint64_t rax = code, rcx = arg;
	register uint64_t rdi asm("rdi") = arg2;
	asm volatile("outb %%al, %[p]"
		     : "+a"(rax), "+c"(rcx), "+r"(rdi)
		     : [p] "i"(VTL_PORT_CALL)
		     : "rdx", "rsi", "r8", "r9", "r10", "r11", "memory");
	if (rcx_out)
		*rcx_out = rcx;
	return rax;
}

/* VTL call with four arguments: RCX, RDI, RDX, RSI.  RCX comes back in *rcx_out. */
static inline uint64_t vtl_call4(uint64_t code, uint64_t rcx_in, uint64_t rdi_in, uint64_t rdx_in,
				 uint64_t rsi_in, uint64_t *rcx_out)
{
	uint64_t rax = code, rcx = rcx_in;
	register uint64_t rdi asm("rdi") = rdi_in;
	register uint64_t rdx asm("rdx") = rdx_in;
	register uint64_t rsi asm("rsi") = rsi_in;
	asm volatile("outb %%al, %[p]"
		     : "+a"(rax), "+c"(rcx), "+r"(rdi), "+r"(rdx), "+r"(rsi)
		     : [p] "i"(VTL_PORT_CALL)
		     : "r8", "r9", "r10", "r11", "memory");
	if (rcx_out)
		*rcx_out = rcx;
	return rax;
}

/* ---- console (for people; the VMM tags lines with their VTL) and exit ---- */
void console_putc(char c);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void print_hex_bytes(const uint8_t *p, size_t n);
void __attribute__((noreturn)) guest_exit(uint32_t status);

/* ---- CPU setup ---- */
#define KERNEL_CS 0x08
#define KERNEL_DS 0x10
#define USER_DS   0x1B
#define USER_CS   0x23
#define TSS_SEL   0x28
#define LDT_SEL   0x38        /* an LDT descriptor (LDTR stays 0 unless someone loads it) */
#define TSS2_SEL  0x48        /* a second, available TSS descriptor (TR stays TSS_SEL) */
void arch_init(void);         /* GDT with user segments, a TSS, an LDT and a spare TSS; IDT for vectors 0-31 */
void arch_init_ap(void);      /* an AP: load the boot VP's GDT and IDT (no TR)        */
extern volatile uint64_t skip_vtl_return_ud;   /* arch.c: #UD at a VTL0 VTL-return OUT resumes after it */

struct regs_frame {           /* what the exception stubs push, lowest address first */
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t vector, error_code;
	uint64_t rip, cs, rflags, rsp, ss;
};

struct fault_info {
	int vector;
	uint64_t error_code, rip, cs, cr2;
};
/* Run fn(arg); if it faults, record the fault and return 1 instead (kvm-unit-tests style).
 * Per VP: each VP's faults are caught by its own try_run (cpu_index()). */
int try_run(void (*fn)(void *), void *arg, struct fault_info *fi);
uint32_t cpu_index(void);     /* the running VP's index (weak default 0; each kernel's own) */
const char *vector_name(int vector);

/* ---- report channel (guest_lib/report.c; docs/abi.md "Report channel") ----
 * Each fills a struct vtl_report (on the stack: identity-mapped, so its address is its
 * GPA) and issues VTL_HC_REPORT; returns the VMM's status (VTL_OK when recorded).
 * Names are cut to 31 bytes, texts to 63. */
uint64_t report_send(const struct vtl_report *r);
uint64_t report(uint32_t kind, const char *name, uint64_t v0, uint64_t v1, uint64_t v2, uint64_t v3,
		const char *text);
uint64_t report_result(const char *name, int ok, const char *why);   /* value[0] = ok ? 0 : 1 */
uint64_t report_target(const char *name, uint64_t gpa, uint64_t len, uint64_t old);
uint64_t report_msr(const char *name, uint32_t index, uint64_t old);
uint64_t report_status(const char *name, uint64_t code, uint64_t status);
uint64_t report_fault(const char *name, const struct fault_info *fi);
uint64_t report_value(const char *name, uint64_t value);
uint64_t report_stamps(const char *name, const uint64_t *stamps, uint64_t count, uint64_t per_stamp);
/* EXEC: code planted at gva/gpa; if it runs it stores marker_value into the 8 bytes at
 * marker_gpa (0: no marker).  The VMM reads the marker back after the run. */
uint64_t report_exec(const char *name, uint64_t gva, uint64_t gpa, uint64_t marker_gpa, uint64_t marker_value);
/* REGISTER: VTL_REG_* and its value before the attack (GDTR/IDTR: base, and limit). */
uint64_t report_register(const char *name, uint32_t reg, uint64_t old, uint64_t limit);
uint64_t report_bytes(const char *name, const void *p, uint64_t n);
const char *vtl_status_name(uint64_t status);   /* "VTL_OK", "VTL_E_POLICY", ... */

/* ---- paging: identity map of [0, mem_size), 4 KiB pages below 16 MiB ---- */
void paging_init(uint64_t mem_size);
void paging_load(void);           /* an AP: load the tables paging_init built */
uint64_t *pte_for(uint64_t va);   /* leaf PTE of a 4 KiB-mapped address, or NULL */
void paging_set_nx_except(uint64_t x_start, uint64_t x_end);

/* ---- the privileged section (guest_lib/priv.S): every instruction that writes CR0, CR3,
 * CR4, XCR0, GDTR, IDTR, LDTR or TR lives there and nowhere else.  VTL1 checks that at
 * VTL_CALL_LOCK_PAGE_TABLES (docs/writing-guests.md, "Register pinning"). ---- */
struct __attribute__((packed)) desc_ptr {
	uint16_t limit;
	uint64_t base;
};
void priv_write_cr0(uint64_t v);
void priv_write_cr3(uint64_t v);
void priv_write_cr4(uint64_t v);
void priv_lgdt(const struct desc_ptr *p);
void priv_lidt(const struct desc_ptr *p);
void priv_lldt(uint16_t sel);
void priv_ltr(uint16_t sel);
void priv_lmsw(uint16_t v);
void priv_clts(void);
void priv_xsetbv(uint32_t index, uint64_t v);

/* ---- registers and helpers ---- */
#define CR0_PE   (UINT64_C(1) << 0)
#define CR0_MP   (UINT64_C(1) << 1)
#define CR0_TS   (UINT64_C(1) << 3)
#define CR0_WP   (UINT64_C(1) << 16)
#define CR0_PG   (UINT64_C(1) << 31)
#define CR4_MCE  (UINT64_C(1) << 6)
#define CR4_PGE  (UINT64_C(1) << 7)
#define CR4_PCE  (UINT64_C(1) << 8)
#define CR4_UMIP (UINT64_C(1) << 11)
#define CR4_VMXE (UINT64_C(1) << 13)
#define CR4_OSXSAVE (UINT64_C(1) << 18)
#define CR4_SMEP (UINT64_C(1) << 20)
#define CR4_SMAP (UINT64_C(1) << 21)
#define XCR0_X87 (UINT64_C(1) << 0)
#define XCR0_SSE (UINT64_C(1) << 1)
#define XCR0_AVX (UINT64_C(1) << 2)
static inline void sgdt(struct desc_ptr *p) { asm volatile("sgdt %0" : "=m"(*p)); }
static inline void sidt(struct desc_ptr *p) { asm volatile("sidt %0" : "=m"(*p)); }
static inline uint16_t read_ldtr(void) { uint16_t v; asm volatile("sldt %0" : "=r"(v)); return v; }
static inline uint16_t read_tr(void) { uint16_t v; asm volatile("str %0" : "=r"(v)); return v; }
static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline uint64_t read_cr2(void) { uint64_t v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr0(void) { uint64_t v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr3(void) { uint64_t v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline uint64_t read_cr4(void) { uint64_t v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr3(uint64_t v) { priv_write_cr3(v); }
static inline uint64_t read_rflags(void) { uint64_t v; asm volatile("pushfq; popq %0" : "=r"(v)); return v; }
static inline uint64_t rdtsc(void) { uint32_t lo, hi; asm volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((uint64_t)hi << 32) | lo; }
#define MSR_GS_BASE 0xC0000101
/* The MSRs VTL1 pins and the EFER bits its policy names (both kernels use them). */
#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_CSTAR 0xC0000083
#define MSR_SFMASK 0xC0000084
#define MSR_SYSENTER_CS 0x174
#define MSR_SYSENTER_ESP 0x175
#define MSR_SYSENTER_EIP 0x176
#define EFER_SCE (1ULL << 0)
#define EFER_LME (1ULL << 8)
#define EFER_NXE (1ULL << 11)
static inline void wrmsr(uint32_t msr, uint64_t v)
{
	asm volatile("wrmsr" :: "c"(msr), "a"((uint32_t)v), "d"((uint32_t)(v >> 32)) : "memory");
}
static inline uint64_t rdmsr(uint32_t msr)
{
	uint32_t lo, hi;
	asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((uint64_t)hi << 32) | lo;
}
static inline void invlpg(uint64_t va) { asm volatile("invlpg (%0)" :: "r"(va) : "memory"); }

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
int strcmp(const char *a, const char *b);
size_t strlen(const char *s);

#endif
