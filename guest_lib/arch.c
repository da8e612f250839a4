/* GDT (kernel + user segments, TSS), IDT for the 32 exception vectors, and the
 * exception handler with kvm-unit-tests-style fault catching (try_run). */
#include "lib.h"

struct __attribute__((packed)) tss64 {
	uint32_t reserved0;
	uint64_t rsp[3];
	uint64_t reserved1;
	uint64_t ist[7];
	uint64_t reserved2;
	uint16_t reserved3;
	uint16_t iomap_base;   /* beyond the limit: no I/O bitmap, so CPL3 port I/O faults */
};

struct __attribute__((packed)) idt_gate {
	uint16_t off_lo, sel;
	uint8_t ist, type;
	uint16_t off_mid;
	uint32_t off_hi, zero;
};

/* The descriptor tables are __ro_after_init data: written here at boot, read-only for
 * VTL0 from END_OF_BOOT on (the CPU never writes them afterwards: every descriptor has
 * its Accessed bit preset, and the TSS is busy from the LTR below).  VTL1 links
 * .data..ro_after_init into its ordinary data. */
#define RO_AFTER_INIT __attribute__((section(".data..ro_after_init")))
/* In one page of their own: VTL1 makes the pages that pinned GDTR/IDTR/LDTR/TR read
 * read-only at the lock, and other ro_after_init data stays writable until END_OF_BOOT. */
static struct __attribute__((aligned(4096))) desc_tables {
	uint64_t gdt[11] __attribute__((aligned(16)));
	struct idt_gate idt[32] __attribute__((aligned(16)));
	struct tss64 tss __attribute__((aligned(16)));
	struct tss64 tss2 __attribute__((aligned(16)));
	uint64_t ldt[2] __attribute__((aligned(16)));
} tables RO_AFTER_INIT;          /* sizeof = 4096: nothing else shares the page */
#define gdt tables.gdt
#define idt tables.idt
#define tss tables.tss
#define tss2 tables.tss2
#define ldt tables.ldt
static uint8_t exception_stack[16384] __attribute__((aligned(16)));
static uint8_t df_stack[8192] __attribute__((aligned(16)));
extern uint64_t isr_table[32];

/* setjmp/longjmp pair in entry_common.S */
struct jmpbuf { uint64_t rbx, rbp, r12, r13, r14, r15, rsp, rip; };
int guest_setjmp(struct jmpbuf *jb) __attribute__((returns_twice));
void guest_longjmp(struct jmpbuf *jb, int val) __attribute__((noreturn));

/* One fault catcher per VP (VPs take faults at the same time): cpu_index() says which.
 * The weak default is for a kernel with one VP; VTL0 (guest_vtl0/smp.c) and VTL1
 * (guest_vtl1/main.c) tell it from the stack the code runs on. */
static struct jmpbuf fault_jb[VTL1_MAX_VPS];
static struct fault_info *volatile fault_out[VTL1_MAX_VPS];
static volatile int fault_armed[VTL1_MAX_VPS];

uint32_t __attribute__((weak)) cpu_index(void)
{
	return 0;
}

static uint32_t __attribute__((noinline)) this_cpu(void)
{
	uint32_t c = cpu_index();
	return c < VTL1_MAX_VPS ? c : 0;
}

/* A 16-byte system descriptor (TSS, LDT) at d[0..1]. */
static void system_desc(uint64_t *d, uint64_t base, uint64_t limit, uint64_t type)
{
	d[0] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (type << 40) | (((limit >> 16) & 0xF) << 48) |
	       (((base >> 24) & 0xFF) << 56);
	d[1] = base >> 32;
}

void arch_init(void)
{
	gdt[0] = 0;
	gdt[1] = 0x00AF9B000000FFFFULL;     /* 0x08 kernel code, 64-bit */
	gdt[2] = 0x00CF93000000FFFFULL;     /* 0x10 kernel data */
	gdt[3] = 0x00CFF3000000FFFFULL;     /* 0x18 user data, DPL3 */
	gdt[4] = 0x00AFFB000000FFFFULL;     /* 0x20 user code, DPL3, 64-bit */
	system_desc(&gdt[5], (uint64_t)&tss, sizeof(tss) - 1, 0x89);     /* 0x28 TSS, available */
	system_desc(&gdt[7], (uint64_t)ldt, sizeof(ldt) - 1, 0x82);      /* 0x38 LDT */
	system_desc(&gdt[9], (uint64_t)&tss2, sizeof(tss2) - 1, 0x89);   /* 0x48 spare TSS */
	ldt[0] = 0;
	ldt[1] = 0x00CF93000000FFFFULL;     /* an LDT data segment, never used */
	tss.rsp[0] = (uint64_t)(exception_stack + sizeof(exception_stack));
	tss.ist[0] = (uint64_t)(df_stack + sizeof(df_stack));
	tss.iomap_base = sizeof(tss);
	tss2.iomap_base = sizeof(tss2);

	/* Every descriptor-table write goes through the privileged section (guest_lib/priv.S). */
	struct desc_ptr g = { sizeof(gdt) - 1, (uint64_t)gdt };
	priv_lgdt(&g);
	asm volatile("pushq $0x08\n\t"
		     "leaq 1f(%%rip), %%rax\n\t"
		     "pushq %%rax\n\t"
		     "lretq\n"
		     "1:\n\t"
		     "movl $0x10, %%eax\n\t"
		     "movl %%eax, %%ds\n\tmovl %%eax, %%es\n\tmovl %%eax, %%ss\n\t"
		     "movl %%eax, %%fs\n\tmovl %%eax, %%gs"
		     ::: "rax", "memory");
	priv_ltr(TSS_SEL);

	for (int v = 0; v < 32; v++) {
		uint64_t h = isr_table[v];
		idt[v] = (struct idt_gate){
			.off_lo = h & 0xFFFF, .sel = KERNEL_CS, .ist = v == 8 ? 1 : 0, .type = 0x8E,
			.off_mid = (h >> 16) & 0xFFFF, .off_hi = h >> 32, .zero = 0,
		};
	}
	struct desc_ptr i = { sizeof(idt) - 1, (uint64_t)idt };
	priv_lidt(&i);
}

/* An AP (guest_vtl0/smp.c): the boot VP's GDT and IDT, which it must not rewrite (VTL1
 * may have sealed them).  No TR: a TSS descriptor is busy on the VP that loaded it, so an
 * AP takes no exception through an IST stack (a #DF on an AP is a triple fault). */
void arch_init_ap(void)
{
	struct desc_ptr g = { sizeof(gdt) - 1, (uint64_t)gdt };
	priv_lgdt(&g);
	asm volatile("pushq $0x08\n\t"
		     "leaq 1f(%%rip), %%rax\n\t"
		     "pushq %%rax\n\t"
		     "lretq\n"
		     "1:\n\t"
		     "movl $0x10, %%eax\n\t"
		     "movl %%eax, %%ds\n\tmovl %%eax, %%es\n\tmovl %%eax, %%ss\n\t"
		     "movl %%eax, %%fs\n\tmovl %%eax, %%gs"
		     ::: "rax", "memory");
	struct desc_ptr i = { sizeof(idt) - 1, (uint64_t)idt };
	priv_lidt(&i);
}

static const char *const names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP",
	"#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

const char *vector_name(int v)
{
	return (v >= 0 && v < 32 && names[v]) ? names[v] : "?";
}

/* smp-spin: a #UD at a VTL0 `out %al, $VTL_PORT_RETURN` (the VMM refuses a VTL return
 * from VTL0 with #UD at the OUT) resumes after it, on any VP, so that a loop can make the
 * VMM inject faults (and complete the OUT's I/O) as fast as it can. */
volatile uint64_t skip_vtl_return_ud;

void exception_handler(struct regs_frame *f)
{
	uint64_t cr2 = read_cr2();
	if (f->vector == 6 && skip_vtl_return_ud) {
		const volatile uint8_t *insn = (const volatile uint8_t *)f->rip;
		if (insn[0] == 0xE6 && insn[1] == VTL_PORT_RETURN) {
			f->rip += 2;
			return;
		}
	}
	uint32_t cpu = this_cpu();
	if (fault_armed[cpu]) {
		fault_armed[cpu] = 0;
		struct fault_info *fi = fault_out[cpu];
		fi->vector = (int)f->vector;
		fi->error_code = f->error_code;
		fi->rip = f->rip;
		fi->cs = f->cs;
		fi->cr2 = cr2;
		guest_longjmp(&fault_jb[cpu], 1);
	}
	printf("exception %s (%lu) err=%#lx rip=%#lx cr2=%#lx cs=%#lx\n", vector_name((int)f->vector),
	       f->vector, f->error_code, f->rip, cr2, f->cs);
	struct fault_info fi = { (int)f->vector, f->error_code, f->rip, f->cs, cr2 };
	report_fault("unexpected_exception", &fi);
	guest_exit(0x80 | (uint32_t)f->vector);
}

int try_run(void (*fn)(void *), void *arg, struct fault_info *fi)
{
	uint32_t cpu = this_cpu();
	memset(fi, 0, sizeof(*fi));
	fi->vector = -1;
	if (guest_setjmp(&fault_jb[cpu]) == 0) {
		fault_out[cpu] = fi;
		fault_armed[cpu] = 1;
		fn(arg);
		fault_armed[cpu] = 0;
		return 0;
	}
	return 1;
}
