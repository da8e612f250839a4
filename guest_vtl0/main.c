/* VTL0: the ordinary kernel.  Boots, then runs one scenario from .vtl_scenarios. */
#include "vtl0.h"

uint8_t kernel_stack[32768] __attribute__((aligned(16)));
struct vtl_boot_info *boot_info;

extern const struct vtl_scenario_desc _scenarios_start[], _scenarios_end[];

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
	paging_init(bi->mem_size);
	printf("VTL0 kernel up: %lu MiB, image %#lx-%#lx, VTL1 region %#lx-%#lx, VTL1 %s\n",
	       bi->mem_size >> 20, bi->image_start, bi->image_end, bi->vtl1_base,
	       bi->vtl1_base + bi->vtl1_size,
	       (bi->flags & VTL_BOOT_F_VTL1_AVAILABLE) ? "available" : "not available");
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
