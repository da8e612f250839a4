#ifndef VTL1_H
#define VTL1_H
#include "lib.h"
#include "stack.h"

/* The boot VP's boot info: what every VP's has in common (memory, regions, allowlist).
 * What differs per VP is its index: this_vp(). */
extern struct vtl_boot_info *bi;
int in_vtl0(uint64_t gpa, uint64_t len);

/* ---- SMP (docs/smp.md, "VTL1 on every VP") ---------------------------------------------
 * VTL1 runs on every VP, on the stack of its index (entry.S), so the running VP's index
 * is where its stack pointer lies: VTL1's own memory, nothing the VMM or VTL0 says. */
extern uint8_t vtl1_stacks[VTL1_MAX_VPS][VTL1_STACK_SIZE];
static inline uint32_t this_vp(void)
{
	uint64_t sp;
	asm volatile("mov %%rsp, %0" : "=r"(sp));
	return (uint32_t)((sp - 1 - (uint64_t)vtl1_stacks) >> VTL1_STACK_SHIFT);
}

/* One lock for everything VTL1 keeps for the whole partition (policy.c's page map, pins
 * and lock state, lifecycle.c's allowlist, kexec and module records, the static call
 * buffers): VTL1 on several VPs may serve calls and intercepts at once.  vtl1_dispatch
 * holds it around every call but the NOP fast path and ECHO, and around every intercept.
 * A test-and-set spinlock with PAUSE is enough: contention is rare (the boot VP makes the
 * boot-time calls, an AP makes a handful), so neither fairness nor sleeping is worth its
 * code.  A VP spinning here stays interruptible by the VMM (a pause request kicks it out
 * of KVM_RUN), so a VM-wide change the holder asks for meanwhile cannot deadlock on it. */
struct spinlock {
	volatile uint32_t held;
};
static inline void spin_lock(struct spinlock *l)
{
	while (__atomic_exchange_n(&l->held, 1, __ATOMIC_ACQUIRE))
		while (l->held)
			asm volatile("pause" ::: "memory");
}
static inline void spin_unlock(struct spinlock *l)
{
	__atomic_store_n(&l->held, 0, __ATOMIC_RELEASE);
}
extern struct spinlock vtl1_lock;
/* A kexec is one step for VTL1 (docs/smp.md, "Cross-VP attacks"): a successful
 * KEXEC_JUMP (on the boot VP) keeps vtl1_lock through the restart, and the next kernel's
 * first VTL1 entry on the boot VP takes it over.  So nothing an AP of the old kernel asked
 * for (a call spinning on the lock meanwhile) is ever served on the state VTL1 made for
 * the next kernel, and no AP is taken offline holding the lock; an AP the next kernel
 * starts again resumes in its own start (entry reason NONE), under the lock. */
extern int vtl1_lock_kept;

/* policy.c: VTL1's memory policy for VTL0.
 * page[] (one byte per VTL0 page; tests/test_fuzz.py reads it): VTL_MEM_* | F_* */
#define MAX_PAGES (VTL_MEM_MAX >> 12)   /* all of VTL0 memory */
#define ATTR_MASK 0x07
#define F_EXEC 0x08                     /* executable for VTL0 per the locked page tables */
#define F_IMMUTABLE 0x10                /* (a sealed kexec image or loaded module: until unload) */
#define F_AFTER_BOOT 0x20
#define F_TABLE 0x40
#define F_AUDIT 0x80
#define PRIV_MAX_PAGES 16

uint64_t policy_protect(uint64_t gpa, uint64_t pages, uint64_t attrs, uint64_t flags);
uint64_t policy_protect_pages(uint64_t list, uint64_t count, uint64_t attrs, uint64_t flags);
uint64_t policy_lock_page_tables(uint64_t priv_gpa, uint64_t priv_pages, uint64_t *pinning);
uint64_t policy_end_of_boot(void);
/* VTL_CALL_START_AP: VTL0's struct vtl_start_vp at `gpa`, copied once and checked. */
uint64_t policy_start_ap(uint64_t gpa);
uint64_t policy_get(uint64_t gpa);
void policy_intercept(struct vtl_intercept *m);
/* The only ways VTL1 touches VTL0 memory on VTL0's behalf: VTL_OK, VTL_E_INVALID_ARG (not
 * VTL0 memory), VTL_E_ACCESS_DENIED (VTL0 itself may not write / read it there). */
uint64_t vtl0_write(uint64_t gpa, const void *src, uint64_t len);
uint64_t vtl0_read(void *dst, uint64_t gpa, uint64_t len);

/* For lifecycle.c (kexec, modules): VTL1's own view of a page, and changes to it that go
 * through the VMM first and are recorded only once applied. */
uint8_t policy_page(uint64_t gpa);
int policy_locked(void);
int policy_in_priv(uint64_t gpa);
int policy_xmapped(uint64_t gpa);       /* mapped executable at the lock, but kept NX */
/* Apply attrs to [gpa, +pages) through the VMM; on success page[] = attrs | flags (F_*). */
uint64_t policy_set(uint64_t gpa, uint64_t pages, uint64_t attrs, uint8_t flags);
/* Privileged-write encodings (the lock's rule) in the bytes of [gpa, gpa+len), whose
 * opcode and ModRM bytes are not all in [ok_gpa, ok_gpa + ok_len); bytes past the range
 * are not fetchable.  Returns how many; *first = the GPA of the first. */
uint64_t policy_scan_range(uint64_t gpa, uint64_t len, uint64_t ok_gpa, uint64_t ok_len, uint64_t *first);
/* kexec, persist policy: VTL1 starts over for the new kernel (nothing locked, boot not
 * over, no CR3 root or descriptor-table pins), but keeps CR0/CR4/EFER/XCR0 pinned
 * ("carried"); page[] = NX everywhere, then the caller sets the new kernel's pages. */
void policy_persist_reset(uint64_t new_priv_gpa, uint64_t new_priv_pages);
/* Register pinning for the new kernel's privileged section (VTL_HC_SET_INTERCEPT_CONTROL);
 * returns the VMM's status, sets the pinning state. */
uint64_t policy_persist_pin(void);

/* lifecycle.c: the allowlist, kexec, modules (docs/design.md section 7). */
void lifecycle_init(void);
uint64_t sha256_call(uint64_t gpa, uint64_t len, uint64_t out);
uint64_t kexec_validate(uint64_t req_gpa);
uint64_t kexec_jump(void);
uint64_t kexec_unload(void);
uint64_t module_validate(uint64_t gpa, uint64_t pages, uint64_t src);
uint64_t module_load(uint64_t gpa, uint64_t pages, uint64_t src);
uint64_t module_unload(uint64_t gpa, uint64_t pages);
#endif
