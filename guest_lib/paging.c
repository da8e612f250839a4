/* Each kernel's own identity map of guest memory: 4 KiB pages below 16 MiB (so
 * later work can set per-page permissions on the kernel image), 2 MiB above.
 * Accessed/Dirty are preset so the CPU never writes them back: tables that get
 * locked read-only later must not see A/D updates. */
#include "lib.h"

#define P   (1ULL << 0)
#define RW  (1ULL << 1)
#define US  (1ULL << 2)
#define A   (1ULL << 5)
#define D   (1ULL << 6)
#define PS  (1ULL << 7)
#define SMALL_LIMIT (16ULL << 20)
#define MAX_GIB (VTL_MEM_MAX >> 30)   /* the VMM refuses more memory (vtl/core/layout.py) */

static uint64_t pml4[512] __attribute__((aligned(4096)));
static uint64_t pdpt[512] __attribute__((aligned(4096)));
static uint64_t pd[MAX_GIB][512] __attribute__((aligned(4096)));
static uint64_t pt[SMALL_LIMIT >> 21][512] __attribute__((aligned(4096)));

void paging_init(uint64_t mem_size)
{
	uint64_t gib = (mem_size + (1ULL << 30) - 1) >> 30;
	if (gib > MAX_GIB) {
		printf("paging: %lu MiB of memory, only %d GiB supported\n", mem_size >> 20, (int)MAX_GIB);
		guest_exit(2);
	}
	pml4[0] = (uint64_t)pdpt | P | RW | US | A;
	for (uint64_t g = 0; g < gib; g++) {
		pdpt[g] = (uint64_t)pd[g] | P | RW | US | A;
		for (uint64_t i = 0; i < 512; i++) {
			uint64_t pa = (g << 30) | (i << 21);
			if (pa < SMALL_LIMIT) {
				uint64_t *t = pt[pa >> 21];
				for (uint64_t j = 0; j < 512; j++)
					t[j] = (pa + (j << 12)) | P | RW | A | D;
				pd[g][i] = (uint64_t)t | P | RW | US | A;
			} else {
				pd[g][i] = pa | P | RW | PS | A | D;
			}
		}
	}
	write_cr3((uint64_t)pml4);
}

/* Another VP of the same kernel (an AP): the tables paging_init built on the boot VP. */
void paging_load(void)
{
	write_cr3((uint64_t)pml4);
}

uint64_t *pte_for(uint64_t va)
{
	if (va >= SMALL_LIMIT)
		return NULL;
	return &pt[va >> 21][(va >> 12) & 511];
}

#define NX (1ULL << 63)

/* Mark every mapping but [x_start, x_end) no-execute (EFER.NXE is on from boot). */
void paging_set_nx_except(uint64_t x_start, uint64_t x_end)
{
	for (uint64_t g = 0; g < MAX_GIB; g++) {
		if (!(pdpt[g] & P))
			continue;
		for (uint64_t i = 0; i < 512; i++) {
			uint64_t pa = (g << 30) | (i << 21);
			if (pd[g][i] & PS) {
				pd[g][i] |= NX;
				continue;
			}
			uint64_t *t = pt[pa >> 21];
			for (uint64_t j = 0; j < 512; j++) {
				uint64_t va = pa + (j << 12);
				if (va < x_start || va >= x_end)
					t[j] |= NX;
			}
		}
	}
	write_cr3((uint64_t)pml4);
}
