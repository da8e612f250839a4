/* VTL0: the ordinary kernel.  Boots, then runs one scenario from .vtl_scenarios. */
#include "vtl0.h"

uint8_t kernel_stack[32768] __attribute__((aligned(16)));
struct vtl_boot_info *boot_info;

extern const struct vtl_scenario_desc _scenarios_start[], _scenarios_end[];

/* What boot set up beyond the VMM's boot state (scenarios report it): CR4 bits enabled
 * here because the vCPU has them, and XCR0 when XSAVE is there (0 otherwise). */
uint64_t cr4_boot_set, xcr0_boot;

/* SMEP, SMAP and UMIP where CPUID has them, and OSXSAVE with XCR0 = x87|SSE, as a kernel
 * sets them up at boot: VTL1 pins them at the lock.  Through the privileged section. */
static void cpu_features_init(void)
{
	uint32_t a, b, c, d, set = 0;
	cpuid(0, 0, &a, &b, &c, &d);
	uint32_t max = a;
	if (max >= 7) {
		cpuid(7, 0, &a, &b, &c, &d);
		if (b & (1u << 7))
			set |= CR4_SMEP;
		if (b & (1u << 20))
			set |= CR4_SMAP;
		if (c & (1u << 2))
			set |= CR4_UMIP;
	}
	cpuid(1, 0, &a, &b, &c, &d);
	int xsave = max >= 0xD && (c & (1u << 26));
	if (xsave)
		set |= CR4_OSXSAVE;
	priv_write_cr4(read_cr4() | set);
	cr4_boot_set = set;
	if (xsave) {
		cpuid(0xD, 0, &a, &b, &c, &d);
		xcr0_boot = XCR0_X87 | (a & XCR0_SSE);
		priv_xsetbv(0, xcr0_boot);
	}
}

/* The verdict: a RESULT report (what tools and tests read), a line for people, then
 * the exit status. */
void pass(const char *name)
{
	report_result(name, 1, NULL);
	printf("PASS: %s\n", name);
	guest_exit(0);
}

void fail(const char *name, const char *why)
{
	report_result(name, 0, why);
	printf("FAIL: %s: %s\n", name, why);
	guest_exit(1);
}

void kmain(struct vtl_boot_info *bi)
{
	arch_init();
	if (bi->magic != VTL_BOOT_MAGIC || bi->abi_version != VTL_ABI_VERSION) {
		printf("bad boot info: magic %#lx abi %u\n", bi->magic, bi->abi_version);
		guest_exit(2);
	}
	boot_info = bi;
	if (bi->flags & VTL_BOOT_F_VTL1_PERSISTS)
		vtl1_on = 1;            /* VTL1 kept across a kexec: VTL calls work now */
	paging_init(bi->mem_size);
	cpu_features_init();
	printf("VTL0 kernel up: %lu MiB, image %#lx-%#lx, VTL1 region %#lx-%#lx, VTL1 %s, CR4 %#lx, XCR0 %#lx\n",
	       bi->mem_size >> 20, bi->image_start, bi->image_end, bi->vtl1_base,
	       bi->vtl1_base + bi->vtl1_size,
	       (bi->flags & VTL_BOOT_F_VTL1_PERSISTS) ? "running (persisted across the kexec)" :
	       (bi->flags & VTL_BOOT_F_VTL1_AVAILABLE) ? "available" : "not available", read_cr4(), xcr0_boot);
	const char *name = bi->scenario[0] ? bi->scenario : "boot";
	for (const struct vtl_scenario_desc *s = _scenarios_start; s < _scenarios_end; s++) {
		if (strcmp(s->name, name) == 0) {
			printf("scenario %s: %s\n", s->name, s->description);
			((void (*)(void))s->entry)();
			fail(name, "scenario returned without a verdict");
		}
	}
	printf("unknown scenario '%s'\n", name);
	report_result(name, 0, "unknown scenario");
	guest_exit(2);
}
