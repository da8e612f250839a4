/* `vtl compare` (issue 15): the same cost scenarios in both modes (VTL mode: VTL1 judges;
 * Heki mode: the host judges), each a loop of one operation timed by RDTSC per batch and
 * reported as STAMPS, as bench-null-call.  Hardening goes through whichever interface the
 * boot info announces (harden()). */
#include "vtl0.h"

#define CMP_BATCH 100
#define CMP_MAX_STAMPS 1025
#define CR0_WP (UINT64_C(1) << 16)
static uint64_t cstamps[CMP_MAX_STAMPS];

static uint64_t batches_of(uint64_t dflt)
{
	uint64_t n = boot_info->param ? boot_info->param : dflt;
	uint64_t b = n / CMP_BATCH ? n / CMP_BATCH : 1;
	return b > CMP_MAX_STAMPS - 1 ? CMP_MAX_STAMPS - 1 : b;
}

static void stamped(const char *name, const char *key, uint64_t batches)
{
	uint64_t st = report_stamps(key, cstamps, batches + 1, CMP_BATCH);
	printf("%lu x %s in %lu TSC ticks (report: %s)\n", batches * CMP_BATCH, key,
	       cstamps[batches] - cstamps[0], vtl_status_name(st));
	if (st != VTL_OK)
		fail(name, "the VMM refused the report");
	pass(name);
}

SCENARIO(sc_bench_heki_null, "bench-heki-null",
	 "Heki mode: N (param, default 10000) KVM_HC_LOCK_CR_UPDATE version queries, timed per 100")
{
	const char *name = "bench-heki-null";
	if (!heki_mode())
		fail(name, "needs Heki mode (vtl run --mode heki)");
	uint64_t batches = batches_of(10000);
	for (uint64_t b = 0; b < batches; b++) {
		cstamps[b] = rdtsc();
		for (int i = 0; i < CMP_BATCH; i++)
			if (hypercall(KVM_HC_LOCK_CR_UPDATE, 0, 0, KVM_LOCK_CR_UPDATE_VERSION, NULL) !=
			    HEKI_ABI_VERSION)
				fail(name, "the version query did not answer 1");
	}
	cstamps[batches] = rdtsc();
	stamped(name, "heki_null", batches);
}

SCENARIO(sc_bench_cr4, "bench-cr4-write",
	 "hardened, N (param, default 1000) MOV to CR4 of its own value: a CR write the policy allows")
{
	const char *name = "bench-cr4-write";
	harden(name, 1);
	uint64_t batches = batches_of(1000), cr4 = read_cr4();
	for (uint64_t b = 0; b < batches; b++) {
		cstamps[b] = rdtsc();
		for (int i = 0; i < CMP_BATCH; i++)
			priv_write_cr4(cr4);
	}
	cstamps[batches] = rdtsc();
	if (read_cr4() != cr4)
		fail(name, "CR4 changed");
	stamped(name, "cr4_write", batches);
}

SCENARIO(sc_bench_cr_refused, "bench-cr-refused",
	 "hardened, N (param, default 1000) MOV to CR0 clearing WP: each refused with #GP")
{
	const char *name = "bench-cr-refused";
	harden(name, 1);
	uint64_t batches = batches_of(1000), cr0 = read_cr0();
	struct fault_info fi;
	for (uint64_t b = 0; b < batches; b++) {
		cstamps[b] = rdtsc();
		for (int i = 0; i < CMP_BATCH; i++)
			if (!try_reg_write(priv_write_cr0, cr0 & ~CR0_WP, &fi) || fi.vector != 13)
				fail(name, "a MOV to CR0 clearing WP was not refused with #GP");
	}
	cstamps[batches] = rdtsc();
	if (read_cr0() != cr0)
		fail(name, "CR0 changed");
	stamped(name, "cr_refused", batches);
}

SCENARIO(sc_bench_mem_violation, "bench-mem-violation",
	 "hardened, N (param, default 1000) writes to rodata: each refused with #PF, memory unchanged")
{
	const char *name = "bench-mem-violation";
	harden(name, 1);
	uint64_t batches = batches_of(1000), old = rodata_target;
	struct fault_info fi;
	for (uint64_t b = 0; b < batches; b++) {
		cstamps[b] = rdtsc();
		for (int i = 0; i < CMP_BATCH; i++)
			if (!try_run(write_u64_fn, (void *)&rodata_target, &fi) || fi.vector != 14)
				fail(name, "a write to rodata did not fault with #PF");
	}
	cstamps[batches] = rdtsc();
	if (*(volatile const uint64_t *)&rodata_target != old)
		fail(name, "rodata changed");
	stamped(name, "mem_violation", batches);
}
