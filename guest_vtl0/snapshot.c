/* A scenario that snapshots itself mid-way (docs/snapshot.md).  Hardened, it writes a
 * pattern into its data and asks for VTL_HC_SNAPSHOT; the call returns twice, as fork
 * does: RDX = 0 in the run that saved, 1 in every run restored from the snapshot.  Both
 * then check that nothing was lost: the pattern, CR0/CR4, and the protection of rodata
 * (an attack the VMM observes: the write must not land).  Run it with --snapshot DIR. */
#include "vtl0.h"

static uint64_t pattern[1024];

static uint64_t pattern_sum(int fill)
{
	uint64_t x = 0x9E3779B97F4A7C15ULL, sum = 0;
	for (int i = 0; i < 1024; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		if (fill)
			pattern[i] = x;
		sum += pattern[i] ^ (uint64_t)i;
	}
	return sum;
}

SCENARIO(sc_snapshot_self, "snapshot-self",
	 "harden, VTL_HC_SNAPSHOT (--snapshot DIR); saved or restored: memory, CRs, protections intact")
{
	const char *name = "snapshot-self";
	harden(name, 1);
	uint64_t sum = pattern_sum(1);
	uint64_t cr0 = read_cr0(), cr4 = read_cr4();
	uint64_t restored = 0, st = VTL_E_BUSY;
	/* BUSY: another VP's VTL1 is judging an intercept right now; the VMM says ask again. */
	for (int i = 0; i < 1000 && st == VTL_E_BUSY; i++)
		st = hypercall(VTL_HC_SNAPSHOT, 0, 0, 0, &restored);
	report_status("snapshot", VTL_HC_SNAPSHOT, st);
	if (st != VTL_OK)
		fail(name, "VTL_HC_SNAPSHOT refused (run with --snapshot DIR)");
	report_value("restored", restored);
	printf("%s\n", restored ? "restored from the snapshot: checking what came back"
				: "snapshot saved: checking nothing changed");
	if (pattern_sum(0) != sum)
		fail(name, "the pattern in memory changed across the snapshot");
	if (read_cr0() != cr0 || read_cr4() != cr4)
		fail(name, "CR0/CR4 changed across the snapshot");
	attack_write(name, "rodata", "rodata", (uint64_t)&rodata_target);
	pass(name);
}
